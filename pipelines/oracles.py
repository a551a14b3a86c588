"""Oracles: what evaluates a proposed candidate. One interface, three kinds.

* ``table``: labels looked up in a labelled CSV (benchmarking a campaign at no cost);
* ``mlip``: the MLIP screening values (E_form, E_hull) of a generated pool;
* ``dft``: GPAW DFT on the candidates' structures (``materials/dft/gpaw.py``), one Ray task each.

``evaluate`` yields ``(pool_index, OracleOutcome)`` as results arrive, so the campaign writes each label the
moment it exists. The DFT oracle runs each candidate as a Ray task; the row oracles look labels up in the driver
(a dict lookup: a Ray task per lookup cost ~1.5 s of worker start-up each and computed nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import ray

from materials.errors import InputError
from materials.potentials.finetune import write_frames
from materials.serialise import Record
from materials.structures.inputs import read_structure
from pipelines.execution import as_completed


class OracleError(InputError):
    """The oracle cannot serve the campaign (e.g. the objective names a column it does not have)."""


@dataclass
class OracleOutcome(Record):
    """What an oracle says about one candidate.

    Attributes:
        status: ``ok`` (every label column has a finite number) or ``failed``.
        failure_reason: why it failed (None when ok): the missing columns, the DFT error, the task's crash.
        labels: label column -> value (eV, eV/atom, ... as the column says; NaN where there is no number).
    """

    status: Literal["ok", "failed"]
    failure_reason: str | None = None
    labels: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Oracle(Protocol):
    kind: str

    def label_columns(self) -> list[str]: ...

    def evaluate(self, indices: Sequence[int]) -> Iterator[tuple[int, OracleOutcome]]: ...


def _to_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _missing_labels(labels: Mapping[str, float]) -> list[str]:
    return [c for c, v in labels.items() if not math.isfinite(v)]


def lookup_labels(row: Mapping[str, Any], columns: Sequence[str]) -> OracleOutcome:
    """The ``columns`` of one labelled row as floats; failed (naming the columns) where a value is not a number."""
    labels = {c: _to_float(row.get(c)) for c in columns}
    missing = _missing_labels(labels)
    if missing:
        return OracleOutcome("failed", f"no numeric value for {', '.join(missing)}", labels)
    return OracleOutcome("ok", None, labels)


class RowOracle:
    """Labels from per-pool-row records (a labelled CSV for ``table``; screen results for ``mlip``).

    Args:
        kind: ``table`` or ``mlip`` (recorded with the results).
        rows: one mapping per pool row (column -> value), in pool order.
        columns: the label columns this campaign needs (checked against the rows' columns).
    """

    def __init__(self, kind: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
        self.kind = kind
        available = sorted({k for row in rows[:50] for k in row})
        missing = [c for c in columns if c not in available]
        if missing:
            raise OracleError(
                f"the objective names column(s) {', '.join(repr(c) for c in missing)} that the {kind} oracle "
                f"does not have; available columns: {', '.join(repr(c) for c in available)}"
            )
        self._rows = rows
        self._columns = list(columns)

    def label_columns(self) -> list[str]:
        return list(self._columns)

    @property
    def rows(self) -> Sequence[Mapping[str, Any]]:
        """The labelled rows, one per pool candidate (read only: the campaign's random-search baseline)."""
        return self._rows

    def evaluate(self, indices: Sequence[int]) -> Iterator[tuple[int, OracleOutcome]]:
        for index in indices:
            yield index, lookup_labels(self._rows[index], self._columns)


#: Labels the DFT oracle computes (eV; eV/atom; Å^3/atom); any other objective column comes from the pool row.
DFT_LABELS = ("band_gap", "dft_e_form_per_atom", "dft_energy_per_atom", "dft_volume_per_atom")


class DFTOracle:
    """GPAW on each proposed candidate's (MLIP-relaxed) structure, one Ray task per candidate: optional DFT
    relaxation, the band gap (PBE, or GLLB-SC with ``dft.gap_functional: gllbsc``) when the objective asks for
    ``band_gap``, and the formation energy against
    elemental references with identical settings (cached in ``<work_dir>/dft_references``; each batch first
    computes the references its candidates need, one Ray task per element, so each is computed once). Columns the DFT
    does not compute (e.g. the MLIP ``e_above_hull`` as a stability gate) are taken from the pool row.

    Every calculation's DFT frames (energy eV, forces eV/Å, stress eV/Å³ when computed: each ionic step of a
    relaxation, else the computed geometry; :mod:`materials.potentials.finetune` keys) are written the moment the task
    returns to ``<work_dir>/frames/<candidate id>.xyz`` (extxyz, renamed into place), training data for
    fine-tuning the potential (``finetune_every`` in the campaign)."""

    kind = "dft"

    def __init__(self, rows, structure_files, columns, settings, relax: bool, work_dir):
        from pathlib import Path

        available = sorted(set(DFT_LABELS) | {k for row in rows[:50] for k in row})
        missing = [c for c in columns if c not in available]
        if missing:
            raise OracleError(
                f"the objective names column(s) {', '.join(repr(c) for c in missing)} that the dft oracle "
                f"does not have; available columns: {', '.join(repr(c) for c in available)}"
            )
        self._rows = rows
        self._files = list(structure_files)
        self._columns = list(columns)
        self._settings = settings
        self._relax = relax
        self._work = Path(work_dir)
        (self._work / "logs").mkdir(parents=True, exist_ok=True)
        (self._work / "dft_references").mkdir(parents=True, exist_ok=True)
        (self._work / "frames").mkdir(parents=True, exist_ok=True)

    def label_columns(self) -> list[str]:
        return list(self._columns)

    @property
    def reference_dir(self):
        """Folder of the cached elemental reference energies (same settings as the candidates)."""
        return self._work / "dft_references"

    def candidate_id(self, index: int) -> str:
        return str(self._rows[index].get("id", index))

    def frames_path(self, index: int):
        """The extxyz of pool row ``index``'s DFT frames (exists once its calculation returned frames)."""
        return self._work / "frames" / f"{self.candidate_id(index)}.xyz"

    def evaluate(self, indices: Sequence[int]) -> Iterator[tuple[int, OracleOutcome]]:
        from pipelines.dft_run import DFTItem, compute_references, dft_task, structure_elements

        items = {
            i: DFTItem(self.candidate_id(i), self._files[i], read_structure(self._files[i]).as_dict()) for i in indices
        }
        # every elemental reference once, before the candidates: q candidates sharing an element would each relax it
        ref_errors = compute_references(structure_elements(items.values()), self._settings, self.reference_dir)
        task = ray.remote(num_cpus=1, max_retries=1)(dft_task)
        want_gap = "band_gap" in self._columns
        refs = {}
        for i, item in items.items():
            ref = task.remote(
                item,
                self._settings,
                do_relax=self._relax,
                do_gap=want_gap,
                log_dir=str(self._work / "logs"),
                ref_dir=str(self.reference_dir),
                keep_frames=True,
                reference_errors=ref_errors,
            )
            refs[ref] = i
        for index, result, reason in as_completed(refs):
            if reason is not None:
                yield index, OracleOutcome("failed", f"dft {reason}")
                continue
            frames = result.pop("frames", None)
            if frames:
                write_frames(frames, self.frames_path(index))
            computed = {
                "band_gap": result.get("band_gap"),
                "dft_e_form_per_atom": result.get("e_form_per_atom"),
                "dft_energy_per_atom": result.get("energy_per_atom"),
                "dft_volume_per_atom": result.get("volume_per_atom"),
            }
            labels = {c: _to_float(computed[c] if c in computed else self._rows[index].get(c)) for c in self._columns}
            if result["status"] != "ok":
                yield index, OracleOutcome("failed", f"dft: {result['failure_reason']}", labels)
                continue
            missing = _missing_labels(labels)
            if missing:
                reason = f"dft gave no {', '.join(missing)} ({'; '.join(result.get('notes') or []) or 'see log'})"
                yield index, OracleOutcome("failed", reason, labels)
                continue
            yield index, OracleOutcome("ok", None, labels)
