"""Ablation of the experimental fine-tuning anchors of the band-gap ensemble (``configs/bandgap.yaml``).

Re-runs only stage 2 (fine-tuning on Zhuo 2018) of the members whose PBE stage is saved in the config's
``work_dir`` (run ``semidisc train-gap configs/bandgap.yaml`` first), with the two anchor weights given here, and
prints one JSON line: the fitted ``p_metal`` cut, and per split (Zhuo ``val``, Zhuo ``test``, ``borlido``) the MAE
of ``gap_expt``, the metal accuracy, and ``*_reg``: the MAE of the regression alone on the non-metals
(``gap_expt_nonmetal``). Choices are made on ``val``; ``test`` and ``borlido`` are reported only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bandgap_anchor_ablation.py --nonmetal-weight 0 --bound-weight 1

About 30-60 s per member on one core. The README's ablation numbers were measured with member 0 of the 45-epoch
PBE stage (``training.epochs: 45``): train it into a scratch ``work_dir`` with a copy of the config
(``training.epochs: 45``, ``work_dir`` and ``output`` elsewhere) and ``semidisc train-gap COPY --member 0``, then
pass ``--config COPY``. ``--save FILE`` appends the line's record (with the command line, the commit, the config and
the PBE epochs of the members used) to a JSON list in ``FILE`` (created if missing), e.g.
``benchmarks/results/bandgap_anchor_ablation.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from materials.ml.bandgap import (  # noqa: E402
    METAL_THRESHOLD,
    GapNet,
    combine_members,
    finetune_expt_model,
    fit_metal_cut,
    gap_metrics,
    model_outputs,
)
from pipelines.tracking import git_commit  # noqa: E402
from pipelines.train_gap import build_datasets, load_bandgap_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bandgap.yaml")
    parser.add_argument("--nonmetal-weight", type=float, default=0.0, help="anchor_nonmetal_weight")
    parser.add_argument("--bound-weight", type=float, default=0.0, help="anchor_bound_weight")
    parser.add_argument("--members", default="0", help="comma-separated member indices (default 0)")
    parser.add_argument("--save", help="append the record to the JSON list in this file (created if missing)")
    parser.add_argument(
        "--pbe-training-command", help="how the PBE stage in work_dir was trained (stored in the --save record)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    config = load_bandgap_config(args.config)
    data = build_datasets(config)
    settings = dataclasses.replace(
        config.training, anchor_nonmetal_weight=args.nonmetal_weight, anchor_bound_weight=args.bound_weight
    )
    splits = {"val": data["expt_val"], "test": data["expt_test"], "borlido": data["borlido"]}
    outputs: dict[str, list] = {name: [] for name in splits}
    pbe_epochs: list[int] = []
    for k in (int(m) for m in args.members.split(",")):
        path = Path(config.work_dir) / f"member{k}_pbe.pt"
        if not path.is_file():
            raise SystemExit(f"{path} missing: train the PBE stage first (semidisc train-gap {args.config})")
        pbe = GapNet(config.model)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        pbe.load_state_dict(saved["state"])
        pbe_epochs.append(len(saved.get("history", [])))
        model, _ = finetune_expt_model(pbe, data["expt_train"], settings, config.seed + k, anchor=data["anchor"])
        for name, dataset in splits.items():
            outputs[name].append(model_outputs(model, dataset))
    cut = fit_metal_cut(outputs["val"], splits["val"].gap)
    report: dict[str, float] = {"nonmetal_weight": args.nonmetal_weight, "bound_weight": args.bound_weight, "cut": cut}
    for name, dataset in splits.items():
        metrics = gap_metrics(combine_members(outputs[name], metal_cut=cut), dataset.gap)
        mu = np.mean([o["mu"] for o in outputs[name]], axis=0)
        nonmetal = dataset.gap > METAL_THRESHOLD
        report[name] = round(metrics["mae"], 3)
        report[f"{name}_metal_accuracy"] = round(metrics["metal_accuracy"], 3)
        report[f"{name}_reg"] = round(float(np.mean(np.abs(mu - dataset.gap)[nonmetal])), 3)
    print(json.dumps(report))
    if args.save:
        record = {
            "command": "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(sys.argv),
            "commit": git_commit(),
            "config": args.config,
            "training": dataclasses.asdict(settings),
            "work_dir": config.work_dir,
            "members": args.members,
            "pbe_epochs": pbe_epochs,
            "pbe_training_command": args.pbe_training_command,
            "seconds": round(time.perf_counter() - start, 1),
            "result": report,
        }
        out = Path(args.save)
        records = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(records + [record], indent=1) + "\n")


if __name__ == "__main__":
    main()
