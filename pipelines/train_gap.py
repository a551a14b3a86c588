"""Band-gap model orchestration: train the ensemble from a YAML config (MLflow-tracked, registered), predict gaps
for a CSV of formulas, and add predicted gaps to a screen's results.csv.

The science (graphs, network, training loop, ensemble) is :mod:`materials.ml.bandgap`; this module reads configs,
assembles the data splits, logs to MLflow and writes files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pymatgen.core import Composition

from materials.datasets.records import read_text_file
from materials.datasets.sustainability import SUSTAINABILITY_COLUMNS, sustainability_rows
from materials.errors import InputError
from materials.ml.bandgap import (
    BASE_CALIBRATION_INPUTS,
    FIDELITIES,
    METAL_DECISION,
    METAL_THRESHOLD,
    POOL_MIN,
    PREDICTION_COLUMNS,
    BandGapError,
    GapCalibrationSettings,
    GapDataset,
    GapEnsemble,
    GapModelSettings,
    GapNet,
    GapTrainSettings,
    MetalCalibration,
    calibrate_ensemble,
    calibration_half,
    chemistry_features,
    conformal_scale,
    finetune_expt_model,
    gap_metrics,
    interval_width,
    known_nonmetals,
    predict_gaps,
    reference_gaps,
    reliability,
    shipped_model_path,
    split_gaps,
    train_pbe_model,
)
from pipelines.config import TrackingSettings, _Strict, load_yaml_config
from pipelines.tracking import Tracker, git_commit, redact

log = logging.getLogger(__name__)


class GapDataSettings(_Strict):
    """Which compositions train, validate and test. A reduced formula's split comes from a hash of the formula
    (:func:`materials.ml.bandgap.split_of`), identical for the MP and the experimental set, so a test composition is
    never trained on at either fidelity. Every Borlido 2019 composition is removed from all of them (external test).

    ``max_mp_train``/``max_expt_train`` cap the training sets (smoke runs; null = all).
    """

    test_percent: float = Field(default=8.0, ge=0, lt=50)
    val_percent: float = Field(default=7.0, ge=0, lt=50)
    max_mp_train: int | None = Field(default=None, ge=10)
    max_expt_train: int | None = Field(default=None, ge=10)


class BandGapConfig(_Strict):
    name: str = "bandgap"
    seed: int = Field(default=0, ge=0)
    members: int = Field(default=4, ge=1, description="ensemble size (seeds seed, seed+1, ...)")
    model: GapModelSettings = Field(default_factory=GapModelSettings)
    training: GapTrainSettings = Field(default_factory=GapTrainSettings)
    data: GapDataSettings = Field(default_factory=GapDataSettings)
    calibration: GapCalibrationSettings = Field(default_factory=GapCalibrationSettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="semidisc-bandgap"))
    registered_model_name: str | None = "semidisc-bandgap"
    output: str = Field(default="materials/data/bandgap_ensemble.pt", description="where the ensemble is written")
    work_dir: str = Field(default="runs/bandgap", description="finished members are kept here (resume)")

    def flat_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


def load_bandgap_config(path: str | Path) -> BandGapConfig:
    """Read and validate ``configs/bandgap.yaml``; :class:`ConfigError` names the file and the bad key."""
    return load_yaml_config(BandGapConfig, path)


def build_datasets(config: BandGapConfig) -> dict[str, GapDataset]:
    """``mp_train``, ``mp_val``, ``mp_test``, ``expt_train``, ``expt_val``, ``expt_test``, ``borlido`` and
    ``anchor`` (the PBE non-metals of ``mp_train`` that no experimental split lists)."""
    d = config.data
    borlido = reference_gaps("borlido")
    exclude = set(borlido)
    out: dict[str, GapDataset] = {}
    for prefix, name, cap in (("mp", "mp", d.max_mp_train), ("expt", "zhuo", d.max_expt_train)):
        parts = split_gaps(reference_gaps(name), exclude, d.test_percent, d.val_percent)
        if cap is not None:
            parts["train"] = parts["train"][:cap]
            parts["val"] = parts["val"][: max(cap // 5, 20)]
            parts["test"] = parts["test"][: max(cap // 5, 20)]
        for split, pairs in parts.items():
            out[f"{prefix}_{split}"] = GapDataset.from_pairs(pairs)
    out["borlido"] = GapDataset.from_pairs(sorted(borlido.items()))
    # PBE non-metals that anchor the experimental classifier (see GapTrainSettings); a composition the experimental
    # set lists (as metal or not) keeps its experimental label only
    expt_formulas = {f for split in ("train", "val", "test") for f in out[f"expt_{split}"].formulas}
    mp_train = out["mp_train"]
    keep = [i for i, f in enumerate(mp_train.formulas) if mp_train.gap[i] > METAL_THRESHOLD and f not in expt_formulas]
    out["anchor"] = mp_train.subset(keep)
    train_formulas = set(out["mp_train"].formulas) | set(out["expt_train"].formulas)
    for held_out in ("mp_test", "expt_test", "borlido"):
        leaked = train_formulas & set(out[held_out].formulas)
        if leaked:  # guards the split rules above
            raise RuntimeError(f"{len(leaked)} {held_out} compositions are in training data, e.g. {sorted(leaked)[:3]}")
    return out


#: Textbook semiconductors and insulators (all in Borlido, so in no training data): none may be called a metal.
TEXTBOOK = (
    "Si",
    "Ge",
    "C",
    "GaAs",
    "GaP",
    "InP",
    "InAs",
    "AlAs",
    "CdTe",
    "ZnS",
    "ZnO",
    "GaN",
    "AlN",
    "MgO",
    "LiF",
    "CuInSe2",
)


def evaluate_ensemble(ensemble: GapEnsemble, data: dict[str, GapDataset]) -> dict[str, float]:
    """Held-out metrics: ``mp_test_*`` (PBE), ``expt_test_*`` (Zhuo), ``borlido_expt_*`` (gap_expt vs experiment),
    ``borlido_pbe_*`` (gap_pbe vs Borlido's PBE column, where it has one; ground-state polymorph per formula).

    Also: ``*_coverage90`` (fraction inside ``lo``..``hi``), ``*_ece`` and ``*_ece_uncalibrated`` (expected
    calibration error of P(metal), calibrated and the members' raw mean), ``borlido_expt_false_metal`` (fraction of
    Borlido's non-metals called metal), and ``textbook_*`` on :data:`TEXTBOOK` (metals called, MAE)."""
    metrics: dict[str, float] = {}
    for key, fidelity, dataset in (
        ("mp_test", "pbe", data["mp_test"]),
        ("expt_test", "expt", data["expt_test"]),
        ("borlido_expt", "expt", data["borlido"]),
    ):
        if len(dataset):
            outputs = ensemble.outputs(fidelity, dataset)
            pred = ensemble.calibrated(fidelity, dataset, outputs, None)
            metrics.update({f"{key}_{k}": v for k, v in gap_metrics(pred, dataset.gap).items()})
            metrics[f"{key}_coverage90"] = float(np.mean((dataset.gap >= pred["lo"]) & (dataset.gap <= pred["hi"])))
            metal = dataset.gap <= METAL_THRESHOLD
            nonmetal = ~metal  # the regression alone on known non-metals (gap_*_nonmetal)
            if nonmetal.any():
                metrics[f"{key}_nonmetal_mae"] = float(np.mean(np.abs(pred["mu"] - dataset.gap)[nonmetal]))
                metrics[f"{key}_false_metal"] = float(np.mean(pred["gap"][nonmetal] <= METAL_THRESHOLD))
                raw_p = np.mean([o["p_metal"] for o in outputs], axis=0)[nonmetal]  # members' mean, called at 0.5
                metrics[f"{key}_false_metal_uncalibrated"] = float(np.mean(raw_p >= METAL_DECISION))
            if metal.any() and nonmetal.any():
                raw = np.mean([o["p_metal"] for o in outputs], axis=0)
                metrics[f"{key}_ece"] = reliability(pred["p_metal"], metal)["ece"]
                metrics[f"{key}_ece_uncalibrated"] = reliability(raw, metal)["ece"]
    borlido_pbe = GapDataset.from_pairs(sorted(reference_gaps("borlido", method="PBE").items()))
    pred = ensemble.predict_dataset("pbe", borlido_pbe)
    metrics.update({f"borlido_pbe_{k}": v for k, v in gap_metrics(pred, borlido_pbe.gap).items()})
    # a screening pool is charge balanced: the balanced held-out Zhuo compositions stand in for one (labels known),
    # predicted with the calibration data's metal prior and with the prior estimated from the pool itself
    test = data["expt_test"]
    balanced = chemistry_features(test.formulas)[:, 0] > 0
    if balanced.sum() >= POOL_MIN:
        pool = test.subset(np.flatnonzero(balanced))
        metal = pool.gap <= METAL_THRESHOLD
        metrics["expt_test_balanced_n"] = float(len(pool))
        metrics["expt_test_balanced_metal_fraction"] = float(metal.mean())
        for label, prior in (("fit_prior", None), ("pool_prior", "pool")):
            pred = ensemble.predict_dataset("expt", pool, prior)
            metrics[f"expt_test_balanced_{label}_prior"] = float(pred["prior"][0])
            metrics[f"expt_test_balanced_{label}_mae"] = float(np.mean(np.abs(pred["gap"] - pool.gap)))
            metrics[f"expt_test_balanced_{label}_false_metal"] = float(np.mean(pred["gap"][~metal] <= METAL_THRESHOLD))
            metrics[f"expt_test_balanced_{label}_missed_metal"] = (
                float(np.mean(pred["gap"][metal] > METAL_THRESHOLD)) if metal.any() else math.nan
            )
            metrics[f"expt_test_balanced_{label}_ece"] = reliability(pred["p_metal"], metal)["ece"]
    borlido = dict(zip(data["borlido"].formulas, data["borlido"].gap, strict=True))
    named = [Composition(f).reduced_formula for f in TEXTBOOK]
    textbook = GapDataset.from_pairs([(f, borlido[f]) for f in named if f in borlido])
    pred = ensemble.predict_dataset("expt", textbook)
    metrics["textbook_n"] = float(len(textbook))
    metrics["textbook_called_metal"] = float(np.sum(pred["gap"] <= METAL_THRESHOLD))
    metrics["textbook_mae"] = float(np.mean(np.abs(pred["gap"] - textbook.gap)))
    metrics["textbook_pbe_called_metal"] = float(
        np.sum(ensemble.predict_dataset("pbe", textbook)["gap"] <= METAL_THRESHOLD)
    )
    return metrics


def validation_metrics(
    ensemble: GapEnsemble, data: dict[str, GapDataset], settings: GapCalibrationSettings
) -> dict[str, float]:
    """What the calibration settings were chosen on (validation compositions only): ``val_known_nonmetal_*``, the
    fraction of the MP validation compositions with a PBE gap >= ``settings.nonmetal_min_pbe_gap`` (experimental
    non-metals, :func:`materials.ml.bandgap.known_nonmetals`) in the half the calibration did not see that
    ``gap_expt`` calls metal (all, and the charge-balanced ones: a screening pool's population); and
    ``val_known_nonmetal_below_hi``, the fraction whose 90 % interval ends above the PBE gap (the experimental
    gap lies above it, so an interval below it misses for certain)."""
    known = known_nonmetals(data["mp_val"], settings.nonmetal_min_pbe_gap)
    unseen = known.subset(np.flatnonzero(~calibration_half(known.formulas)))
    if not len(unseen):
        return {}
    pred = ensemble.predict_dataset("expt", unseen)
    metal = pred["gap"] <= METAL_THRESHOLD
    balanced = chemistry_features(unseen.formulas)[:, 0] > 0
    return {
        "val_known_nonmetal_n": float(len(unseen)),
        "val_known_nonmetal_called_metal": float(metal.mean()),
        "val_known_nonmetal_balanced_called_metal": float(metal[balanced].mean()) if balanced.any() else math.nan,
        "val_known_nonmetal_hi_above_pbe": float(np.mean(pred["hi"] >= unseen.gap)),
    }


def calibration_sweep(
    ensemble: GapEnsemble,
    data: dict[str, GapDataset],
    settings: GapCalibrationSettings,
    nonmetal_weights: tuple[float, ...] = (0.0, 0.05, 0.1, 0.12, 0.14, 0.16, 0.2),
    gap_weights: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2),
    repeats: int = 10,
) -> dict[str, list[dict[str, float]]]:
    """The validation evidence for ``settings`` (validation compositions only; the members stay as trained).

    ``metal``: per input set (:data:`~materials.ml.bandgap.BASE_CALIBRATION_INPUTS`, ``settings.expt_inputs``) and
    known-non-metal weight, the experimental P(metal) fitted as :func:`~materials.ml.bandgap.calibrate_ensemble` does
    on 4/5 of Zhuo val (repeated stratified 5-fold) plus the fitting half of the MP val known non-metals:
    ``zhuo_cv_mae`` (eV, gap_expt on the left-out fifth), ``zhuo_cv_false_metal``, ``zhuo_cv_missed_metal``, and the
    fraction of the unseen half of the known non-metals called metal (``mp_called_metal``, all;
    ``mp_balanced_called_metal``, charge-balanced). ``interval``: per ``interval_gap_weight`` with the ensemble's
    P(metal), the coverage on one hash half of Zhuo val of the interval fitted on the other (both ways, mean),
    overall and where the reported gap is >= 2.5 eV, the mean width (eV), and the fraction of the unseen known
    non-metals whose interval reaches their PBE gap.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    val, known = data["expt_val"], known_nonmetals(data["mp_val"], settings.nonmetal_min_pbe_gap)
    fit_known, unseen = calibration_half(known.formulas), ~calibration_half(known.formulas)

    def inputs_of(d: GapDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = np.mean([o["p_metal"] for o in ensemble.outputs("expt", d)], axis=0)
        return p, np.mean([o["p_metal"] for o in ensemble.outputs("pbe", d)], axis=0), chemistry_features(d.formulas)

    (pv, pbv, cv), (pk, pbk, ck) = inputs_of(val), inputs_of(known)
    mu = np.mean([o["mu"] for o in ensemble.outputs("expt", val)], axis=0)
    is_metal, balanced = val.gap <= METAL_THRESHOLD, ck[:, 0] > 0
    metal_rows = []
    for inputs in (BASE_CALIBRATION_INPUTS, tuple(settings.expt_inputs)):
        for weight in nonmetal_weights:
            scores: dict[str, list[float]] = {}
            folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=0)
            for train, test in folds.split(pv, is_metal):
                extra = np.flatnonzero(fit_known) if weight > 0 else np.zeros(0, dtype=int)
                calibration = MetalCalibration.fit(
                    np.concatenate([pv[train], pk[extra]]),
                    np.concatenate([cv[train], ck[extra]]),
                    np.concatenate([is_metal[train], np.zeros(len(extra), dtype=bool)]),
                    np.concatenate([pbv[train], pbk[extra]]),
                    inputs,
                    np.concatenate(
                        [np.ones(len(train)), np.full(len(extra), weight * len(train) / max(len(extra), 1))]
                    ),
                )
                metal = calibration.probability(pv[test], cv[test], p_pbe=pbv[test]) >= METAL_DECISION
                called = calibration.probability(pk[unseen], ck[unseen], p_pbe=pbk[unseen]) >= METAL_DECISION
                for key, value in (
                    ("zhuo_cv_mae", np.mean(np.abs(np.where(metal, 0.0, mu[test]) - val.gap[test]))),
                    ("zhuo_cv_false_metal", np.mean(metal[~is_metal[test]])),
                    ("zhuo_cv_missed_metal", np.mean(~metal[is_metal[test]])),
                    ("mp_called_metal", np.mean(called)),
                    ("mp_balanced_called_metal", np.mean(called[balanced[unseen]])),
                ):
                    scores.setdefault(key, []).append(float(value))
            metal_rows.append(
                {"inputs": len(inputs), "nonmetal_weight": weight} | {k: float(np.mean(v)) for k, v in scores.items()}
            )
    pred, pred_known = (
        ensemble.predict_dataset("expt", val),
        ensemble.predict_dataset("expt", known.subset(np.flatnonzero(unseen))),
    )
    half = calibration_half(val.formulas)
    interval_rows = []
    for gap_weight in gap_weights:
        width, error = interval_width(pred, gap_weight), np.abs(pred["gap"] - val.gap)
        coverage, wide = [], []
        for fit, check in ((half, ~half), (~half, half)):
            inside = error[check] <= conformal_scale(error[fit], width[fit]) * width[check]
            coverage.append(inside.mean())
            wide.append(inside[pred["gap"][check] >= 2.5].mean())
        q = conformal_scale(error, width)
        hi_known = pred_known["gap"] + q * interval_width(pred_known, gap_weight)
        interval_rows.append(
            {
                "interval_gap_weight": gap_weight,
                "zhuo_cross_half_coverage": float(np.mean(coverage)),
                "zhuo_cross_half_coverage_gap_ge_2.5": float(np.mean(wide)),
                "zhuo_mean_width": float(np.mean(np.minimum(pred["gap"], q * width) + q * width)),
                "mp_hi_above_pbe": float(np.mean(hi_known >= known.gap[unseen])),
            }
        )
    return {"metal": metal_rows, "interval": interval_rows}


def recalibrate(config: BandGapConfig, path: str | Path | None = None) -> dict[str, Any]:
    """Recalibrate a trained ensemble (default: ``config.output``) on its validation compositions without
    retraining (P(metal), sigma, conformal interval; ``config.calibration``), evaluate it, write it back. Returns
    the metrics."""
    path = Path(path or config.output)
    ensemble = GapEnsemble.load(path)
    data = build_datasets(config)
    validation = {"pbe": data["mp_val"], "expt": data["expt_val"]}
    fitted = calibrate_ensemble(ensemble, validation, config.calibration)
    metrics = evaluate_ensemble(ensemble, data) | validation_metrics(ensemble, data, config.calibration) | fitted
    ensemble.info = dict(
        ensemble.info,
        metrics=metrics,
        calibration=config.model_dump(mode="json")["calibration"],
        recalibrated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    ensemble.save(path)
    return metrics


#: Training settings that only the fine-tuning stage reads.
_FINETUNE_FIELDS = ("finetune_epochs", "finetune_lr", "anchor_nonmetal_weight", "anchor_bound_weight")


def _stage_fingerprint(config: BandGapConfig, stage: str) -> str:
    """Everything a stage's weights depend on: the PBE stage ignores the fine-tuning settings, so changing those
    re-runs only the (fast) fine-tuning of saved PBE members."""
    dump = config.model_dump(mode="json", include={"seed", "model", "training", "data"})
    if stage == "pbe":
        dump["training"] = {k: v for k, v in dump["training"].items() if k not in _FINETUNE_FIELDS}
    return json.dumps(dump, sort_keys=True)


def _member_stage(
    config: BandGapConfig,
    data: dict[str, GapDataset],
    work: Path,
    k: int,
    stage: str,
    resume: bool,
    pbe: GapNet | None = None,
) -> tuple[GapNet, list[dict[str, float]]]:
    """Train (or reload from ``work``) stage ``pbe`` or ``expt`` of member ``k`` (seed ``config.seed + k``)."""
    import torch

    path = work / f"member{k}_{stage}.pt"
    fingerprint = _stage_fingerprint(config, stage)
    if resume and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model = GapNet(config.model)
            model.load_state_dict(saved["state"])
            log.info("member %d %s stage reused from %s", k, stage, path)
            return model, saved["history"]

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        log.info("member %d %s epoch %d %s", k, stage, epoch, metrics)

    seed = config.seed + k
    if stage == "pbe":
        val = data["mp_val"].subset(np.arange(min(len(data["mp_val"]), 2000)))  # per-epoch curve only
        model, history = train_pbe_model(data["mp_train"], config.model, config.training, seed, val, on_epoch)
    else:
        model, history = finetune_expt_model(
            pbe, data["expt_train"], config.training, seed, data["expt_val"], on_epoch, data["anchor"]
        )
    history = [{"stage": stage, "epoch": i, **h} for i, h in enumerate(history)]
    torch.save({"fingerprint": fingerprint, "state": model.state_dict(), "history": history}, path)
    return model, history


def run_train_gap(config: BandGapConfig, resume: bool = True, only_members: list[int] | None = None) -> dict[str, Any]:
    """Train (or finish training) the ensemble of ``config``, calibrate its sigma on validation compositions,
    evaluate it on held-out sets, write it to ``config.output`` and log everything to MLflow.

    Finished members are kept in ``config.work_dir`` and reused when ``resume`` is true (same settings only).
    ``only_members`` trains just those members and stops there (``output`` None): run several such processes in
    parallel, then one plain run assembles the ensemble from their files.

    Returns:
        ``{"output", "metrics", "seconds", "mlflow_run_id", "counts"}``.
    """
    import torch

    torch.set_num_threads(1)  # 2 threads beside other work slowed training 10x on this class of machine
    start = time.perf_counter()
    data = build_datasets(config)
    counts = {f"n_{k}": len(v) for k, v in data.items()}
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    # member-only processes run beside each other: they do not write to the SQLite store, the assembling run does
    tracking = config.tracking if only_members is None else config.tracking.model_copy(update={"enabled": False})
    tracker = Tracker(tracking, run_name=config.name)
    status = "FAILED"
    try:
        tracker.log_params(config.flat_params() | counts)
        tracker.set_tags({"git_commit": git_commit(), "model": "roost-like fraction-attention GNN (torch-geometric)"})
        members: dict[str, list[GapNet]] = {f: [] for f in FIDELITIES}
        history: dict[str, list[dict[str, float]]] = {}
        for k in only_members if only_members is not None else range(config.members):
            if not 0 <= k < config.members:
                raise InputError(f"member {k} is outside 0..{config.members - 1}")
            pbe, pbe_history = _member_stage(config, data, work, k, "pbe", resume)
            expt, expt_history = _member_stage(config, data, work, k, "expt", resume, pbe)
            members["pbe"].append(pbe)
            members["expt"].append(expt)
            history[f"member{k}"] = pbe_history + expt_history
            for row in history[f"member{k}"]:  # loss curves, one MLflow step per epoch (expt after pbe)
                step = row["epoch"] + (config.training.epochs if row["stage"] == "expt" else 0)
                values = {n: v for n, v in row.items() if n not in ("stage", "epoch")}
                tracker.log_metrics({f"member{k}_{row['stage']}_{n}": v for n, v in values.items()}, step=step)

        if only_members is not None:
            status = "FINISHED"
            return {
                "output": None,
                "metrics": {},
                "seconds": time.perf_counter() - start,
                "mlflow_run_id": tracker.run_id,
                "counts": counts,
            }
        ensemble = GapEnsemble(config.model, members)
        # calibration on validation compositions: P(metal), sigma, the conformal interval (materials.ml.bandgap)
        validation = {"pbe": data["mp_val"], "expt": data["expt_val"]}
        fitted = calibrate_ensemble(ensemble, validation, config.calibration)
        metrics = evaluate_ensemble(ensemble, data) | validation_metrics(ensemble, data, config.calibration) | fitted
        seconds = time.perf_counter() - start
        metrics["train_seconds"] = seconds
        ensemble.info = {
            "config": redact(config.model_dump(mode="json")),  # the file is logged to MLflow and shipped
            "calibration": config.model_dump(mode="json")["calibration"],
            "counts": counts,
            "metrics": metrics,
            "git_commit": git_commit(),
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        output = ensemble.save(config.output)
        tracker.log_metrics(metrics)
        tracker.log_dict(history, "training_history.json")
        tracker.log_dict(metrics, "heldout_metrics.json")
        tracker.log_artifact(output)
        _log_training_curves(history, work / "loss_curves.png", tracker)
        if tracker.enabled and config.registered_model_name:
            _register_model(tracker, output, config.registered_model_name)
        status = "FINISHED"
        return {
            "output": output,
            "metrics": metrics,
            "seconds": seconds,
            "mlflow_run_id": tracker.run_id,
            "counts": counts,
        }
    finally:
        tracker.end(status)


def _log_training_curves(history: dict[str, list[dict[str, float]]], path: Path, tracker: Tracker) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for name, rows in history.items():
        for ax, stage in zip(axes, ("pbe", "expt"), strict=True):
            rows_stage = [r for r in rows if r["stage"] == stage and "val_mae" in r]
            ax.plot([r["epoch"] for r in rows_stage], [r["val_mae"] for r in rows_stage], label=name)
    for ax, title in zip(axes, ("PBE (MP validation)", "experiment (Zhuo validation)"), strict=True):
        ax.set(title=title, xlabel="epoch", ylabel="single-model MAE (eV)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    tracker.log_artifact(path)


def _register_model(tracker: Tracker, ensemble_path: Path, name: str) -> None:
    """Log the ensemble as an MLflow pyfunc model (input: a ``formula`` column) and register it as ``name``."""
    import mlflow
    import pandas as pd

    from pipelines.gap_pyfunc import BandGapPyfunc

    mlflow.pyfunc.log_model(
        name="bandgap_model",
        python_model=BandGapPyfunc(),
        artifacts={"ensemble": str(ensemble_path)},
        input_example=pd.DataFrame({"formula": ["GaAs", "ZnO"]}),
        pip_requirements=["semidisc", "torch", "torch-geometric", "pymatgen"],
        registered_model_name=name,
    )


# -------------------------------------------------------------------------------------------------------- prediction


def predict_gap_csv(
    input_csv: str | Path,
    formula_column: str,
    out_csv: str | Path,
    model_path: str | Path | None = None,
    metal_prior: float | str | None = None,
) -> dict[str, Any]:
    """Predict gaps for every row of a CSV and write the input columns plus
    :data:`materials.ml.bandgap.PREDICTION_COLUMNS`, ``metal_prior``, ``error`` (why a row has no prediction) and the
    supply-chain columns :data:`materials.datasets.sustainability.SUSTAINABILITY_COLUMNS`.
    ``metal_prior`` as in :func:`materials.ml.bandgap.predict_gaps`.

    One output row per input row, in order: a blank line inside the data (which ``csv.DictReader`` would drop,
    shifting every later row) becomes a row of empty cells with an error; so does a row with more fields than the
    header. Blank lines at the end of the file are not rows. Formulas with an element outside the model's training
    data get an error, not a number (:func:`materials.ml.bandgap.training_elements`).

    Returns:
        ``{"n_rows", "n_ok", "n_failed", "errors"}``; ``errors`` lists ``"line N: why"`` for each failed row
        (line numbers count the header as line 1).

    Raises:
        FileNotFoundError: no input file. ValueError: no such column (listing the columns).
    """
    input_csv = Path(input_csv)
    if not input_csv.is_file():
        raise FileNotFoundError(f"{input_csv}: no such file")
    # csv module, not pandas: pandas reads the formula "NaN" as missing; a byte-order mark (Excel) is dropped
    with io.StringIO(read_text_file(input_csv), newline="") as handle:
        reader = csv.reader(handle)
        columns = next(reader, [])
        records = [(reader.line_num, cells) for cells in reader]
    if formula_column not in columns:
        raise InputError(f"{input_csv}: no column {formula_column!r}; columns are {columns}")

    def blank(cells: list[str]) -> bool:
        return len(cells) <= 1 and not "".join(cells).strip()

    while records and blank(records[-1][1]):
        records.pop()
    rows, problems = [], []
    for line, cells in records:
        problem = None
        if blank(cells):
            problem = f"line {line}: blank line, no formula"
        elif len(cells) > len(columns):
            problem = f"line {line}: {len(cells)} fields, header has {len(columns)}; quote fields holding commas"
        padded = (cells + [""] * len(columns))[: len(columns)]
        rows.append(dict(zip(columns, padded, strict=True)))
        problems.append(problem)
    formulas = [row[formula_column] if problem is None else "" for row, problem in zip(rows, problems, strict=True)]
    predictions = predict_gaps(formulas, model_path=model_path, metal_prior=metal_prior)
    for pred, problem, (line, _) in zip(predictions, problems, records, strict=True):
        if problem is not None:
            pred["error"] = problem
        elif pred["error"] is not None:
            pred["error"] = f"line {line}: {pred['error']}"
    added = [*PREDICTION_COLUMNS, "metal_prior", "error"]
    supply = sustainability_rows(formulas)  # supply-chain columns beside the gaps (materials.datasets.sustainability)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=columns + [c for c in [*added, *SUSTAINABILITY_COLUMNS] if c not in columns]
        )
        writer.writeheader()
        for row, pred, extra in zip(rows, predictions, supply, strict=True):
            writer.writerow(row | {c: _cell(pred[c]) for c in added} | {c: _cell(v) for c, v in extra.items()})
    errors = [p["error"] for p in predictions if p["error"] is not None]
    return {"n_rows": len(rows), "n_ok": len(rows) - len(errors), "n_failed": len(errors), "errors": errors}


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(value, 4) if isinstance(value, float) else value


def add_gap_columns(results_csv: str | Path, formula_column: str = "formula") -> bool:
    """Append predicted gaps (:data:`materials.ml.bandgap.PREDICTION_COLUMNS`) to a screen's results.csv in place.

    Fails soft: without a shipped model (or on a model error) it logs a warning, leaves the file as it is and
    returns False.
    """
    path = Path(results_csv)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        predictions = predict_gaps([row.get(formula_column) or "" for row in rows])
    except (BandGapError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        log.warning("no band-gap predictions in %s: %s", path, exc)
        return False
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns + [c for c in PREDICTION_COLUMNS if c not in columns])
        writer.writeheader()
        for row, pred in zip(rows, predictions, strict=True):
            writer.writerow(row | {c: _cell(pred[c]) for c in PREDICTION_COLUMNS})
    return True


def shipped_model_summary() -> dict[str, Any]:
    """The metrics stored with the shipped ensemble (empty when none ships)."""
    path = shipped_model_path()
    if not path.is_file():
        return {}
    from materials.ml.bandgap import load_ensemble

    return dict(load_ensemble().info.get("metrics", {}))


__all__ = [
    "BandGapConfig",
    "GapDataSettings",
    "add_gap_columns",
    "build_datasets",
    "evaluate_ensemble",
    "load_bandgap_config",
    "predict_gap_csv",
    "run_train_gap",
]
