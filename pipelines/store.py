"""The result store: one SQLite file per screen, written as each result arrives, so a rerun resumes.

SQLite in WAL mode with a commit per chunk: a killed run loses at most the chunk in flight. Everything here
streams: records are read through a cursor and written in batches, so a screen of any size is never held in
memory at once.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from materials.serialise import Record

#: Columns of results.csv, in order (energies eV/atom, volumes Å^3/atom, forces eV/Å, stress GPa, time s).
#: ``e_above_hull`` is signed (negative below every known phase); ``e_above_hull_screen`` is the distance to the
#: hull that also holds this screen's structures; ``energy_convention`` says how the potential's energies were
#: put on the MP2020 scale; ``warning`` explains a number to distrust (see materials.thermo.stability).
RESULT_COLUMNS = (
    "id",
    "formula",
    "prototype",
    "source",
    "status",
    "failure_reason",
    "n_atoms",
    "energy_per_atom",
    "e_form_per_atom",
    "e_above_hull",
    "e_above_hull_screen",
    "warning",
    "energy_convention",
    "volume_per_atom",
    "initial_volume_per_atom",
    "max_force",
    "relax_steps",
    "converged",
    "potential",
    "seconds",
)
_EXTRA_COLUMNS = ("stress", "structure")
#: the stability step's columns: filled by :meth:`ResultStore.update_stability`, never by a worker's row
STABILITY_COLUMNS = ("e_form_per_atom", "e_above_hull", "e_above_hull_screen", "warning", "energy_convention")


@dataclass
class ScreenRow(Record):
    """One candidate's screen result as a Ray worker sends it and :meth:`ResultStore.write` stores it.

    The relaxation's numbers (energy eV/atom, volumes Å^3/atom, largest force eV/Å, stress GPa as Voigt xx yy zz yz
    xz xy, time s; NaN or None where there is no number) or, for ``status="failed"``, why in ``failure_reason``.
    The stability columns (:data:`STABILITY_COLUMNS`) are the stability step's, written later.
    ``structure_json`` is the relaxed structure as pymatgen JSON text and ``cif`` its CIF text, both made on the
    worker so that the driver only writes them (``cif`` goes to ``structures/<id>.cif``, not into the store).
    """

    id: str
    formula: str | None
    status: Literal["ok", "failed"]
    failure_reason: str | None = None
    prototype: str | None = None
    source: str | None = None
    potential: str | None = None
    n_atoms: int | None = None
    energy_per_atom: float | None = None
    volume_per_atom: float | None = None
    initial_volume_per_atom: float | None = None
    max_force: float | None = None
    relax_steps: int | None = None
    converged: bool | None = None
    seconds: float | None = None
    stress: list[float] | None = None
    structure_json: str | None = None
    cif: str | None = None

    @classmethod
    def failed(cls, item: Any, reason: str, potential: str | None = None, n_atoms: int | None = None) -> ScreenRow:
        """A failed row for a work item (anything with ``id``, ``formula``, ``prototype`` and ``source``)."""
        return cls(
            item.id, item.formula, "failed", reason, item.prototype, item.source, potential=potential, n_atoms=n_atoms
        )

    @classmethod
    def relaxed(cls, item: Any, potential: str, result: Any) -> ScreenRow:
        """The row of a work item relaxed into ``result`` (a :class:`materials.potentials.relax.RelaxResult`, ok
        or failed): its numbers, and the relaxed structure as JSON and CIF text."""
        structure = result.structure
        return cls(
            id=item.id,
            formula=result.formula,
            status=result.status,
            failure_reason=result.failure_reason,
            prototype=item.prototype,
            source=item.source,
            potential=potential,
            n_atoms=result.n_atoms,
            energy_per_atom=result.energy_per_atom,
            volume_per_atom=result.volume_per_atom,
            initial_volume_per_atom=result.initial_volume_per_atom,
            max_force=result.max_force,
            relax_steps=result.steps,
            converged=result.converged,
            seconds=result.seconds,
            stress=list(result.stress),
            structure_json=json.dumps(structure.as_dict()) if structure is not None else None,
            cif=structure.to(fmt="cif") if structure is not None else None,
        )


#: ids per ``IN (...)`` query (SQLite allows at least 999 bound variables)
_MAX_VARIABLES = 900
#: terminal colour codes (ESC [ ... m) that must not reach a CSV
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class SQLiteStore:
    """One SQLite file that a run writes as results arrive, with a ``meta`` table of JSON values.

    WAL journal with ``synchronous=NORMAL``: a commit survives the process being killed (what resume needs); only
    a power cut can lose the last commits (FULL would fsync every commit). Subclasses give their tables in
    ``SCHEMA`` (``CREATE TABLE IF NOT EXISTS`` statements) and may add columns to an older file in
    :meth:`_upgrade`. The screen's, the campaign's and the DFT run's stores are all this class.
    """

    SCHEMA: str = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(self.SCHEMA + "\nCREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);")
        self._upgrade()
        self._db.commit()

    def _upgrade(self) -> None:
        """Bring a file written by an older version up to ``SCHEMA`` (nothing by default)."""

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self._db.commit()

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default


_RESULT_TABLE_COLUMNS = ", ".join(f'"{c}"' for c in RESULT_COLUMNS[1:] + _EXTRA_COLUMNS)


class ResultStore(SQLiteStore):
    """Results keyed by item id. ``structure`` holds the relaxed structure as pymatgen JSON."""

    SCHEMA = f'CREATE TABLE IF NOT EXISTS results ("id" TEXT PRIMARY KEY, {_RESULT_TABLE_COLUMNS});'

    def _upgrade(self) -> None:
        # a store written before a column existed gains it (empty), so older screens still resume
        present = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        for name in RESULT_COLUMNS[1:] + _EXTRA_COLUMNS:
            if name not in present:
                self._db.execute(f'ALTER TABLE results ADD COLUMN "{name}"')

    # -- results ----------------------------------------------------------------------------------------
    def write(self, records: Iterable[ScreenRow]) -> int:
        """Insert or replace rows (the stability columns start empty); commits before returning. Returns the number
        written.

        Raises:
            TypeError: an item is not a :class:`ScreenRow` (build one with ``ScreenRow(...)`` or
                ``ScreenRow.from_dict``).
        """
        names = [c for c in RESULT_COLUMNS if c not in STABILITY_COLUMNS]
        rows = []
        for rec in records:
            if not isinstance(rec, ScreenRow):
                raise TypeError(
                    f"ResultStore.write takes ScreenRow records, got {type(rec).__name__}; "
                    "build one with ScreenRow(...) or ScreenRow.from_dict(...)"
                )
            row = []
            for name in names:
                value = getattr(rec, name)
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
                elif isinstance(value, bool):
                    value = int(value)
                elif name == "failure_reason" and isinstance(value, str):
                    value = ANSI_ESCAPE.sub("", value)  # Ray colours the errors it relays from workers
                row.append(value)
            row.append(json.dumps(rec.stress) if rec.stress is not None else None)
            row.append(rec.structure_json)
            rows.append(row)
        columns = [*names, *_EXTRA_COLUMNS]
        placeholders = ", ".join("?" for _ in columns)
        quoted = ", ".join(f'"{n}"' for n in columns)  # by name: a migrated store has its columns in another order
        self._db.executemany(f"INSERT OR REPLACE INTO results ({quoted}) VALUES ({placeholders})", rows)
        self._db.commit()
        return len(rows)

    def update_stability(self, values: dict[str, Any], convention: str) -> None:
        """Set e_form_per_atom, e_above_hull, e_above_hull_screen (eV/atom), warning and energy_convention per id
        from :class:`materials.thermo.stability.StabilityRow` values."""

        def number(value: float) -> float | None:
            return value if math.isfinite(value) else None

        rows = [
            (
                number(row.e_form_per_atom),
                number(row.e_above_hull),
                number(row.e_above_hull_screen),
                row.warning or None,
                convention,
                item_id,
            )
            for item_id, row in values.items()
        ]
        self._db.executemany(
            "UPDATE results SET e_form_per_atom = ?, e_above_hull = ?, e_above_hull_screen = ?, warning = ?, "
            'energy_convention = ? WHERE "id" = ?',
            rows,
        )
        self._db.commit()

    def update_screen_hull(self, values: Mapping[str, float]) -> None:
        """Set e_above_hull_screen (eV/atom) per id (the second pass of the stability step)."""
        rows = [(value if math.isfinite(value) else None, item_id) for item_id, value in values.items()]
        self._db.executemany('UPDATE results SET e_above_hull_screen = ? WHERE "id" = ?', rows)
        self._db.commit()

    def done_ids(self) -> set[str]:
        """Every stored id (held in memory: for a large screen, :meth:`stored_ids` asks about some ids only)."""
        return {row[0] for row in self._db.execute('SELECT "id" FROM results')}

    def stored_ids(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` that are stored (any status)."""
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), _MAX_VARIABLES):
            part = ids[start : start + _MAX_VARIABLES]
            marks = ", ".join("?" for _ in part)
            found.update(row[0] for row in self._db.execute(f'SELECT "id" FROM results WHERE "id" IN ({marks})', part))
        return found

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def count(self, where: str = "", params: Sequence[Any] = ()) -> int:
        """Number of records matching an SQL condition on RESULT_COLUMNS (``where`` is code, never user input)."""
        sql = "SELECT COUNT(*) FROM results" + (f" WHERE {where}" if where else "")
        return int(self._db.execute(sql, tuple(params)).fetchone()[0])

    def distinct_formulas(self, where: str = "") -> list[str]:
        """The distinct formulas (of records matching ``where``), sorted; a screen has far fewer than records."""
        sql = "SELECT DISTINCT formula FROM results WHERE formula IS NOT NULL" + (f" AND ({where})" if where else "")
        return sorted(row[0] for row in self._db.execute(sql))

    def columns(self, names: Sequence[str], where: str = "", params: Sequence[Any] = ()) -> Iterator[tuple]:
        """Tuples of the given RESULT_COLUMNS of the records matching ``where``, in id order, through a cursor."""
        unknown = [n for n in names if n not in RESULT_COLUMNS]
        if unknown:
            raise KeyError(f"unknown result columns {unknown}")
        select = ", ".join(f'"{n}"' for n in names)
        sql = f"SELECT {select} FROM results" + (f" WHERE {where}" if where else "") + ' ORDER BY "id"'
        # a second connection: the caller may write through this one while the cursor is open
        reader = sqlite3.connect(self.path)
        try:
            yield from reader.execute(sql, tuple(params))
        finally:
            reader.close()

    def records(
        self,
        with_structures: bool = False,
        where: str = "",
        params: Sequence[Any] = (),
        order_by: str = '"id"',
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Records in id order (or ``order_by``), all or those matching the SQL condition ``where`` (code, never
        user input), through a cursor; ``stress`` decoded; ``structure`` read and decoded only if asked (it is
        large)."""
        names = RESULT_COLUMNS + ("stress",) + (("structure",) if with_structures else ())
        sql = f"SELECT {', '.join(chr(34) + n + chr(34) for n in names)} FROM results"
        sql += (
            (f" WHERE {where}" if where else "") + f" ORDER BY {order_by}" + (f" LIMIT {int(limit)}" if limit else "")
        )
        for row in self._db.execute(sql, tuple(params)):
            rec = dict(zip(names, row, strict=True))
            rec["converged"] = bool(rec["converged"]) if rec["converged"] is not None else None
            rec["stress"] = json.loads(rec["stress"]) if rec["stress"] else None
            if with_structures:
                rec["structure"] = json.loads(rec["structure"]) if rec["structure"] else None
            yield rec

    def export_csv(
        self,
        path: str | Path,
        extra_columns: Sequence[str] = (),
        extra: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    ) -> Path:
        """Write results.csv (RESULT_COLUMNS, then ``extra_columns`` filled by ``extra(record)``; empty cell for a
        missing number), row by row."""
        path = Path(path)
        columns = list(RESULT_COLUMNS) + [c for c in extra_columns if c not in RESULT_COLUMNS]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for rec in self.records():
                row = {k: ("" if rec.get(k) is None else rec[k]) for k in RESULT_COLUMNS}
                if extra is not None:
                    row.update(extra(rec))
                writer.writerow(row)
        return path
