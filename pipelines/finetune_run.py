"""``semidisc finetune``: DFT training data (GPAW as Ray tasks) -> mace-torch training -> held-out evaluation
against the parent and baseline potentials -> MLflow run + model registry.

Data: for each structure of the config (prototype + species, or files), rattled and strained copies get a GPAW
single point and a strained copy gets a short GPAW relaxation whose ionic steps are recorded
(:mod:`materials.potentials.finetune`). Each labelling job is cached as ``<out>/frames/<id>.xyz`` the moment it
finishes,
so a rerun (or a changed training section) recomputes no DFT. Frames can also come from extxyz files
(``train_file`` / ``heldout_file``, labelled with ``REF_*`` keys and ``dft_*`` settings).

The trained model is logged as an artifact (``model/<name>.model``) and registered as a new version of
``register_as`` with its held-out metrics, training-data hash and parent model as tags; a screen then uses it
with ``potential: {name: mace, model: "mlflow:/<register_as>/<version>"}``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from materials.dft import gpaw as dft
from materials.dft.gpaw import DFTSettings
from materials.errors import InputError, RunError
from materials.potentials.calculators import PotentialSpec, load_potential
from materials.potentials.finetune import (
    DataSettings,
    TrainSettings,
    dataset_hash,
    dft_frames,
    evaluate_calculator,
    perturbed_structures,
    read_frames,
    relaxation_start,
    train_mace,
    validate_training_set,
    write_frames,
)
from materials.structures.candidates import build_prototype
from materials.structures.inputs import load_structure_dir
from pipelines.config import ConfigError, RaySettings, TrackingSettings, _Strict, load_yaml_config


class StructureSource(_Strict):
    """A structure built from a prototype of :mod:`materials.structures.candidates`, e.g. ``{prototype: zincblende,
    species: [Ga, As]}``."""

    prototype: str
    species: list[str]


class FinetuneConfig(_Strict):
    """``semidisc finetune`` config. ``compare``: potentials evaluated on the same held-out frames (CHGNet by
    default; registry URIs allowed). ``register_as``: registry name (None: log the run, do not register)."""

    name: str = "finetune"
    structures: list[StructureSource] = Field(default_factory=list)
    structure_files: str | None = None
    train_file: str | None = None
    heldout_file: str | None = None
    data: DataSettings = Field(default_factory=DataSettings)
    dft: DFTSettings = Field(default_factory=lambda: DFTSettings(ecut=350.0, kpoint_density=2.0))
    train: TrainSettings = Field(default_factory=TrainSettings)
    e0s_values: dict[str, float] | None = None
    compare: list[PotentialSpec] = Field(default_factory=lambda: [PotentialSpec(name="chgnet")])
    register_as: str | None = "semidisc-mace"
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="semidisc-finetune"))
    output_dir: str = "runs/finetune"

    @model_validator(mode="after")
    def _has_data(self) -> FinetuneConfig:
        if not (self.structures or self.structure_files or self.train_file):
            raise InputError("no training data: give structures (prototype + species), structure_files or train_file")
        if self.register_as is not None and not self.register_as.strip():
            raise InputError("register_as must be a non-empty name or null")
        return self


def _flat_params(config: FinetuneConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json", exclude={"ray", "tracking", "output_dir"}))
    return out


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read and validate a finetune YAML; :class:`ConfigError` names the file and the bad key."""
    return load_yaml_config(FinetuneConfig, path)


# --------------------------------------------------------------------------------------------- labelling jobs


@dataclass
class LabelJob:
    """One GPAW labelling: a single point (``relax_steps == 0``) or a short relaxation; ``heldout`` frames are
    kept out of training."""

    id: str
    atoms: Any  # ase.Atoms
    relax_steps: int
    heldout: bool
    composition: str


def base_structures(config: FinetuneConfig) -> list[tuple[str, Any]]:
    """``(id, pymatgen Structure)`` of the configured structures (prototypes first, then files)."""
    out = []
    for source in config.structures:
        structure = build_prototype(source.prototype, source.species)
        out.append((f"{source.prototype}-{''.join(source.species)}", structure))
    if config.structure_files:
        for entry in load_structure_dir(Path(config.structure_files)):
            if entry.structure is None:
                raise ConfigError(f"structure_files: {entry.source}: {entry.error}")
            out.append((entry.id, entry.structure))
    return out


def label_jobs(config: FinetuneConfig) -> list[LabelJob]:
    """Perturbed single points (a seeded ``heldout_fraction`` of each structure's held out, at least one) and
    one relaxation per structure."""
    import numpy as np

    jobs = []
    rng = np.random.default_rng(config.data.seed)
    for name, structure in base_structures(config):
        comp = structure.composition.reduced_formula
        copies = perturbed_structures(structure, config.data, name)
        n_out = 0 if config.data.heldout_fraction == 0 else max(1, round(config.data.heldout_fraction * len(copies)))
        heldout = set(rng.choice(len(copies), size=min(n_out, len(copies)), replace=False).tolist())
        jobs += [LabelJob(fid, atoms, 0, i in heldout, comp) for i, (fid, atoms) in enumerate(copies)]
        if config.data.relax_steps:
            start = relaxation_start(structure, config.data, name)
            jobs.append(LabelJob(f"{name}-relax", start, config.data.relax_steps, False, comp))
    return jobs


def _label_task(job: LabelJob, settings: DFTSettings, log_dir: str):
    import torch

    torch.set_num_threads(1)
    return dft_frames(job.atoms, settings, job.id, job.relax_steps, log_path=Path(log_dir) / f"{job.id}.txt")


def _reference_task(symbol: str, settings: DFTSettings, ref_dir: str) -> tuple[str, float | None, str | None]:
    try:
        return symbol, dft.elemental_reference_energy(symbol, settings, ref_dir), None
    except dft.DFTReferenceError as exc:
        return symbol, None, str(exc)


def _run_labelling(
    config: FinetuneConfig, jobs: list[LabelJob], symbols: list[str], out: Path
) -> tuple[dict[str, float], list[str]]:
    """GPAW on Ray: elemental references (if E0s are elemental and not given) and the labelling jobs not cached
    yet (each written to ``<out>/frames`` on arrival). Returns the references (eV/atom) and failures."""
    import ray

    from pipelines.execution import as_completed, init_ray

    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        j for j in jobs if not (frames_dir / f"{j.id}.xyz").is_file() and not (frames_dir / f"{j.id}.failed").is_file()
    ]
    need_refs = config.train.e0s == "elemental" and config.e0s_values is None and symbols
    if not todo and not need_refs:
        return dict(config.e0s_values or {}), []
    started = init_ray(config.ray)
    failures: list[str] = []
    refs: dict[str, float] = dict(config.e0s_values or {})
    try:
        ref_task = ray.remote(num_cpus=1)(_reference_task)
        task = ray.remote(num_cpus=1, max_retries=1)(_label_task)
        pending_refs = (
            [ref_task.remote(s, config.dft, str(out / "dft_references")) for s in symbols] if need_refs else []
        )
        log_dir = str(out / "logs")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        by_ref = {task.remote(j, config.dft, log_dir): j for j in todo}
        for job, outcome, reason in as_completed(by_ref):
            reason = outcome.failure_reason if outcome is not None else reason
            if outcome is not None and outcome.frames:
                write_frames(outcome.frames, frames_dir / f"{job.id}.xyz")
                print(f"  {job.id}: {len(outcome.frames)} frame(s) in {outcome.seconds:.0f} s", flush=True)
            else:
                (frames_dir / f"{job.id}.failed").write_text(reason or "no frames")
                print(f"  {job.id}: failed: {reason}", flush=True)
        for symbol, energy, error in ray.get(pending_refs):
            if error is not None:
                raise RunError(f"elemental reference for E0s failed: {error}")
            refs[symbol] = energy
    finally:
        if started:
            ray.shutdown()
    failures = [f"{p.stem}: {p.read_text()}" for p in sorted(frames_dir.glob("*.failed"))]
    return refs, failures


# ------------------------------------------------------------------------------------------------------ run


@dataclass
class FinetuneSummary:
    out_dir: Path
    model_path: Path
    registry_uri: str | None
    metrics: dict[str, dict[str, dict[str, float]]]
    n_train: int
    n_heldout: int
    data_hash: str
    e0s: dict[str, float] | str
    failures: list[str]
    seconds: float
    train_seconds: float
    mlflow_run_id: str | None
    notes: list[str] = field(default_factory=list)


def collect_frames(config: FinetuneConfig, jobs: list[LabelJob], out: Path) -> tuple[list, list]:
    """Training and held-out frames: cached GPAW frames (job order) then the configured extxyz files."""
    train, heldout = [], []
    for job in jobs:
        path = out / "frames" / f"{job.id}.xyz"
        if path.is_file():
            (heldout if job.heldout else train).extend(read_frames(path))
    if config.train_file:
        train.extend(read_frames(config.train_file))
    if config.heldout_file:
        heldout.extend(read_frames(config.heldout_file))
    return train, heldout


def format_table(metrics: dict[str, dict[str, dict[str, float]]], split: str = "heldout") -> str:
    """Text table: one row per model of force RMSE (meV/Å), relative-energy MAE and energy MAE (meV/atom)."""
    lines = [f"{'model (' + split + ')':42s} {'F RMSE meV/Å':>13s} {'ΔE_rel MAE meV/at':>18s} {'E MAE* meV/at':>14s}"]
    for role, by_split in metrics.items():
        m = by_split.get(split)
        if not m:
            continue

        def fmt(v: float) -> str:
            return f"{1000 * v:.1f}" if isinstance(v, float) and math.isfinite(v) else "-"

        lines.append(
            f"{role:42s} {fmt(m['force_rmse']):>13s} {fmt(m['relative_energy_mae']):>18s} {fmt(m['energy_mae']):>14s}"
        )
    lines.append("* absolute energy: meaningful only for models trained on these DFT settings (not CHGNet: MP scale)")
    return "\n".join(lines)


def run_finetune(config: FinetuneConfig, out_dir: str | Path | None = None, nested: bool = False) -> FinetuneSummary:
    """Build (or reuse cached) DFT data, train, evaluate, log and register; see the module docstring.

    ``train.foundation_model`` may be a registry URI (``mlflow:/<name>/<version>``): the registered model is
    fetched and fine-tuned, and the URI is recorded as the parent. ``nested``: log into a child run of the
    active MLflow run (a campaign's)."""
    import dataclasses

    import torch

    from pipelines.registry import parse_registry_uri, register_model_file, resolve_potential
    from pipelines.tracking import Tracker, git_commit, redact

    torch.set_num_threads(1)
    start = time.perf_counter()
    out = Path(out_dir or config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))
    jobs = label_jobs(config)
    symbols = sorted({s for j in jobs for s in j.atoms.get_chemical_symbols()})
    refs, failures = _run_labelling(config, jobs, symbols, out)
    train, heldout = collect_frames(config, jobs, out)
    validate_training_set(train + heldout)
    data_hash = dataset_hash(train)
    write_frames(train, out / "data" / "train.xyz")
    if heldout:
        write_frames(heldout, out / "data" / "heldout.xyz")
    if config.train.e0s == "elemental" and not refs:
        raise ConfigError("train.e0s: elemental needs GPAW structures or e0s_values (eV/atom per element)")

    train_settings = config.train
    if parse_registry_uri(config.train.foundation_model):
        parent_spec, _ = resolve_potential(
            PotentialSpec(name="mace", model=config.train.foundation_model), config.tracking.uri
        )
        train_settings = dataclasses.replace(config.train, foundation_model=parent_spec.model)

    tracker = Tracker(config.tracking, run_name=config.name, nested=nested)
    status = "FAILED"
    try:
        tracker.log_params(_flat_params(config))
        workdir = out / "train"
        shutil.rmtree(workdir, ignore_errors=True)  # mace-torch would resume from old checkpoints
        result = train_mace(train, train_settings, workdir, e0s=refs or None, name=config.name)
        model_path = out / f"{config.name}.model"
        shutil.copyfile(result.model_path, model_path)

        dtype = config.train.dtype
        models = {"finetuned": PotentialSpec(name="mace", model=str(model_path), dtype=dtype)}
        if train_settings.foundation_model:
            models["parent"] = PotentialSpec(name="mace", model=train_settings.foundation_model, dtype=dtype)
        for spec in config.compare:
            resolved, _ = resolve_potential(spec, config.tracking.uri)
            models[spec.label() if spec.model is None else spec.model] = resolved
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        for role, spec in models.items():
            calc = load_potential(spec)
            splits = {"train": train, "heldout": heldout} if role in ("finetuned", "parent") else {"heldout": heldout}
            metrics[role] = {s: evaluate_calculator(calc, f) for s, f in splits.items() if f}
            for split, values in metrics[role].items():
                tracker.log_metrics({f"{split}/{role}/{k}": v for k, v in values.items() if math.isfinite(v)})
        tracker.log_metrics({"n_train": len(train), "n_heldout": len(heldout), "train_seconds": result.seconds})
        parent = config.train.foundation_model or "scratch"
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                "training_data_hash": data_hash,
                "parent_model": parent,
                "e0s": config.train.e0s,
                "dft_settings": json.dumps(config.dft.__dict__, default=str),
            }
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "e0s.json").write_text(json.dumps(result.e0s, indent=1))
        tracker.log_artifact(model_path, "model")
        tracker.log_artifact(out / "data" / "train.xyz", "data")
        if heldout:
            tracker.log_artifact(out / "data" / "heldout.xyz", "data")
        tracker.log_artifact(out / "metrics.json")
        tracker.log_artifact(out / "e0s.json")
        tracker.log_artifact(result.log_path)
        registry_uri = None
        notes = []
        if config.register_as and tracker.enabled:
            tags = {
                "training_data_hash": data_hash,
                "parent_model": parent,
                "n_train": len(train),
                "n_heldout": len(heldout),
                "e0s": config.train.e0s,
                "dft_xc": train[0].info.get("dft_xc"),
                "dft_settings_hash": train[0].info.get("dft_settings_hash"),
            }
            for key, value in metrics["finetuned"].get("heldout", {}).items():
                tags[f"heldout_{key}"] = f"{value:.6g}"
            version = register_model_file(
                config.tracking.uri, tracker.run_id, "model", config.register_as, tags, description=config.name
            )
            registry_uri = f"mlflow:/{config.register_as}/{version}"
            tracker.set_tags({"registered_model": registry_uri})
        elif config.register_as:
            notes.append("tracking disabled: model not registered")
        status = "FINISHED"
        return FinetuneSummary(
            out_dir=out,
            model_path=model_path,
            registry_uri=registry_uri,
            metrics=metrics,
            n_train=len(train),
            n_heldout=len(heldout),
            data_hash=data_hash,
            e0s=result.e0s,
            failures=failures,
            seconds=time.perf_counter() - start,
            train_seconds=result.seconds,
            mlflow_run_id=tracker.run_id,
            notes=notes,
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipelines.interrupts)
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
