"""The screen: candidates (or user files) -> checks -> MLIP relaxation on Ray -> stability -> store + MLflow.

Results are written to ``<out>/results.sqlite`` as each chunk finishes; ``resume=True`` skips finished items.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from pymatgen.core import Composition
from tqdm import tqdm

from materials.candidates import Candidate, enumerate_candidates
from materials.errors import InputError
from materials.potentials import PotentialSpec
from materials.stability import (
    BELOW_HULL_WARNING,
    EnergyReferences,
    ReferenceTable,
    assess_stability,
    mp_references,
    shipped_element_offsets,
)
from materials.structures import load_structure_dir
from pipelines.config import ScreenConfig
from pipelines.environments import check_potential
from pipelines.execution import WorkItem, chunked, init_ray, make_workers, run_chunks
from pipelines.store import ResultStore
from pipelines.tracking import Tracker, git_commit, redact


class ResumeError(InputError):
    """The output folder holds another screen, or a finished one without ``--resume``."""


@dataclass
class ScreenSummary:
    out_dir: Path
    n_items: int
    n_ok: int
    n_failed: int
    n_stable: int
    n_new_this_run: int
    seconds: float
    references: dict[str, Any]
    mlflow_run_id: str | None
    top: list[dict[str, Any]] = field(default_factory=list)
    #: rows more than |BELOW_HULL_WARNING| eV/atom below the known hull (id, formula, e_above_hull, warning)
    below_hull: list[dict[str, Any]] = field(default_factory=list)
    #: rows that carry any warning
    n_warnings: int = 0


def config_fingerprint(config: ScreenConfig, structures: str | None, limit: int | None) -> str:
    """Hash of what determines the stored relaxations (science settings and inputs, not Ray/tracking/output).

    Stability settings and the energy convention are left out: E_form and E_hull are recomputed from the stored
    energies at the end of every run, so changing them and resuming recomputes them without relaxing again."""
    # relax.batched / batch_max_atoms choose how, not what: a CPU screen may be resumed batched on a GPU
    exclude = {
        "ray": True,
        "tracking": True,
        "output_dir": True,
        "name": True,
        "stability": True,
        "relax": {"batched", "batch_max_atoms"},
        "potential": {"energy_convention"},
    }
    science = config.model_dump(mode="json", exclude=exclude)
    payload = json.dumps({"science": science, "structures": structures, "limit": limit}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_work_items(
    config: ScreenConfig, structures: str | None, limit: int | None
) -> tuple[list[WorkItem], list[dict]]:
    """Work items plus records for inputs that failed before any simulation (unreadable files).

    Raises:
        ValueError: ``limit`` below 1 (``None`` keeps every item).
    """
    _check_limit(limit)
    failed: list[dict] = []
    if structures:
        loaded = load_structure_dir(structures)
        items = []
        for entry in loaded:
            if entry.structure is None:
                failed.append(
                    {
                        "id": entry.id,
                        "formula": None,
                        "prototype": "user",
                        "source": entry.source,
                        "status": "failed",
                        "failure_reason": f"rejected: {entry.error}",
                    }
                )
            else:
                items.append(
                    WorkItem(
                        entry.id,
                        entry.structure.composition.reduced_formula,
                        "user",
                        entry.source,
                        entry.structure.as_dict(),
                    )
                )
    else:
        if not config.candidates.prototypes:
            raise InputError(
                "candidates.prototypes is empty: list prototypes and elements in the config, or pass --structures DIR"
            )
        cands: list[Candidate] = enumerate_candidates(
            config.candidates.prototypes,
            max_candidates=config.candidates.max_candidates,
            dedup=config.candidates.dedup,
        )
        items = [WorkItem(c.id, c.formula, c.prototype, c.source, c.structure.as_dict()) for c in cands]
    if limit is not None:
        items = items[:limit]
    return items, failed


def _check_limit(limit: int | None) -> None:
    # a slice would read -1 as "all but the last" and 0 as "nothing" (an empty run logged to MLflow)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit={limit!r}: give a whole number >= 1 of items to screen, or None for all")


def resolve_references(
    config: ScreenConfig, out_dir: Path, workers: list, symbols: set[str], potential_hash: str
) -> EnergyReferences:
    """The potential's elemental references under its energy convention: MP's 2023 elemental energies for
    ``mp2020`` and ``uncorrected``; for ``self``, the elemental crystals relaxed with the potential on a Ray
    worker (kept in ``reference_energies.json`` so a resumed screen computes only new elements). With
    ``stability.element_offsets``, fitted offsets on top: shipped for the weights, cached, or fitted on a worker."""
    label = config.potential.label()
    convention = config.potential.convention()
    if convention != "self":
        refs = mp_references(convention, label)
        if not config.stability.element_offsets:
            return refs
        shipped = shipped_element_offsets(potential_hash)
        if shipped is not None and shipped.convention == convention:
            return replace(shipped, potential=label)
        cache = out_dir / "reference_energies.json"
        if cache.is_file():
            cached = EnergyReferences.from_dict(json.loads(cache.read_text()))
            if cached.offsets and cached.convention == convention and cached.potential == label:
                return cached
        return EnergyReferences.from_dict(ray.get(workers[0].element_offsets.remote(refs.as_dict())))
    cache = out_dir / "reference_energies.json"
    refs = EnergyReferences(convention="self", potential=label, mu={}, source="model")
    if cache.is_file():
        cached = EnergyReferences.from_dict(json.loads(cache.read_text()))
        if cached.convention == "self" and cached.potential == label:
            refs = cached
    todo = sorted(symbols - set(refs.mu) - set(refs.missing))
    if todo:
        new = EnergyReferences.from_dict(ray.get(workers[0].elemental_references.remote(todo)))
        refs.mu.update(new.mu)
        refs.missing.update(new.missing)
    return refs


def compute_stability(
    store: ResultStore, refs: EnergyReferences, table: ReferenceTable, training_elements: frozenset[str] | None
) -> None:
    """Formation energy, signed E_hull, E_hull against the screen's own hull, and warnings for every ok record."""
    energies = {}
    for rec in store.records():
        if rec["status"] != "ok" or rec["energy_per_atom"] is None:
            continue
        comp = Composition(rec["formula"])
        energies[rec["id"]] = (comp, rec["energy_per_atom"] * comp.num_atoms)
    rows = assess_stability(energies, refs, table, training_elements)
    store.update_stability(rows, refs.convention)


def _write_structure_files(records: list[dict], folder: Path) -> None:
    from pymatgen.core import Structure

    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        if rec.get("structure"):
            Structure.from_dict(rec["structure"]).to(filename=str(folder / f"{rec['id']}.cif"))


def _ehull_plot(records: list[dict], threshold: float, path: Path) -> Path | None:
    values = [r["e_above_hull"] for r in records if r.get("e_above_hull") is not None]
    if not values:
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="#4477aa")
    ax.axvline(threshold, color="k", ls="--", label=f"stable ≤ {threshold} eV/atom")
    ax.set_xlabel("E above hull (eV/atom)")
    ax.set_ylabel("candidates")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _add_predicted_gaps(csv_path: Path) -> None:
    """Band-gap GNN columns (gap_pbe, gap_pbe_std, gap_expt, gap_expt_std, p_metal) by formula; fails soft."""
    from pipelines.train_gap import add_gap_columns  # torch-geometric import only when a screen finishes

    add_gap_columns(csv_path)


def check_potential_loads(spec: PotentialSpec, environments: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load the potential once on the CPU (in the driver, or in its own environment for SevenNet), so that a wrong
    name, a missing file, weights that cannot be downloaded or an environment not built fail at once with one
    message, before any Ray work starts (inside an actor they would surface a minute later as a traceback or as
    every row failing). Returns the potential's ``weights_hash`` and ``elements``.

    Raises:
        PotentialError: the potential cannot be loaded; the message says how to fix it.
    """
    return check_potential(spec, environments)


def run_screen(
    config: ScreenConfig,
    structures: str | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> ScreenSummary:
    """Run (or resume) a screen and return its summary; results in ``<out>/results.csv``.

    Every input (limit, structures or candidate settings, the potential) is checked before anything is written or
    logged, so a corrected rerun into the same ``out_dir`` is not refused; a folder whose earlier start stored no
    result is reused whatever its settings were.

    Raises:
        InputError: ``limit`` below 1, no candidates, an unreadable structures folder.
        PotentialError: the potential cannot be loaded.
        ResumeError: ``out_dir`` holds results of another screen, or of this one without ``resume``.
    """
    _check_limit(limit)
    start = time.perf_counter()
    out = Path(out_dir or config.output_dir)
    fingerprint = config_fingerprint(config, structures, limit)
    # a registry URI (potential.model: mlflow:/name/version) becomes a local .model file; tags record which
    from pipelines.registry import resolve_potential

    potential, registry_tags = resolve_potential(config.potential, config.tracking.uri)
    config = config.model_copy(update={"potential": potential})
    # every input is checked before anything is written: a mistake fixed and rerun meets no stale fingerprint
    items, prefailed = build_work_items(config, structures, limit)
    potential_info = check_potential_loads(config.potential, config.ray.environments)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / "results.sqlite")
    previous = store.get_meta("fingerprint")
    n_stored = len(store)
    if previous is not None and previous != fingerprint:
        if n_stored:
            store.close()
            raise ResumeError(f"{out} holds a screen with different settings or inputs; use another --out")
        store.set_meta("mlflow_run_id", None)  # an earlier start that stored nothing: reuse the folder
    if previous == fingerprint and not resume and n_stored:
        store.close()
        raise ResumeError(
            f"{out} already holds {n_stored} results of this screen; "
            "pass --resume to continue it, or choose another --out"
        )
    store.set_meta("fingerprint", fingerprint)
    (out / "config.yaml").write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))

    done = store.done_ids()
    store.write(r for r in prefailed if r["id"] not in done)
    todo = [it for it in items if it.id not in done]

    tracker: Tracker | None = None
    status = "FAILED"
    started_ray = False
    try:
        tracker = Tracker(config.tracking, run_name=config.name, run_id=store.get_meta("mlflow_run_id"))
        store.set_meta("mlflow_run_id", tracker.run_id)
        started_ray = init_ray(config.ray)
        tracker.log_params(config.flat_params() | {"structures": structures, "limit": limit})
        workers = make_workers(config.potential, config.relax, config.checks, config.ray)
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                "potential": config.potential.label(),
                "potential_weights_hash": potential_info["weights_hash"],
                "energy_convention": config.potential.convention(),
                **registry_tags,
            }
        )
        structures_dir = out / "structures"

        def on_result(records: list[dict]) -> None:
            store.write(records)
            _write_structure_files(records, structures_dir)

        chunks = chunked(todo, config.ray.chunk_size)
        bar = tqdm(total=len(todo), desc="relax", unit="struct", disable=not progress)
        relax_start = time.perf_counter()
        for n in run_chunks(workers, chunks, config.ray.max_in_flight_per_worker, on_result):
            bar.update(n)
        bar.close()
        relax_seconds = time.perf_counter() - relax_start
        symbols = {
            el.symbol
            for rec in store.records()
            if rec["status"] == "ok" and rec["formula"]
            for el in Composition(rec["formula"]).elements
        }
        refs = resolve_references(config, out, workers, symbols, potential_info["weights_hash"])
        (out / "reference_energies.json").write_text(json.dumps(refs.as_dict(), indent=1))
        tracker.set_tags(
            {
                "energy_references": refs.source,
                "energy_offsets": "fitted" if refs.offsets else "none",
                "energy_offsets_loeo_mae": refs.calibration.get("mae_leave_one_element_out", "n/a"),
            }
        )
        training = ray.get(workers[0].training_elements.remote())
        compute_stability(store, refs, ReferenceTable.load(), training)
        csv_path = store.export_csv(out / "results.csv")
        _add_predicted_gaps(csv_path)
        records = list(store.records())
        ok = [r for r in records if r["status"] == "ok"]
        stable = [
            r for r in ok if r["e_above_hull"] is not None and r["e_above_hull"] <= config.stability.stable_threshold
        ]
        below = [
            {k: r[k] for k in ("id", "formula", "e_above_hull", "warning")}
            for r in sorted(ok, key=lambda r: (r["e_above_hull"] if r["e_above_hull"] is not None else 0.0, r["id"]))
            if r["e_above_hull"] is not None and r["e_above_hull"] < BELOW_HULL_WARNING
        ]
        n_warnings = sum(1 for r in ok if r.get("warning"))
        seconds = time.perf_counter() - start
        stable_dir = out / "stable_structures"
        stable_dir.mkdir(exist_ok=True)
        for r in stable:
            src = structures_dir / f"{r['id']}.cif"
            if src.is_file():
                (stable_dir / src.name).write_text(src.read_text())
        tracker.log_metrics(
            {
                "n_candidates": len(records),
                "n_ok": len(ok),
                "n_failed": len(records) - len(ok),
                "n_stable": len(stable),
                "n_below_known_hull": len(below),
                "n_warnings": n_warnings,
                "n_relaxed_this_run": len(todo),
                "seconds": seconds,
                "relax_seconds": relax_seconds,
                "throughput_structures_per_s": len(todo) / relax_seconds if todo and relax_seconds > 0 else 0.0,
            }
        )
        tracker.log_artifact(csv_path)
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "reference_energies.json")
        plot = _ehull_plot(ok, config.stability.stable_threshold, out / "e_above_hull.png")
        if plot is not None:
            tracker.log_artifact(plot)
        tracker.log_artifacts(stable_dir, "stable_structures")
        top = sorted((r for r in ok if r["e_above_hull"] is not None), key=lambda r: (r["e_above_hull"], r["id"]))[:10]
        status = "FINISHED"
        return ScreenSummary(
            out,
            len(records),
            len(ok),
            len(records) - len(ok),
            len(stable),
            len(todo),
            seconds,
            refs.as_dict(),
            tracker.run_id,
            top,
            below,
            n_warnings,
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipelines.interrupts): what is stored stays
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status)
        store.close()
        if started_ray:
            ray.shutdown()
