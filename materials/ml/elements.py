"""Element properties for descriptors and the band-gap GNN: offline data shipped with pymatgen, one table per
process.

An element pymatgen knows but that lacks a property (the ionic radius of a noble gas, the melting point of a
superheavy element) gets that property's mean over the elements Z = 1..103 that have it (:data:`ELEMENT_PROPERTIES`
documents each property).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from pymatgen.core import Element

from materials.errors import InputError

#: Element properties used by :func:`composition_features` (name -> description with unit).
ELEMENT_PROPERTIES: Mapping[str, str] = MappingProxyType(
    {
        "Z": "atomic number",
        "mass": "atomic mass, amu",
        "row": "period in the periodic table",
        "group": "group 1-18 (lanthanides and actinides: 3)",
        "mendeleev": "Mendeleev (Pettifor-like) number",
        "electronegativity": "Pauling electronegativity",
        "atomic_radius": "empirical atomic radius, Å",
        "ionic_radius": "average ionic radius over common oxidation states, Å",
        "melting_point": "melting point of the element, K",
        "ionization_energy": "first ionisation energy, eV",
        "electron_affinity": "electron affinity, eV",
        "molar_volume": "molar volume of the elemental solid, cm^3/mol",
        "valence_s": "s electrons outside the noble-gas core",
        "valence_p": "p electrons outside the noble-gas core",
        "valence_d": "d electrons outside the noble-gas core",
        "valence_f": "f electrons outside the noble-gas core",
        "valence": "electrons outside the noble-gas core (s+p+d+f)",
        "unfilled": "empty states in the partly filled valence s, p, d, f shells",
    }
)


#: Elements whose properties define the imputation means (Z = 1..103: all with measured data).
_IMPUTATION_Z = range(1, 104)


#: Shell capacities for the "unfilled" count.
_SHELL_CAPACITY = {"s": 2, "p": 6, "d": 10, "f": 14}


_ORBITAL = re.compile(r"^(\d+)([spdf])(\d+)$")


class FeatureError(InputError):
    """A candidate cannot be featurised; the message names the item and the fix."""


def _quantity(value: object) -> float:
    """Float of a pymatgen property (plain number or FloatWithUnit); NaN when absent."""
    if value is None:
        return math.nan
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _valence_counts(element: Element) -> dict[str, float]:
    """Electrons per sub-shell outside the noble-gas core, parsed from pymatgen's electronic structure.

    ``"[Ar].3d10.4s2.4p1"`` (Ga) gives s=2, p=1, d=10, f=0; filled d/f shells beyond the core count, as in
    the Magpie descriptor set. "unfilled" counts empty states of the partly filled shells.
    """
    try:
        text = element.electronic_structure
    except (KeyError, AttributeError, ValueError):
        return {key: math.nan for key in ("valence_s", "valence_p", "valence_d", "valence_f", "valence", "unfilled")}
    counts = {"s": 0, "p": 0, "d": 0, "f": 0}
    for token in text.split("."):
        match = _ORBITAL.match(token.strip())
        if match:  # "[Ar]" core tokens do not match
            counts[match.group(2)] += int(match.group(3))
    unfilled = sum(_SHELL_CAPACITY[shell] - n for shell, n in counts.items() if 0 < n < _SHELL_CAPACITY[shell])
    return {
        "valence_s": float(counts["s"]),
        "valence_p": float(counts["p"]),
        "valence_d": float(counts["d"]),
        "valence_f": float(counts["f"]),
        "valence": float(sum(counts.values())),
        "unfilled": float(unfilled),
    }


def _raw_element_properties(element: Element) -> dict[str, float]:
    """All :data:`ELEMENT_PROPERTIES` of one element, NaN where pymatgen has no value."""

    def get(attribute: str) -> float:
        try:
            return _quantity(getattr(element, attribute))
        except (KeyError, AttributeError, ValueError, TypeError):
            return math.nan

    props = {
        "Z": float(element.Z),
        "mass": get("atomic_mass"),
        "row": get("row"),
        "group": get("group"),
        "mendeleev": get("mendeleev_no"),
        "electronegativity": get("X"),
        "atomic_radius": get("atomic_radius"),
        "ionic_radius": get("average_ionic_radius"),
        "melting_point": get("melting_point"),
        "ionization_energy": get("ionization_energy"),
        "electron_affinity": get("electron_affinity"),
        "molar_volume": get("molar_volume"),
    }
    if props["ionic_radius"] == 0.0:  # pymatgen's placeholder for "no ionic radius" (noble gases)
        props["ionic_radius"] = math.nan
    props.update(_valence_counts(element))
    return props


@functools.cache
def _element_table() -> Mapping[str, Mapping[str, float]]:
    """Property table for every element pymatgen knows, with missing values imputed (read-only memo)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for each missing property
        raw = {el.symbol: _raw_element_properties(el) for el in Element}
    means = {}
    for name in ELEMENT_PROPERTIES:
        known = [raw[Element.from_Z(z).symbol][name] for z in _IMPUTATION_Z]
        known = [v for v in known if not math.isnan(v)]
        means[name] = float(np.mean(known))
    table = {
        symbol: MappingProxyType({n: (means[n] if math.isnan(v) else v) for n, v in props.items()})
        for symbol, props in raw.items()
    }
    return MappingProxyType(table)


def element_properties(symbol: str) -> Mapping[str, float]:
    """The :data:`ELEMENT_PROPERTIES` of one element (missing values imputed with the Z = 1..103 mean).

    Raises:
        FeatureError: ``symbol`` is not an element symbol, naming it.
    """
    table = _element_table()
    if symbol not in table:
        raise FeatureError(f"{symbol!r} is not an element symbol; use symbols such as 'Ga' or 'As'.")
    return table[symbol]
