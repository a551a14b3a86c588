"""``semidisc dft``: GPAW calculations as Ray tasks, written as they finish, resumable, tracked in MLflow.

Inputs: structure files (``--structures DIR|FILE``) or the K most stable candidates of a screen
(``--from-run OUT --top K``). Elemental references (same settings) are computed first, one task per element,
and cached in ``<out>/dft_references``; then each structure is relaxed and/or gets a band gap.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from materials.dft import gpaw as dft
from materials.dft import importers as dft_import
from materials.dft.gpaw import DFTSettings
from materials.errors import InputError
from materials.potentials.finetune import RelaxRecorder, result_frames
from materials.structures.inputs import load_structure_dir, read_structure
from pipelines.config import RaySettings, TrackingSettings, _Strict, load_yaml_config
from pipelines.store import SQLiteStore

#: Columns of dft_results.csv. Energies eV/atom (e_form_per_atom includes mp2020_correction_per_atom when one was
#: applied), lengths Å, volumes Å^3/atom, gaps eV; run_type GGA or GGA+U, hubbard_u element -> U (eV) as JSON;
#: magnetic_moment μB per computed cell, site_magmoms μB per site as a JSON list; magnetic_ordering FM, AFM-...,
#: NM, or empty when no ordering was searched.
DFT_COLUMNS = (
    "id",
    "formula",
    "task",
    "status",
    "failure_reason",
    "n_atoms",
    "energy_per_atom",
    "e_form_per_atom",
    "run_type",
    "hubbard_u",
    "mp2020_correction_per_atom",
    "a",
    "b",
    "c",
    "volume_per_atom",
    "band_gap",
    "scf_gap",
    "gap_ks",
    "gap_discontinuity",
    "gap_functional",
    "gap_direct",
    "vbm",
    "cbm",
    "magnetic_ordering",
    "magnetic_moment",
    "site_magmoms",
    "converged",
    "max_force",
    "n_scf_iterations",
    "ionic_steps",
    "seconds",
    "log_path",
    "settings_hash",
    "functional",
)
#: Band-gap fields a separate band-gap run adds to a relaxation's or single point's record.
GAP_FIELDS = (
    "band_gap",
    "gap_ks",
    "gap_discontinuity",
    "gap_functional",
    "direct_gap",
    "gap_direct",
    "vbm",
    "cbm",
    "fermi_level",
)


class DFTConfig(_Strict):
    name: str = "dft"
    dft: DFTSettings = Field(default_factory=DFTSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="semidisc-dft"))


def load_dft_config(path: str | Path | None) -> DFTConfig:
    return DFTConfig() if path is None else load_yaml_config(DFTConfig, path)


@dataclass
class DFTItem:
    id: str
    source: str
    structure: dict[str, Any] | None
    error: str | None = None


def items_from_inputs(structures: str | None, from_run: str | None, top: int | None) -> list[DFTItem]:
    """Structures to compute: files, or the ``top`` lowest-E_hull ok candidates of a screen output folder."""
    if structures:
        path = Path(structures)
        if path.is_file():
            return [DFTItem(path.stem, str(path), read_structure(path).as_dict())]
        return [
            DFTItem(e.id, e.source, e.structure.as_dict() if e.structure else None, e.error)
            for e in load_structure_dir(path)
        ]
    if not from_run:
        raise InputError("give --structures DIR|FILE or --from-run SCREEN_OUT --top K")
    run = Path(from_run)
    results = run / "results.csv"
    if not results.is_file():
        raise FileNotFoundError(f"--from-run {run}: no results.csv (give a screen's --out folder)")
    rows = [r for r in csv.DictReader(results.open()) if r["status"] == "ok" and r["e_above_hull"] not in ("", None)]
    rows.sort(key=lambda r: (float(r["e_above_hull"]), r["id"]))
    out = []
    for row in rows[: top or 5]:
        cif = run / "structures" / f"{row['id']}.cif"
        if cif.is_file():
            out.append(DFTItem(row["id"], str(cif), read_structure(cif).as_dict()))
        else:
            out.append(DFTItem(row["id"], str(cif), None, f"relaxed structure {cif} not found"))
    return out


def dft_task(
    item: DFTItem,
    settings: DFTSettings,
    *,
    do_relax: bool,
    do_gap: bool,
    log_dir: str,
    ref_dir: str,
    keep_frames: bool = False,
    reference_errors: dict[str, str] | None = None,
):
    """One structure: relax and/or band gap (else a single point), then E_form; returns DFTResult.as_dict(),
    with ``frames`` (labelled ASE Atoms for fine-tuning: every ionic step of a relaxation, else the computed
    geometry; see :mod:`materials.potentials.finetune`) when ``keep_frames``. ``reference_errors`` (element -> reason,
    from
    :func:`compute_references`) names references that already failed: no formation energy is attempted for a
    structure containing one (a note says why), so a failing reference is not recomputed by every task.

    Energies and forces always come from ``settings.xc``: a GLLB-SC band gap (``settings.gap_functional``) is a
    separate run whose gap fields (``GAP_FIELDS``) join the record of the relaxation or single point."""
    from pymatgen.core import Structure

    structure = Structure.from_dict(item.structure)
    log = Path(log_dir) / f"{item.id}.txt"
    recorder = RelaxRecorder(settings, item.id) if keep_frames and do_relax else None
    separate_gap = do_gap and (do_relax or settings.gap_functional != "ks")
    ordering, ordering_notes, ground, run_settings = "", [], None, settings
    if dft.is_spin_polarised(structure, settings) and dft.given_magmoms(structure) is None:
        # magnetic without a given order: the lowest of FM and the simplest AFM orderings, then the work on it
        ordering, ground, ordering_notes = dft.magnetic_ground_state(structure, settings, item.id, log_dir)
        if ground.status == "ok":
            structure = ground.structure
            if ordering == "NM":  # every moment vanished: the rest needs no second spin channel
                structure.remove_site_property("magmom")
                run_settings = replace(settings, spinpol=False)
    # a ground state found only with the orbital symmetry broken (FeO) is kept that way in every later SCF
    broken = ground is not None and ground.symmetry_broken
    if ground is not None and (ground.status != "ok" or not (do_relax or do_gap)):
        result = ground
    elif do_relax:
        result = dft.relax(
            structure, run_settings, item_id=item.id, log_path=log, on_step=recorder, break_symmetry=broken
        )
    elif do_gap and not separate_gap:
        result = dft.band_gap(structure, run_settings, item_id=item.id, log_path=log, break_symmetry=broken)
    else:
        result = dft.single_point(structure, run_settings, item_id=item.id, log_path=log, break_symmetry=broken)
    if (
        ground is not None
        and result is not ground
        and not do_relax
        and not broken
        and result.status == "ok"
        and result.energy_per_atom > ground.energy_per_atom + dft.SCF_STATE_TOLERANCE
    ):
        # same geometry, higher energy: this SCF fell into a metastable state the ground-state search did not
        # (FeO's metal); redo it from a symmetry-broken start and keep the lower
        task = dft.band_gap if result.task == "band_gap" else dft.single_point
        retry = task(
            structure,
            run_settings,
            item_id=item.id,
            log_path=log.with_name(f"{item.id}_broken.txt"),
            break_symmetry=True,
        )
        excess = result.energy_per_atom - ground.energy_per_atom
        if retry.status == "ok" and retry.energy_per_atom < result.energy_per_atom:
            retry.notes.insert(
                0,
                f"the {result.task} SCF ended {excess:+.4f} eV/atom above the magnetic ground state; redone from a "
                f"symmetry-broken start: {retry.energy_per_atom - ground.energy_per_atom:+.4f} eV/atom",
            )
            result = retry
        else:
            result.notes.append(
                f"the {result.task} SCF ended {excess:+.4f} eV/atom above the magnetic ground state (a metastable "
                "state); a symmetry-broken retry did not go lower"
                + (f": {retry.failure_reason}" if retry.status != "ok" else "")
            )
    if run_settings is not settings:  # NM: the same science as asked (spinpol automatic), one spin channel
        result.settings_hash = dft.settings_hash(settings)
    if ordering:
        result.magnetic_ordering = ordering
        result.notes[:0] = ordering_notes
    if separate_gap and result.status == "ok":
        gap = dft.band_gap(
            result.structure,
            run_settings,
            item_id=item.id,
            log_path=log.with_name(f"{item.id}_gap.txt"),
            break_symmetry=broken,
        )
        result.seconds += gap.seconds
        if gap.status == "ok":
            for key in GAP_FIELDS:
                setattr(result, key, getattr(gap, key))
            result.notes.extend(note for note in gap.notes if note.startswith("GLLB-SC"))
        else:
            result.notes.append(f"band gap failed: {gap.failure_reason}")
    failed_refs = {
        s: r for s, r in (reference_errors or {}).items() if r and s in {e.symbol for e in structure.species}
    }
    if result.status == "ok" and failed_refs:
        reasons = "; ".join(failed_refs[s] for s in sorted(failed_refs))
        result.notes.append(f"no formation energy: reference(s) {', '.join(sorted(failed_refs))} failed: {reasons}")
    elif result.status == "ok":
        try:
            result.e_form_per_atom = dft.gpaw_formation_energy_per_atom(result, settings, ref_dir)
            if settings.mp2020:
                result.mp2020_correction_per_atom = dft.mp2020_correction_per_atom(
                    result.structure.composition, settings, result.hubbard_u
                )
                result.notes.extend(dft.u_correction_notes(result.structure.composition, settings, result.hubbard_u))
        except (ValueError, dft.DFTReferenceError) as exc:
            result.notes.append(f"no formation energy: {exc}")
    out = result.as_dict()
    if keep_frames:
        # a relaxation that failed part-way still leaves its finished steps as data
        out["frames"] = recorder.frames if recorder is not None else result_frames(result, settings, item.id)
    return out


def _reference_task(symbol: str, settings: DFTSettings, ref_dir: str) -> tuple[str, str | None]:
    try:
        dft.elemental_reference_energy(symbol, settings, ref_dir)
        return symbol, None
    except dft.DFTReferenceError as exc:
        return symbol, str(exc)


def compute_references(symbols: Iterable[str], settings: DFTSettings, ref_dir: str | Path) -> dict[str, str | None]:
    """Elemental references of ``symbols`` with ``settings``, one Ray task per element (Ray initialised by the
    caller), each computed once and cached in ``ref_dir`` (:func:`materials.dft.gpaw.elemental_reference_energy`;
    a cached one returns at once). Blocks until all are done, so that the structure tasks started afterwards
    find them cached instead of each relaxing the same reference. Returns element -> failure reason (None: ok).
    """
    import ray

    task = ray.remote(num_cpus=1)(_reference_task)
    return dict(ray.get([task.remote(s, settings, str(ref_dir)) for s in sorted(set(symbols))]))


def structure_elements(items: Iterable[DFTItem]) -> list[str]:
    """Sorted element symbols of the items' structures (items without a structure are skipped)."""
    from pymatgen.core import Structure

    return sorted(
        {el.symbol for it in items if it.structure is not None for el in Structure.from_dict(it.structure).composition}
    )


class DFTStore(SQLiteStore):
    """``<out>/dft_results.sqlite``: one JSON record per id, committed as each arrives."""

    SCHEMA = "CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, record TEXT);"

    def write(self, record: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (record["id"], json.dumps(record)))
        self._db.commit()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._db.execute("SELECT record FROM results ORDER BY id")]


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def write_results_csv(path: Path, records: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """``dft_results.csv``: one row per record, ``columns`` in order (NaN and None as empty cells)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: _csv_value(rec.get(k)) for k in columns})
    return path


def run_dft(
    config: DFTConfig,
    structures: str | None = None,
    from_run: str | None = None,
    top: int | None = None,
    relax: bool = False,
    bandgap: bool = False,
    out_dir: str | Path = "runs/dft",
) -> dict[str, Any]:
    """Run (or resume: finished ids are skipped) the calculations; returns a summary dict."""
    import ray

    from pipelines.execution import as_completed, init_ray
    from pipelines.tracking import Tracker, git_commit, redact

    start = time.perf_counter()
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ref_dir = out / "dft_references"
    ref_dir.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))
    items = items_from_inputs(structures, from_run, top)
    store = DFTStore(out / "dft_results.sqlite")
    done = {r["id"] for r in store.records()}
    for item in items:
        if item.structure is None and item.id not in done:
            store.write(
                {
                    "id": item.id,
                    "formula": None,
                    "task": "input",
                    "status": "failed",
                    "failure_reason": f"rejected: {item.error}",
                }
            )
    todo = [it for it in items if it.structure is not None and it.id not in done]
    tracker = Tracker(config.tracking, run_name=config.name)
    started = False
    status = "FAILED"
    try:
        started = init_ray(config.ray) if todo else False  # a rerun with everything stored needs no Ray
        tracker.log_params(
            {f"dft.{k}": v for k, v in config.dft.__dict__.items()}
            | {"relax": relax, "bandgap": bandgap, "n_items": len(items)}
        )
        tracker.set_tags({"git_commit": git_commit()})
        ref_errors = compute_references(structure_elements(todo), config.dft, ref_dir) if todo else {}
        task = ray.remote(num_cpus=1, max_retries=1)(dft_task)
        refs = {
            task.remote(
                it,
                config.dft,
                do_relax=relax,
                do_gap=bandgap,
                log_dir=str(out / "logs"),
                ref_dir=str(ref_dir),
                reference_errors=ref_errors,
            ): it
            for it in todo
        }
        for item, record, reason in as_completed(refs):
            if reason is not None:
                record = {"id": item.id, "formula": None, "task": "dft", "status": "failed", "failure_reason": reason}
            store.write(record)
            print(f"  {record['id']}: {record['status']} {record.get('failure_reason') or ''}".rstrip(), flush=True)
        records = store.records()
        csv_path = write_results_csv(out / "dft_results.csv", records, DFT_COLUMNS)
        n_ok = sum(r["status"] == "ok" for r in records)
        tracker.log_metrics(
            {
                "n_items": len(records),
                "n_ok": n_ok,
                "n_failed": len(records) - n_ok,
                "seconds": time.perf_counter() - start,
            }
        )
        tracker.log_artifact(csv_path)
        tracker.log_artifacts(out / "logs", "gpaw_logs")
        status = "FINISHED"
        return {
            "out_dir": out,
            "n_items": len(records),
            "n_ok": n_ok,
            "records": records,
            "reference_errors": {k: v for k, v in ref_errors.items() if v},
            "mlflow_run_id": tracker.run_id,
        }
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipelines.interrupts): what is stored stays
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        store.close()
        if started:
            ray.shutdown()


def write_imported(paths: list[str], out_dir: str | Path, formation: bool = True) -> dict[str, Any]:
    """``semidisc import-dft``: existing DFT (vasprun.xml, extxyz) -> ``dft_results.csv`` (the columns of
    ``semidisc dft``, ``functional`` taken from the files, plus code, source, notes), ``structures.extxyz``
    (energies, forces, stress: a training set) and ``import_failures.csv`` (file or frame, reason)."""
    from ase.io import write

    result = dft_import.import_dft(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    formation_error = None
    if formation:
        try:
            dft_import.formation_energies(result.records)
        except dft_import.DFTImportError as exc:
            formation_error = str(exc)
    rows = dft_import.as_result_rows(result.records)
    write_results_csv(out / "dft_results.csv", rows, (*DFT_COLUMNS, "code", "source", "notes"))
    write(str(out / "structures.extxyz"), [rec.to_atoms() for rec in result.records], format="extxyz")
    with (out / "import_failures.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["where", "reason"])
        writer.writerows(result.failures)
    return {
        "out_dir": out,
        "records": rows,
        "failures": result.failures,
        "formation_error": formation_error,
        "data_hash": dft_import.data_hash(result.records),
    }
