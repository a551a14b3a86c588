"""Fine-tuning gain: a MACE trained on GPAW DFT of the Ga-As-P-In zincblende chemistry vs CHGNet on held-out DFT.

Runs ``semidisc finetune`` (:func:`pipelines.finetune_run.run_finetune`) with ``configs/finetune.yaml``: 8
structures (4 zincblende 2-atom cells, 2 wurtzite 4-atom cells, 2 chalcopyrite-ordered 8-atom alloys), each with
4 rattled + 2 strained GPAW single points (2 of the 6 held out) and a 3-step GPAW relaxation (training only),
plus the GPAW elemental references used as MACE E0s. Metrics on the held-out frames:

* force RMSE (eV/Å over all components);
* relative-energy MAE (eV/atom): per-atom energies relative to the mean of their composition, computed
  separately for DFT and model, so CHGNet's MP/VASP energy scale cancels.

Everything goes to its own MLflow store (``<out>/mlruns``) and the model is registered there. GPAW frames are
cached in ``<out>/frames``: a rerun only retrains. Measured on 2 busy cores (see README, Fine-tuning).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_gain.py [--config configs/finetune.yaml] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "finetune.yaml"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-finetune"))
    parser.add_argument("--epochs", type=int, help="override train.max_num_epochs")
    args = parser.parse_args(argv)

    from pipelines.finetune_run import format_table, load_finetune_config, run_finetune

    out = Path(args.out).resolve()
    config = load_finetune_config(args.config)
    changes = {"tracking": config.tracking.model_copy(update={"uri": f"sqlite:///{out}/mlruns/mlflow.db"})}
    if args.epochs:
        changes["train"] = type(config.train)(**{**config.train.__dict__, "max_num_epochs": args.epochs})
    config = config.model_copy(update=changes)
    start = time.perf_counter()
    summary = run_finetune(config, out_dir=out)
    seconds = time.perf_counter() - start
    print(f"\n{summary.n_train} training frames, {summary.n_heldout} held-out frames, data hash {summary.data_hash}")
    print(f"E0s (GPAW elemental solids, eV/atom): {summary.e0s}")
    for failure in summary.failures:
        print(f"  failed: {failure}")
    print("\n" + format_table(summary.metrics, "heldout"))
    print("\n" + format_table({k: v for k, v in summary.metrics.items() if "train" in v}, "train"))
    print(f"\nregistered: {summary.registry_uri}; training {summary.train_seconds:.0f} s; total {seconds:.0f} s")
    report = {
        "metrics": summary.metrics,
        "n_train": summary.n_train,
        "n_heldout": summary.n_heldout,
        "registry_uri": summary.registry_uri,
        "train_seconds": summary.train_seconds,
        "seconds": seconds,
    }
    (out / "finetune_gain.json").write_text(json.dumps(report, indent=1))
    heldout = {k: v["heldout"] for k, v in summary.metrics.items() if "heldout" in v}
    base = [k for k in heldout if k != "finetuned"]
    wins = all(heldout["finetuned"][m] < heldout[b][m] for b in base for m in ("force_rmse", "relative_energy_mae"))
    print(f"fine-tuned beats {', '.join(base)} on force RMSE and relative-energy MAE: {wins}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
