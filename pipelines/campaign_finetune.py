"""Fine-tuning inside a campaign (``finetune_every: K`` with the dft oracle).

Every K completed BO iterations the DFT frames the oracle kept (``<out>/dft/frames/<candidate>.xyz``: energy,
forces, stress; every ionic step of a DFT relaxation) are split by candidate into training and held-out frames
and handed to :func:`pipelines.finetune_run.run_finetune`, the same training, evaluation and registration as
``semidisc finetune``, logged as a child run of the campaign's MLflow run. Its outcome — registered version,
parent, data hash, held-out metrics, or why it failed — is one record in the campaign store, so a resumed
campaign never redoes a finished fine-tune and a failed one (too few frames, a training error) does not stop the
campaign.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from materials.dft import gpaw as dft
from materials.potentials.finetune import write_frames
from pipelines.config import CampaignConfig


def _unit_hash(seed: int, candidate: str) -> float:
    digest = hashlib.sha256(f"{seed}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_by_candidate(
    frames_by_candidate: Sequence[tuple[str, Sequence[Atoms]]], heldout_fraction: float, seed: int
) -> tuple[list[Atoms], list[Atoms], list[str]]:
    """Training frames, held-out frames and the held-out candidate ids.

    A candidate is held out (all its frames) when a hash of ``(seed, id)`` in [0, 1) falls below
    ``heldout_fraction`` — the same candidate stays on the same side as the data grows — unless one of its
    elements appears in no training frame (the model could not predict it). When ``heldout_fraction > 0`` and
    no candidate qualified, the lowest-hash candidate whose elements the others cover is held out. Frames keep
    the order of ``frames_by_candidate``.
    """
    items = [(cid, list(frames)) for cid, frames in frames_by_candidate if frames]
    elements = {cid: {s for f in frames for s in f.get_chemical_symbols()} for cid, frames in items}
    held: list[str] = []
    if heldout_fraction > 0:
        for cid in sorted(elements, key=lambda c: _unit_hash(seed, c)):
            chosen = _unit_hash(seed, cid) < heldout_fraction
            if not chosen and held:
                break
            others = [elements[c] for c in elements if c != cid and c not in held]
            if others and elements[cid] <= set().union(*others):
                held.append(cid)
                if not chosen:
                    break
    train = [f for cid, frames in items if cid not in held for f in frames]
    heldout = [f for cid, frames in items if cid in held for f in frames]
    return train, heldout, [cid for cid, _ in items if cid in held]


def finetune_parent(config: CampaignConfig, records: Sequence[dict[str, Any]], elements: Sequence[str]) -> str | None:
    """The model the next fine-tune (on frames with ``elements``) starts from: the campaign's latest successful
    model (registry URI, else its file) when ``finetune.continue_from_previous`` and that model knows every
    element (mace's fine-tuning cannot add one), else ``finetune.train.foundation_model`` (None: scratch)."""
    if config.finetune.continue_from_previous:
        for record in reversed(records):
            if record["status"] == "ok":
                if set(elements) <= set(record.get("elements", ())):
                    return record.get("registry_uri") or record["model_path"]
                break
    return config.finetune.train.foundation_model


def registry_name(config: CampaignConfig) -> str:
    return config.finetune.register_as or f"{config.name}-mace"


def finetune_on_campaign_data(
    config: CampaignConfig,
    iteration: int,
    frames_by_candidate: Sequence[tuple[str, Sequence[Atoms]]],
    parent: str | None,
    reference_dir: Path,
    out: Path,
) -> dict[str, Any]:
    """Train, evaluate and register a model on the frames gathered up to ``iteration``; never raises for a
    training failure. Returns the record for the campaign store: ``status`` ``ok`` or ``failed`` (``reason``),
    ``registry_uri``, ``model_path``, ``parent``, ``data_hash``, ``n_train``/``n_heldout`` frames, held-out
    candidates, ``metrics`` (role -> split -> metric, eV, eV/Å, eV/atom), ``mlflow_run_id``, ``seconds``."""
    from pipelines.finetune_run import FinetuneConfig, run_finetune

    start = time.perf_counter()
    ft = config.finetune
    train, heldout, held_ids = split_by_candidate(frames_by_candidate, ft.heldout_fraction, config.seed)
    n_candidates = sum(1 for _, frames in frames_by_candidate if frames)
    record: dict[str, Any] = {
        "iteration": iteration,
        "status": "failed",
        "reason": None,
        "parent": parent or "scratch",
        "n_candidates": n_candidates,
        # what the model can predict (held-out elements are always among them): decides the next parent
        "elements": sorted({s for f in train for s in f.get_chemical_symbols()}),
        "n_train": len(train),
        "n_heldout": len(heldout),
        "heldout_candidates": held_ids,
        "registry_uri": None,
        "model_path": None,
        "data_hash": None,
        "metrics": {},
        "mlflow_run_id": None,
    }
    if len(train) < ft.min_train_frames:
        record["reason"] = (
            f"{len(train)} training frames (from {n_candidates} candidates with DFT frames, "
            f"{len(heldout)} held out) < finetune.min_train_frames={ft.min_train_frames}: wait for more DFT "
            "(raise finetune_every) or lower finetune.min_train_frames"
        )
        record["seconds"] = time.perf_counter() - start
        return record
    folder = out / "finetune" / f"iter-{iteration:03d}"
    try:
        train_file = write_frames(train, folder / "campaign_data" / "train.xyz")
        heldout_file = write_frames(heldout, folder / "campaign_data" / "heldout.xyz") if heldout else None
        e0s = ft.e0s_values
        if ft.train.e0s == "elemental" and e0s is None:
            symbols = sorted({s for f in train + heldout for s in f.get_chemical_symbols()})
            # cached by the oracle's formation energies (same settings): no GPAW runs here in practice
            e0s = {s: dft.elemental_reference_energy(s, config.dft, reference_dir) for s in symbols}
        ft_config = FinetuneConfig(
            name=f"{config.name}-iter{iteration:03d}",
            train_file=str(train_file),
            heldout_file=str(heldout_file) if heldout_file else None,
            dft=config.dft,
            train=dataclasses.replace(ft.train, foundation_model=parent),
            e0s_values=e0s,
            compare=[config.potential] if ft.compare is None else ft.compare,
            register_as=registry_name(config),
            ray=config.ray,
            tracking=config.tracking,
            output_dir=str(folder),
        )
        summary = run_finetune(ft_config, out_dir=folder, nested=True)
    except (ValueError, RuntimeError, OSError) as exc:  # recorded; the campaign goes on without this model
        record["reason"] = f"{type(exc).__name__}: {exc}"[:4000]
        record["seconds"] = time.perf_counter() - start
        return record
    record.update(
        status="ok",
        registry_uri=summary.registry_uri,
        model_path=str(summary.model_path),
        data_hash=summary.data_hash,
        metrics=_finite(summary.metrics),
        mlflow_run_id=summary.mlflow_run_id,
        notes=summary.notes,
        seconds=time.perf_counter() - start,
    )
    return record


def _finite(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """JSON-safe metrics (NaN -> None)."""
    return {
        role: {split: {k: (v if math.isfinite(v) else None) for k, v in values.items()} for split, values in s.items()}
        for role, s in metrics.items()
    }
