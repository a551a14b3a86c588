"""Reference records: one property's values from one source, in its canonical unit, and the readers of the
table files they come from.

:class:`ReferenceSet` of :class:`ReferenceRow` is the one table form every source is read into
(:mod:`materials.datasets.reference_data` for the shipped sets and lab CSVs, :mod:`materials.dft.gpaw.importers` for
DFT run elsewhere), so that :mod:`materials.datasets.validation` matches and scores any of them the same way.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from materials.errors import InputError
from materials.serialise import Record

#: Canonical unit of each property (values in a ReferenceSet are always in these units).
PROPERTY_UNITS = {"band_gap": "eV", "formation_energy": "eV/atom"}


#: Names accepted for each property (case-insensitive; spaces and hyphens read as underscores).
PROPERTY_ALIASES = {
    "band_gap": "band_gap",
    "bandgap": "band_gap",
    "gap": "band_gap",
    "formation_energy": "formation_energy",
    "formation_energy_per_atom": "formation_energy",
    "e_form": "formation_energy",
}


#: How several reference rows for one formula (or one structure) become one reference value; see
#: :func:`materials.datasets.validation.match`.
DUPLICATE_POLICIES = ("mean", "ground_state", "closest")


@dataclass
class ReferenceRow(Record):
    """One reference value.

    Attributes:
        id: unique within its set (``borlido:mp-2534``, ``zhuo:17``, an MP id, or the lab CSV's id).
        formula: pymatgen reduced formula (``InCuSe2``, not ``CuInSe2``).
        value: in the set's canonical unit (eV for band_gap, eV/atom for formation_energy).
        uncertainty: one standard uncertainty, same unit as ``value``; None when not stated.
        method: ``experiment``, ``PBE``, ``HSE06``, ...
        source: DOI or citation.
        mp_id: the Materials Project id of the polymorph, when known.
        structure: the polymorph's structure, when given (lab CSV ``structure_file``).
        e_form_per_atom: MP formation energy (eV/atom) of the polymorph, when known; ranks polymorphs for the
            ``ground_state`` duplicate policy.
    """

    id: str
    formula: str
    value: float
    uncertainty: float | None
    method: str
    source: str
    mp_id: str | None = None
    structure: Structure | None = None
    e_form_per_atom: float | None = None


@dataclass
class ReferenceSet:
    """Reference values of one property from one source.

    Attributes:
        name: ``borlido``, ``zhuo``, ``mp`` or the lab CSV's file name.
        property: ``band_gap`` (eV) or ``formation_energy`` (eV/atom); see ``unit``.
        rows: the values; several rows may share a formula (polymorphs, repeated measurements).
        duplicate_policy: how matching by formula turns several rows into one value (``DUPLICATE_POLICIES``).
        source: citation of the whole set.
        notes: what the loader left out or assumed, for the report.
    """

    name: str
    property: str
    rows: list[ReferenceRow]
    duplicate_policy: str = "mean"
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.property not in PROPERTY_UNITS:
            raise ValueError(f"{self.property=} is not one of {sorted(PROPERTY_UNITS)}")
        if self.duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"{self.duplicate_policy=} is not one of {DUPLICATE_POLICIES}")

    @property
    def unit(self) -> str:
        return PROPERTY_UNITS[self.property]

    def __len__(self) -> int:
        return len(self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "property": self.property,
            "rows": [r.as_dict() for r in self.rows],
            "duplicate_policy": self.duplicate_policy,
            "source": self.source,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceSet:
        d = dict(d)
        d["rows"] = [ReferenceRow.from_dict(r) for r in d["rows"]]
        return cls(**d)


def canonical_property(name: str) -> str:
    """``band_gap`` or ``formation_energy`` for any accepted spelling (``PROPERTY_ALIASES``).

    Raises:
        ValueError: unknown property, listing the accepted names.
    """
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in PROPERTY_ALIASES:
        raise InputError(f"unknown property {name!r}: use one of {sorted(PROPERTY_ALIASES)}")
    return PROPERTY_ALIASES[key]


def read_text_file(path: str | Path) -> str:
    """The text of a user's table file (``.csv`` or ``.csv.gz``), UTF-8 with or without the byte-order mark that
    Excel writes. The one reader of user CSVs (lab data, predictions, pools, predict-gap input).

    Raises:
        FileNotFoundError: no such file (the message gives the absolute path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path.resolve()))
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8-sig")


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a user's CSV file as dicts keyed by the header (see :func:`read_text_file`)."""
    return list(csv.DictReader(io.StringIO(read_text_file(path), newline="")))


def read_packaged_csv(name: str) -> list[dict[str, str]]:
    """Rows of a gzipped CSV shipped in ``materials/data`` (as strings)."""
    # csv module, not pandas: pandas reads sodium nitride's formula "NaN" as a missing value
    with resources.files("materials.data").joinpath(name).open("rb") as raw:
        text = gzip.decompress(raw.read()).decode()
    return list(csv.DictReader(io.StringIO(text)))


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for text that is not a number, None, NaN or ±inf (the caller says
    which item lacked a value)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
