"""Reference data to validate predictions against: shipped published sets and validation engineers' lab CSVs.

Every source is read into one small table form, a :class:`ReferenceSet` of :class:`ReferenceRow`, holding one
property in its canonical unit (``band_gap`` in eV, ``formation_energy`` in eV/atom) with pymatgen reduced
formulas, so that :mod:`materials.datasets.validation` matches and scores any of them the same way.

Shipped sets (``materials/data``, provenance in its README), by ``load_reference(name, property, method)``:

* ``borlido``: 464 solids with experimental band gaps (``method=None``/``"experiment"``) and the gaps of ~25
  methods (``method="PBE"``, ``"HSE06"``, ``"MBJ"``, ...; rows without a value for that method are left out
  and counted in ``notes``). 15 formulas have several polymorphs (33 rows), each with its MP id: when matching by
  formula the ground-state polymorph (lowest MP formation energy of the row's MP id) is used.
* ``zhuo``: 6,354 experimental band gaps by composition (0 eV = metal). A formula measured several times
  keeps every row; matching by formula uses their mean (policy ``mean``).
* ``mp``: Materials Project PBE band gaps (119,935 task ids) or formation energies (106,069 ids, eV/atom).
  Several polymorphs per formula: matching by formula uses the ground-state polymorph (lowest formation
  energy; band-gap rows get it by joining on the MP id, 106,069 of the 119,935 have one).

The lab-data CSV (``load_lab_csv``) is described in its docstring; any problem raises :class:`LabDataError`
naming every bad line.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from pymatgen.core import Composition, Structure

from materials.composition import case_hint, reduced_formula
from materials.datasets.records import (
    ReferenceRow,
    ReferenceSet,
    canonical_property,
    finite_float,
    read_packaged_csv,
    read_text_file,
)
from materials.dft import importers as dft_import
from materials.errors import InputError
from materials.structures.inputs import StructureCheckError, read_structure
from materials.thermo.stability import HullTable

#: 1 eV per particle in kJ/mol (CODATA 2018: e * N_A / 1000).
EV_IN_KJ_PER_MOL = 96.48533212

#: Lab-CSV units of each property (case-sensitive: meV is not MeV) and the factor converting them to the canonical
#: unit. ``kJ/mol-fu`` is per mole of formula units as written in the ``formula`` column, so its factor is further
#: divided by that formula's atom count; plain ``kJ/mol`` is refused as ambiguous.
LAB_UNITS: dict[str, dict[str, float]] = {
    "band_gap": {"eV": 1.0, "meV": 1e-3},
    "formation_energy": {
        "eV/atom": 1.0,
        "meV/atom": 1e-3,
        "kJ/mol-atom": 1 / EV_IN_KJ_PER_MOL,
        "kJ/mol-fu": 1 / EV_IN_KJ_PER_MOL,
    },
}

#: Columns of the lab CSV (lower case). ``formula`` or ``structure_file`` (or both) is needed on every row.
LAB_REQUIRED_COLUMNS = ("property", "value", "unit", "source")
LAB_OPTIONAL_COLUMNS = ("formula", "structure_file", "uncertainty", "id", "method", "notes")


BORLIDO_FILE = "borlido2019_revised_bandgaps.csv.gz"
ZHUO_FILE = "zhuo2018_experimental_bandgaps.csv.gz"
MP_GAPS_FILE = "mp_pbe_bandgaps.csv.gz"
BORLIDO_CITATION = "Borlido et al., J. Chem. Theory Comput. 15, 5069 (2019)"
ZHUO_CITATION = "Zhuo, Mansouri Tehrani, Brgoch, J. Phys. Chem. Lett. 9, 1668 (2018)"
MP_CITATION = "Materials Project (CC BY 4.0)"
#: Borlido columns that are not a method's band gap.
_BORLIDO_META_COLUMNS = ("Composition", "MP-ID", "ICSD-ID", "DOI")


class LabDataError(InputError):
    """A lab-data CSV failed a check. ``errors`` lists one message per problem, each naming its line
    (the header is line 1) and the fix."""

    def __init__(self, path: str | Path, errors: Sequence[str]):
        self.path = str(path)
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{path}: {len(self.errors)} problem(s) (line numbers count the header as line 1):\n{lines}")


@lru_cache(maxsize=1)
def mp_formation_energies() -> Mapping[str, tuple[str, float]]:
    """MP id -> (formula as stored, formation energy eV/atom on the MP2020 scale), read-only, from the shipped
    table read by ``materials.thermo.stability.HullTable`` (the one reader of that file). Read once per process:
    it is immutable package data and ranks polymorphs in every shipped set."""
    table = {row.material_id: (row.formula, row.e_form_per_atom) for row in HullTable.load().rows}
    return MappingProxyType(table)


def borlido_methods() -> list[str]:
    """Band-gap columns of the Borlido set (``Experimental`` plus ~25 methods)."""
    with resources.files("materials.data").joinpath(BORLIDO_FILE).open("rb") as raw:
        header = gzip.decompress(raw.read()).decode().splitlines()[0].split(",")
    return [c for c in header if c not in _BORLIDO_META_COLUMNS]


def _borlido(method: str | None) -> ReferenceSet:
    records = read_packaged_csv(BORLIDO_FILE)
    methods = [c for c in records[0] if c not in _BORLIDO_META_COLUMNS]
    wanted = "experiment" if method is None else method.strip()
    if wanted.lower() in ("experiment", "experimental", "exp"):
        column = "Experimental"
    else:
        by_lower = {m.lower(): m for m in methods}
        if wanted.lower() not in by_lower:
            raise InputError(f"Borlido set has no method {method!r}: use one of {methods}")
        column = by_lower[wanted.lower()]
    e_form = {mid: value for mid, (_, value) in mp_formation_energies().items()}
    rows, missing = [], []
    for rec in records:
        if not rec[column].strip():
            missing.append(rec["Composition"])
            continue
        is_exp = column == "Experimental"
        rows.append(
            ReferenceRow(
                id=f"borlido:{rec['MP-ID']}",
                formula=reduced_formula(rec["Composition"]),
                value=float(rec[column]),
                uncertainty=None,
                method="experiment" if is_exp else column,
                source=f"doi:{rec['DOI']}" if is_exp else f"{BORLIDO_CITATION}, {column}",
                mp_id=rec["MP-ID"],
                e_form_per_atom=e_form.get(rec["MP-ID"]),
            )
        )
    notes = [f"{len(missing)} of {len(records)} solids have no {column} gap and are left out"] if missing else []
    return ReferenceSet("borlido", "band_gap", rows, "ground_state", BORLIDO_CITATION, notes)


def _zhuo() -> ReferenceSet:
    rows = [
        ReferenceRow(
            id=f"zhuo:{rec['']}",
            formula=reduced_formula(rec["composition"]),
            value=float(rec["Eg"]),
            uncertainty=None,
            method="experiment",
            source=ZHUO_CITATION,
        )
        for rec in read_packaged_csv(ZHUO_FILE)
    ]
    notes = ["Eg = 0 marks a metal; repeated measurements of a formula are averaged when matching"]
    return ReferenceSet("zhuo", "band_gap", rows, "mean", ZHUO_CITATION, notes)


def _mp(prop: str) -> ReferenceSet:
    table = mp_formation_energies()
    if prop == "formation_energy":
        rows = [
            ReferenceRow(mid, reduced_formula(formula), value, None, "PBE", MP_CITATION, mid, None, value)
            for mid, (formula, value) in table.items()
        ]
        notes = [
            "MP2020 correction scheme (legacy ~2018-2019 rows converted; materials/data/README.md); "
            "ground-state (lowest-energy) polymorph used per formula"
        ]
    else:
        rows = []
        for rec in read_packaged_csv(MP_GAPS_FILE):
            mid = rec["task_id"]
            rows.append(
                ReferenceRow(
                    mid,
                    reduced_formula(rec["pretty_formula"]),
                    float(rec["band_gap"]),
                    None,
                    "PBE",
                    MP_CITATION,
                    mid,
                    None,
                    table[mid][1] if mid in table else None,
                )
            )
        n_ranked = sum(r.e_form_per_atom is not None for r in rows)
        notes = [
            f"ground-state polymorph per formula by MP formation energy ({n_ranked} of {len(rows)} ids have one;"
            " formulas with none are averaged)"
        ]
    return ReferenceSet("mp", prop, rows, "ground_state", MP_CITATION, notes)


def load_reference(name: str | Path, property: str, method: str | None = None) -> ReferenceSet:
    """Load a shipped reference set (``borlido``, ``zhuo``, ``mp``) or a lab CSV (any other name: a path).

    Args:
        name: ``borlido`` | ``zhuo`` | ``mp`` | path to a lab-data CSV (see :func:`load_lab_csv`) | existing DFT:
            a ``vasprun.xml``, an ``.extxyz``, or a folder of them (see :mod:`materials.dft.importers`).
        property: ``band_gap`` (eV) or ``formation_energy`` (eV/atom); any spelling in ``PROPERTY_ALIASES``.
        method: Borlido only: which column (``experiment`` by default, ``PBE``, ``HSE06``, ...; see
            :func:`borlido_methods`). ``mp`` accepts ``PBE``, ``zhuo`` accepts ``experiment``.

    Raises:
        ValueError: the set does not hold that property or method (the message lists what it holds).
        LabDataError: a lab CSV failed its checks.
    """
    prop = canonical_property(property)
    key = str(name).strip().lower()
    if key in ("borlido", "zhuo") and prop != "band_gap":
        raise InputError(f"the {key} set holds band gaps only, not {prop}: use --reference mp for formation energies")
    if key == "borlido":
        return _borlido(method)
    if key == "zhuo":
        if method is not None and method.strip().lower() not in ("experiment", "experimental", "exp"):
            raise InputError(f"the zhuo set holds experimental gaps only, not {method!r}")
        return _zhuo()
    if key == "mp":
        if method is not None and method.strip().upper() != "PBE":
            raise InputError(f"the mp set holds PBE values only, not {method!r}")
        return _mp(prop)
    if method is not None:
        raise InputError(f"method={method!r} applies to the borlido set; a lab CSV gives a method per row")
    if dft_import.is_dft_path(name):
        return dft_import.to_reference_set(dft_import.import_dft(name), prop, Path(name).name)
    return load_lab_csv(name, property=prop)


def load_lab_csv(path: str | Path, property: str | None = None) -> ReferenceSet:
    """Read and check a validation engineer's CSV of measured (or externally computed) values.

    Columns (header names case-insensitive, order free):

    * ``formula`` and/or ``structure_file``: at least one per row. ``structure_file`` (CIF, POSCAR, extxyz,
      pymatgen JSON) is relative to the CSV's folder; with both, they must agree. A structure lets matching
      tell polymorphs apart.
    * ``property``: ``band_gap`` or ``formation_energy`` (``PROPERTY_ALIASES``).
    * ``value``: a finite number; band gaps must be >= 0 (0 = metal).
    * ``unit``: band gap ``eV`` | ``meV``; formation energy ``eV/atom`` | ``meV/atom`` | ``kJ/mol-atom`` |
      ``kJ/mol-fu`` (per mole of formula units as written in ``formula``). Converted to eV, eV/atom.
    * ``uncertainty`` (optional): one standard uncertainty >= 0, same unit as ``value``; empty = not stated.
    * ``source``: DOI, paper or lab-notebook reference; must not be empty.
    * ``id``, ``method`` (default ``experiment``), ``notes``: optional.

    Args:
        path: the CSV.
        property: keep rows of this property only; None requires the file to hold a single property.

    Raises:
        LabDataError: every problem in the file, each naming its line (header = line 1) and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise LabDataError(path, [f"file not found: {path.resolve()}"])
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise LabDataError(path, ["line 1: empty file; the first line must be the header " + _lab_header_hint()])
    columns = [h.strip().lower() for h in header]
    errors = _check_lab_header(columns)
    if errors:
        raise LabDataError(path, errors)

    wanted = canonical_property(property) if property is not None else None
    rows: list[ReferenceRow] = []
    props_seen: set[str] = set()
    ids_seen: dict[str, int] = {}
    n_other = 0
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            errors.append(f"line {line}: {len(cells)} fields, header has {len(columns)}; quote fields holding commas")
            continue
        rec = {c: v.strip() for c, v in zip(columns, cells, strict=True)}
        row, row_errors = _lab_row(rec, line, path.parent, path.name)
        errors += row_errors
        if row is None:
            continue
        if row.id in ids_seen:
            errors.append(f"line {line}: id {row.id!r} already used on line {ids_seen[row.id]}; make ids unique")
            continue
        ids_seen[row.id] = line
        prop = canonical_property(rec["property"])
        props_seen.add(prop)
        if wanted is not None and prop != wanted:
            n_other += 1
            continue
        rows.append(row)
    if not errors and not ids_seen:
        errors.append("no data rows after the header; add one row per measured value")
    if not errors and wanted is None and len(props_seen) > 1:
        errors.append(f"the file holds several properties {sorted(props_seen)}: choose one with property=...")
    if errors:
        raise LabDataError(path, errors)
    prop = wanted or props_seen.pop()
    notes = [f"{n_other} rows of other properties left out"] if n_other else []
    return ReferenceSet(path.name, prop, rows, "mean", f"lab data {path}", notes)


def _lab_header_hint() -> str:
    return f"(required: {', '.join(LAB_REQUIRED_COLUMNS)}, and formula or structure_file)"


def _check_lab_header(columns: list[str]) -> list[str]:
    errors = []
    missing = [c for c in LAB_REQUIRED_COLUMNS if c not in columns]
    if "formula" not in columns and "structure_file" not in columns:
        missing.append("formula or structure_file")
    if missing:
        errors.append(f"line 1 (header): missing column(s) {', '.join(missing)}; add them {_lab_header_hint()}")
    allowed = set(LAB_REQUIRED_COLUMNS) | set(LAB_OPTIONAL_COLUMNS)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        errors.append(
            f"line 1 (header): unknown column(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))} (check the spelling)"
        )
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        errors.append(f"line 1 (header): column(s) {', '.join(duplicated)} appear twice; keep one")
    return errors


def _lab_row(rec: dict[str, str], line: int, folder: Path, file_name: str) -> tuple[ReferenceRow | None, list[str]]:
    """One data row checked: the row (None when any check failed) and the problems found."""
    errors = []
    where = f"line {line}"
    try:
        prop = canonical_property(rec["property"])
    except ValueError:
        prop = None
        errors.append(f"{where}: unknown property {rec['property']!r}; use band_gap (eV) or formation_energy (eV/atom)")
    unit = rec["unit"]
    scale = None
    if prop is not None:
        scale = LAB_UNITS[prop].get(unit)
        if scale is None:
            hint = " (per mole of atoms or of formula units?)" if unit.lower().replace(" ", "") == "kj/mol" else ""
            errors.append(f"{where}: unknown unit {unit!r} for {prop}{hint}; use one of {', '.join(LAB_UNITS[prop])}")
    value = finite_float(rec["value"])
    if value is None:
        errors.append(f"{where}: value {rec['value']!r} is not a finite number; write it like 1.12 (no unit)")
    uncertainty = None
    if rec.get("uncertainty"):
        uncertainty = finite_float(rec["uncertainty"])
        if uncertainty is None or uncertainty < 0:
            errors.append(
                f"{where}: uncertainty {rec['uncertainty']!r} is not a number >= 0; give one standard uncertainty "
                "in the row's unit, or leave it empty"
            )
    if not rec["source"]:
        errors.append(f"{where}: empty source; give a DOI, paper or lab-notebook reference")

    formula_text, structure_text = rec.get("formula", ""), rec.get("structure_file", "")
    formula = structure = None
    if not formula_text and not structure_text:
        errors.append(f"{where}: neither formula nor structure_file given; fill in at least one")
    if formula_text:
        try:
            formula = reduced_formula(formula_text)
        except ValueError:
            errors.append(
                f"{where}: formula {formula_text!r} cannot be parsed; write it like CuInSe2 or Li0.5CoO2"
                + case_hint(formula_text)
            )
    if structure_text:
        structure, error = _lab_structure(structure_text, folder)
        if error:
            errors.append(f"{where}: {error}")
        elif formula is not None and structure.composition.reduced_formula != formula:
            errors.append(
                f"{where}: formula {formula_text!r} ({formula}) disagrees with structure_file {structure_text!r} "
                f"({structure.composition.reduced_formula}); fix one of them"
            )
    if prop == "formation_energy" and unit == "kJ/mol-fu" and not formula_text:
        errors.append(f"{where}: unit kJ/mol-fu needs the formula column (the formula unit); add it or use eV/atom")
    if prop == "band_gap" and value is not None and value < 0:
        errors.append(f"{where}: negative band gap {value}; band gaps are >= 0 (write 0 for a metal)")
    if errors:
        return None, errors

    if unit == "kJ/mol-fu":
        scale /= Composition(formula_text).num_atoms
    if formula is None:
        formula = structure.composition.reduced_formula
    row = ReferenceRow(
        id=rec.get("id") or f"{file_name}:{line}",
        formula=formula,
        value=value * scale,
        uncertainty=uncertainty * scale if uncertainty is not None else None,
        method=rec.get("method") or "experiment",
        source=rec["source"],
        structure=structure,
    )
    return row, []


def _lab_structure(text: str, folder: Path) -> tuple[Structure | None, str | None]:

    path = Path(text)
    if not path.is_absolute():
        path = folder / path
    if not path.is_file():
        return None, f"structure_file {text!r} not found (looked for {path}); paths are relative to the CSV's folder"
    try:
        return read_structure(path), None
    except StructureCheckError as exc:
        return None, str(exc)
