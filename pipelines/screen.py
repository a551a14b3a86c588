"""The screen: candidates (or user files) -> checks -> MLIP relaxation on Ray -> stability -> store + MLflow.

Results are written to ``<out>/results.sqlite`` as each chunk finishes; ``resume=True`` skips finished items.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import pickle
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from pymatgen.core import Composition
from tqdm import tqdm

from materials.datasets.sustainability import (
    SUSTAINABILITY_COLUMNS,
    SupplyRiskSummary,
    gap_supply_figure,
    supply_risk_summary,
    sustainability_rows,
)
from materials.errors import InputError
from materials.potentials.calculators import PotentialSpec
from materials.structures.candidates import iter_candidates
from materials.structures.inputs import STRUCTURE_SUFFIXES, StructureCheckError, is_structure_file, read_structure
from materials.thermo.stability import (
    BELOW_HULL_WARNING,
    ElementalEnergies,
    HullTable,
    StreamingStability,
    mp_references,
    shipped_element_offsets,
)
from pipelines.config import ScreenConfig
from pipelines.environments import check_potential
from pipelines.execution import WorkItem, init_ray, make_workers, run_chunks
from pipelines.store import ResultStore, ScreenRow
from pipelines.tracking import Tracker, git_commit, redact

log = logging.getLogger(__name__)


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
    #: where this run's time went, s: ``read_seconds`` (inputs read or built, in the driver), ``dispatch_seconds``
    #: (first dispatch to last result), ``write_seconds`` (storing results and writing CIF files),
    #: ``stability_seconds``, ``csv_seconds``, ``total_seconds``; ``chunks``: [s since dispatch start, items] per chunk
    timings: dict[str, Any] = field(default_factory=dict)
    #: the stable candidates split by supply risk (``materials.datasets.sustainability.SupplyRiskSummary``;
    #: None: no rows)
    supply: SupplyRiskSummary | None = None


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


@dataclass
class WorkInputs:
    """A screen's inputs, produced lazily: ``entries`` yields a :class:`WorkItem` (its structure dict made only
    when it is reached) or, for an input that failed before any simulation (an unreadable file), its failed
    record. ``total`` is the number of inputs when known without reading them (files in the folder, at most
    ``limit``), else None."""

    entries: Iterator[WorkItem | ScreenRow]
    total: int | None


def iter_work_items(config: ScreenConfig, structures: str | None, limit: int | None) -> WorkInputs:
    """The screen's inputs, streamed: files are read and candidates built one at a time as they are consumed.

    What can be checked without building anything is checked here, at once (``limit``, the folder holds
    structure files, the candidate settings); a file that cannot be read becomes a failed row when reached.
    ``limit`` counts readable items, and every unreadable file of the folder is recorded as failed, within the
    limit or not.

    Raises:
        InputError: ``limit`` below 1, no candidates, an unreadable structures folder, bad candidate settings.
    """
    _check_limit(limit)
    if structures:
        files = _structure_files(structures)
        total = len(files) if limit is None else min(limit, len(files))
        return WorkInputs(_file_entries(files, limit), total)
    if not config.candidates.prototypes:
        raise InputError(
            "candidates.prototypes is empty: list prototypes and elements in the config, or pass --structures DIR"
        )
    cands = iter_candidates(
        config.candidates.prototypes, max_candidates=config.candidates.max_candidates, dedup=config.candidates.dedup
    )
    items = (WorkItem(c.id, c.formula, c.prototype, c.source, c.structure.as_dict()) for c in cands)
    return WorkInputs(itertools.islice(items, limit) if limit is not None else items, None)


def _structure_files(directory: str | Path) -> list[str]:
    """The paths of the structure files of a folder, sorted by name (not recursive), as
    :func:`materials.structures.inputs.load_structure_dir` lists them, without reading them (kept as strings: a
    ``Path`` object costs several times the memory, and a folder may hold 100,000 files).

    Raises:
        FileNotFoundError: not a folder, or no structure file in it (the message says what is looked for).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--structures {directory}: not a directory; give a folder of CIF/POSCAR/extxyz files")
    files = sorted(str(p) for p in directory.iterdir() if is_structure_file(p))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no structure files found (looked for {', '.join(STRUCTURE_SUFFIXES)}, POSCAR*, CONTCAR*)"
        )
    return files


def _file_entries(files: list[str], limit: int | None) -> Iterator[WorkItem | ScreenRow]:
    """Read ``files`` one at a time. Ids are the file stems, a repeated stem gets its suffix appended (as
    :func:`materials.structures.inputs.load_structure_dir` names them). Past ``limit`` readable items a file is still
    read, to record it if it fails, as a full read of the folder did."""
    stems = sorted(Path(p).stem for p in files)
    repeated = {a for a, b in zip(stems, stems[1:], strict=False) if a == b}  # only these need remembering
    del stems
    seen: set[str] = set()
    n_items = 0
    for name in files:
        path = Path(name)
        item_id = path.stem
        if item_id in repeated or item_id in seen:
            item_id = path.stem if path.stem not in seen else path.name
            seen.add(item_id)
        try:
            structure = read_structure(path)
        except StructureCheckError as exc:
            yield ScreenRow(item_id, None, "failed", f"rejected: {exc}", "user", str(path))
            continue
        if limit is not None and n_items >= limit:
            continue
        n_items += 1
        yield WorkItem(item_id, structure.composition.reduced_formula, "user", str(path), structure.as_dict())


def _check_limit(limit: int | None) -> None:
    # a slice would read -1 as "all but the last" and 0 as "nothing" (an empty run logged to MLflow)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit={limit!r}: give a whole number >= 1 of items to screen, or None for all")


def resolve_references(
    config: ScreenConfig, out_dir: Path, workers: list, symbols: set[str], potential_hash: str
) -> ElementalEnergies:
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
            cached = ElementalEnergies.from_dict(json.loads(cache.read_text()))
            if cached.offsets and cached.convention == convention and cached.potential == label:
                return cached
        return ElementalEnergies.from_dict(ray.get(workers[0].element_offsets.remote(refs.as_dict())))
    cache = out_dir / "reference_energies.json"
    refs = ElementalEnergies(convention="self", potential=label, mu={}, source="model")
    if cache.is_file():
        cached = ElementalEnergies.from_dict(json.loads(cache.read_text()))
        if cached.convention == "self" and cached.potential == label:
            refs = cached
    todo = sorted(symbols - set(refs.mu) - set(refs.missing))
    if todo:
        new = ElementalEnergies.from_dict(ray.get(workers[0].elemental_references.remote(todo)))
        refs.mu.update(new.mu)
        refs.missing.update(new.missing)
    return refs


class _TodoChunks:
    """Chunks of the work items not stored yet, made as the dispatcher asks for them (never the whole screen).

    Inputs are read in blocks; each block's ids are looked up in the store (a resumed screen skips what it holds),
    its failed records (unreadable files) stored, and its work items cut into chunks of ``size``. Time spent
    here (reading files, building structures, the lookups) is added to ``timings["read_seconds"]``."""

    def __init__(self, entries: Iterator[WorkItem | ScreenRow], store: ResultStore, size: int, timings: dict[str, Any]):
        self.entries = entries
        self.store = store
        self.size = size
        self.timings = timings
        self.n_items = 0

    def __iter__(self) -> Iterator[list[WorkItem]]:
        pending: list[WorkItem] = []
        blocks = _batched(self.entries, max(self.size, 256))
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            if block is None:
                break
            done = self.store.stored_ids(e.id for e in block)
            failed = [e for e in block if isinstance(e, ScreenRow) and e.id not in done]
            if failed:
                self.store.write(failed)
            pending.extend(e for e in block if isinstance(e, WorkItem) and e.id not in done)
            del block
            self.timings["read_seconds"] += time.perf_counter() - t0
            while len(pending) >= self.size:
                chunk, pending = pending[: self.size], pending[self.size :]
                self.n_items += len(chunk)
                yield chunk
        if pending:
            self.n_items += len(pending)
            yield pending


def _write_results_csv(store: ResultStore, path: Path, timings: dict[str, Any] | None = None) -> Path:
    """results.csv row by row, with the band-gap GNN columns (gap_pbe, gap_pbe_std, gap_expt, gap_expt_std,
    p_metal, ...; without them, and a warning, when no model can be used) and the supply-chain columns of
    :mod:`materials.datasets.sustainability`, each computed once per distinct formula."""
    formulas = store.distinct_formulas()
    supply = dict(zip(formulas, sustainability_rows(formulas), strict=True))
    supply[""] = dict.fromkeys(SUSTAINABILITY_COLUMNS)
    predictions: dict[str, dict[str, Any]] = {}
    gap_columns: list[str] = []
    start = time.perf_counter()
    try:
        from materials.ml.bandgap import PREDICTION_COLUMNS, BandGapError, predict_gaps  # torch-geometric: only here
    except ImportError as exc:  # the band-gap stack is optional for a screen
        log.warning("no band-gap predictions in %s: %s", path, exc)
    else:
        try:
            predictions = dict(zip(formulas, predict_gaps(formulas), strict=True)) if formulas else {}
            if store.count("formula IS NULL"):
                predictions[""] = predict_gaps([""])[0]
            gap_columns = list(PREDICTION_COLUMNS)
        except (BandGapError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            log.warning("no band-gap predictions in %s: %s", path, exc)
            predictions = {}
    if timings is not None:  # the model's load and one prediction per distinct formula
        timings["gap_prediction_seconds"] = time.perf_counter() - start
    columns = [*gap_columns, *SUSTAINABILITY_COLUMNS]

    def cells(rec: dict[str, Any]) -> dict[str, Any]:
        formula = rec.get("formula") or ""
        row = {c: _gap_cell(predictions[formula][c]) for c in gap_columns}
        return row | {c: _gap_cell(v) for c, v in supply[formula].items()}

    return store.export_csv(path, columns, cells)


def _supply_report(csv_path: Path, stable_threshold: float, out: Path) -> SupplyRiskSummary:
    """The stable candidates of results.csv split by supply risk (read row by row): ``supply_risk.json`` (counts
    and the low-risk candidates) and the plot ``gap_vs_supply_risk.png`` (when any stable candidate has a gap and
    an HHI; an older one is removed otherwise)."""
    with csv_path.open(newline="") as handle:
        summary = supply_risk_summary(csv.DictReader(handle), stable_threshold)
    report = summary.as_dict() | {
        "definition": "stable, production HHI below the screen median, no toxic element",
        "low_supply_risk": [
            {
                "id": c.id,
                "formula": c.formula,
                "e_above_hull": c.e_above_hull,
                "gap_expt": c.gap,
                "hhi_production": c.hhi_production,
            }
            for c in summary.low_risk
        ],
    }
    (out / "supply_risk.json").write_text(json.dumps(report, indent=1))
    plot = out / "gap_vs_supply_risk.png"
    if gap_supply_figure(summary, plot) is None:
        plot.unlink(missing_ok=True)
    return summary


def _gap_cell(value: Any) -> Any:
    """As ``pipelines.train_gap.add_gap_columns`` writes a predicted number: 4 decimals, empty for NaN/None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(value, 4) if isinstance(value, float) else value


#: records per batch of the stability step (read from the store, assessed, written back)
STABILITY_BATCH = 5000


def compute_stability(
    store: ResultStore,
    refs: ElementalEnergies,
    table: HullTable,
    training_elements: frozenset[str] | None,
    batch_size: int = STABILITY_BATCH,
) -> None:
    """Formation energy, signed E_hull, E_hull against the screen's own hull, and warnings for every ok record.

    Streams: the records are read and written back in batches (:class:`materials.thermo.stability.StreamingStability`,
    the numbers of :func:`materials.thermo.stability.assess_stability`); what is held between batches grows with the
    number of distinct compositions, not of records."""
    stream = StreamingStability(refs, table, training_elements)
    compositions = _Compositions()
    rows = store.columns(("id", "formula", "energy_per_atom"), "status = 'ok' AND energy_per_atom IS NOT NULL")
    for batch in _batched(rows, batch_size):
        energies = {}
        for item_id, formula, energy_per_atom in batch:
            comp = compositions(formula)
            energies[item_id] = (comp, energy_per_atom * comp.num_atoms)
        store.update_stability(stream.assess(energies), refs.convention)
    if not stream.needs_second_pass:
        return
    rows = store.columns(("id", "formula", "e_form_per_atom"), "status = 'ok' AND e_form_per_atom IS NOT NULL")
    for batch in _batched(rows, batch_size):
        values = stream.screen_distances((i, compositions(f), e) for i, f, e in batch)
        if values:
            store.update_screen_hull(values)


class _Compositions:
    """Composition of a formula, parsed once per formula (a screen has far fewer formulas than records)."""

    def __init__(self) -> None:
        self._cache: dict[str, Composition] = {}

    def __call__(self, formula: str) -> Composition:
        comp = self._cache.get(formula)
        if comp is None:
            comp = self._cache[formula] = Composition(formula)
        return comp


def _batched(iterable: Iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _write_structure_files(records: list[ScreenRow], folder: Path) -> None:
    """Each relaxed structure as ``<id>.cif``, the CIF text the worker made."""
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        if rec.cif is not None:
            (folder / f"{rec.id}.cif").write_text(rec.cif)


def _ehull_plot(store: ResultStore, threshold: float, path: Path) -> Path | None:
    import numpy as np

    values = np.fromiter(
        (v for (v,) in store.columns(("e_above_hull",), "status = 'ok' AND e_above_hull IS NOT NULL")), dtype=float
    )
    if not values.size:
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


def check_potential_loads(spec: PotentialSpec, environments: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load the potential once on the CPU (in the driver, or in its own environment for SevenNet), so that a wrong
    name, a missing file, weights that cannot be downloaded or an environment not built fail at once with one
    message, before any Ray work starts (inside an actor they would surface a minute later as a traceback or as
    every row failing). Returns the potential's ``weights_hash`` and ``elements``.

    Raises:
        PotentialError: the potential cannot be loaded; the message says how to fix it.
    """
    return check_potential(spec, environments)


def _check_resume(store: ResultStore, out: Path, fingerprint: str, resume: bool) -> int:
    """The number of results ``store`` holds, once it is clear this screen may write there.

    Raises:
        ResumeError: the store holds results of another screen, or of this one without ``resume``.
    """
    previous = store.get_meta("fingerprint")
    n_stored = len(store)
    if previous is not None and previous != fingerprint:
        if n_stored:
            raise ResumeError(f"{out} holds a screen with different settings or inputs; use another --out")
        store.set_meta("mlflow_run_id", None)  # an earlier start that stored nothing: reuse the folder
    if previous == fingerprint and not resume and n_stored:
        raise ResumeError(
            f"{out} already holds {n_stored} results of this screen; "
            "pass --resume to continue it, or choose another --out"
        )
    return n_stored


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
    inputs = iter_work_items(config, structures, limit)
    # a folder that already holds a store is judged first: refusing it costs no potential load
    store_path = out / "results.sqlite"
    store = ResultStore(store_path) if store_path.is_file() else None
    try:
        n_stored = _check_resume(store, out, fingerprint, resume) if store is not None else 0
        potential_info = check_potential_loads(config.potential, config.ray.environments)
    except BaseException:
        if store is not None:
            store.close()
        raise
    if store is None:
        out.mkdir(parents=True, exist_ok=True)
        store = ResultStore(store_path)
    store.set_meta("fingerprint", fingerprint)
    (out / "config.yaml").write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))

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
        timings: dict[str, Any] = {"read_seconds": 0.0, "write_seconds": 0.0, "chunks": []}
        relax_start = time.perf_counter()

        def on_result(records: list[ScreenRow]) -> None:
            t0 = time.perf_counter()
            store.write(records)
            _write_structure_files(records, structures_dir)
            t1 = time.perf_counter()
            timings["write_seconds"] += t1 - t0
            timings["chunks"].append([round(t1 - relax_start, 3), len(records)])

        todo = _TodoChunks(inputs.entries, store, config.ray.chunk_size, timings)
        total = inputs.total
        bar = tqdm(
            total=total, initial=min(n_stored, total or n_stored), desc="relax", unit="struct", disable=not progress
        )
        for n in run_chunks(workers, todo, config.ray.max_in_flight_per_worker, on_result):
            bar.update(n)
        bar.close()
        relax_seconds = time.perf_counter() - relax_start
        timings["dispatch_seconds"] = relax_seconds
        n_todo = todo.n_items
        symbols = {
            el.symbol for formula in store.distinct_formulas("status = 'ok'") for el in Composition(formula).elements
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
        t0 = time.perf_counter()
        table = HullTable.load()
        t1 = time.perf_counter()
        compute_stability(store, refs, table, training)
        t2 = time.perf_counter()
        csv_path = _write_results_csv(store, out / "results.csv", timings)
        timings.update(reference_table_seconds=t1 - t0, stability_seconds=t2 - t1, csv_seconds=time.perf_counter() - t2)
        supply = _supply_report(csv_path, config.stability.stable_threshold, out)
        # the summary from SQL queries: no list of every record in memory
        n_records = len(store)
        n_ok = store.count("status = 'ok'")
        stable_where = "status = 'ok' AND e_above_hull IS NOT NULL AND e_above_hull <= ?"
        threshold = (config.stability.stable_threshold,)
        n_stable = store.count(stable_where, threshold)
        below = [
            {k: r[k] for k in ("id", "formula", "e_above_hull", "warning")}
            for r in store.records(
                where="status = 'ok' AND e_above_hull IS NOT NULL AND e_above_hull < ?",
                params=(BELOW_HULL_WARNING,),
                order_by='e_above_hull, "id"',
            )
        ]
        n_warnings = store.count("status = 'ok' AND warning IS NOT NULL AND warning != ''")
        seconds = time.perf_counter() - start
        stable_dir = out / "stable_structures"
        stable_dir.mkdir(exist_ok=True)
        for (item_id,) in store.columns(("id",), stable_where, threshold):
            src = structures_dir / f"{item_id}.cif"
            if src.is_file():
                (stable_dir / src.name).write_text(src.read_text())
        tracker.log_metrics(
            {
                "n_candidates": n_records,
                "n_ok": n_ok,
                "n_failed": n_records - n_ok,
                "n_stable": n_stable,
                "n_below_known_hull": len(below),
                "n_warnings": n_warnings,
                "n_relaxed_this_run": n_todo,
                "seconds": seconds,
                "relax_seconds": relax_seconds,
                "throughput_structures_per_s": n_todo / relax_seconds if n_todo and relax_seconds > 0 else 0.0,
                **{
                    f"supply_{k}": v
                    for k, v in supply.as_dict().items()
                    if k not in ("stable_threshold", "n_stable", "n_relaxed") and v is not None
                },
            }
        )
        tracker.log_artifact(out / "supply_risk.json")
        if (out / "gap_vs_supply_risk.png").is_file():
            tracker.log_artifact(out / "gap_vs_supply_risk.png")
        tracker.log_artifact(csv_path)
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "reference_energies.json")
        plot = _ehull_plot(store, config.stability.stable_threshold, out / "e_above_hull.png")
        if plot is not None:
            tracker.log_artifact(plot)
        tracker.log_artifacts(stable_dir, "stable_structures")
        top = list(
            store.records(where="status = 'ok' AND e_above_hull IS NOT NULL", order_by='e_above_hull, "id"', limit=10)
        )
        status = "FINISHED"
        timings.update(
            {k: round(v, 3) for k, v in timings.items() if isinstance(v, float)},
            total_seconds=round(time.perf_counter() - start, 3),
        )
        return ScreenSummary(
            out,
            n_records,
            n_ok,
            n_records - n_ok,
            n_stable,
            n_todo,
            seconds,
            refs.as_dict(),
            tracker.run_id,
            top,
            below,
            n_warnings,
            timings,
            supply,
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
