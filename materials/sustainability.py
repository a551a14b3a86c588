"""What a composition costs the supply chain: supply concentration, price, scarcity, toxicity, criticality.

Pure functions of a composition, from data shipped with pymatgen and SMACT and one small file of our own:

- **HHI** (Herfindahl-Hirschman index, 0-10,000) of the world's *production* and of its known *reserves* of each
  element, by country: Gaultois et al., Chem. Mater. 25, 2911 (2013), as shipped by pymatgen
  (``pymatgen/analysis/hhi_data.csv``). A compound's HHI is the mass-fraction-weighted mean of its elements'
  (pymatgen's ``HHIModel`` convention). Above 2,500 the US DoJ calls a market highly concentrated.
- **Price** (USD/kg of compound, mass-weighted element prices of 2013): pymatgen's ``costdb_elements.csv``
  through its ``CostAnalyzer``.
- **Scarcity**: the crustal abundance (ppm by mass, CRC Handbook values shipped by SMACT, two corrected: see
  :data:`ABUNDANCE_CORRECTIONS_PPM`) of the scarcest element.
- **Toxic elements**: Pb, Hg and Cd (restricted in electronics by the EU RoHS directive 2011/65/EU), As, Tl and Be
  (carcinogenic or acutely toxic; restricted by REACH). Cr is not listed: only Cr(VI) is restricted.
- **Critical raw materials**: the EU's list of 34 (Regulation (EU) 2024/1252, Annex II, section 2, from the 2023
  assessment), as elements: ``materials/data/eu_critical_raw_materials_2023.csv`` (source and mapping in it).

A value the data does not have for some element is ``None`` here and ``"unknown"`` in tables, never 0: an HHI or a
price averaged over the elements that happen to be known would look better than it is.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Element

from materials.errors import InputError
from materials.reference import read_text_file

DATA = Path(__file__).parent / "data"
#: Elements restricted for toxicity (see the module docstring for the sources).
TOXIC_ELEMENTS = frozenset({"Pb", "Hg", "Cd", "As", "Tl", "Be"})
#: SMACT's crustal abundances that disagree with the CRC Handbook's table it cites ("Abundance of elements in the
#: earth's crust and in the sea", 97th ed.), checked against 48 elements: S is 350 ppm there (SMACT: 3.5, a factor
#: of 100), Nb 20 ppm (SMACT: 220). Every other checked element agrees within 5 %.
ABUNDANCE_CORRECTIONS_PPM = {"S": 350.0, "Nb": 20.0}
#: How a missing value is written in tables (CSV, DataFrames, MLflow).
UNKNOWN = "unknown"
#: Column names of :meth:`SustainabilityDescriptors.as_row`, in order.
SUSTAINABILITY_COLUMNS = (
    "hhi_production",
    "hhi_reserve",
    "cost_per_kg",
    "scarcest_element",
    "scarcest_abundance_ppm",
    "toxic_elements",
    "critical_raw_materials",
)


@dataclass(frozen=True)
class SustainabilityDescriptors:
    """Supply-chain descriptors of one composition.

    Attributes:
        formula: reduced formula.
        hhi_production: mass-weighted HHI of production (0-10,000), None if an element has no value.
        hhi_reserve: mass-weighted HHI of reserves (0-10,000), None if an element has no value.
        cost_per_kg: USD per kg of compound (2013 element prices), None if an element has no price.
        scarcest_element: the element with the lowest crustal abundance (None if none is known).
        scarcest_abundance_ppm: its crustal abundance, ppm by mass.
        toxic_elements: elements of :data:`TOXIC_ELEMENTS` in the composition.
        critical_raw_materials: elements on the EU critical raw materials list.
        missing: for each descriptor that is None, the elements it lacks data for.
    """

    formula: str
    hhi_production: float | None
    hhi_reserve: float | None
    cost_per_kg: float | None
    scarcest_element: str | None
    scarcest_abundance_ppm: float | None
    toxic_elements: tuple[str, ...]
    critical_raw_materials: tuple[str, ...]
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        """Table columns (:data:`SUSTAINABILITY_COLUMNS`): ``"unknown"`` for missing values, element lists joined
        with spaces (empty: none)."""
        row: dict[str, Any] = {}
        for name in SUSTAINABILITY_COLUMNS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                row[name] = " ".join(value)
            else:
                row[name] = UNKNOWN if value is None else value
        if self.scarcest_element is None:
            row["scarcest_element"] = UNKNOWN
        return row

    def as_dict(self) -> dict[str, Any]:
        return {
            "formula": self.formula,
            **{name: getattr(self, name) for name in SUSTAINABILITY_COLUMNS},
            "toxic_elements": list(self.toxic_elements),
            "critical_raw_materials": list(self.critical_raw_materials),
            "missing": {k: list(v) for k, v in self.missing.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SustainabilityDescriptors:
        return cls(
            formula=data["formula"],
            hhi_production=data["hhi_production"],
            hhi_reserve=data["hhi_reserve"],
            cost_per_kg=data["cost_per_kg"],
            scarcest_element=data["scarcest_element"],
            scarcest_abundance_ppm=data["scarcest_abundance_ppm"],
            toxic_elements=tuple(data["toxic_elements"]),
            critical_raw_materials=tuple(data["critical_raw_materials"]),
            missing={k: tuple(v) for k, v in data.get("missing", {}).items()},
        )


@cache
def hhi_table() -> dict[str, tuple[float, float]]:
    """Element -> (HHI of production, HHI of reserves) from pymatgen's table (Gaultois et al. 2013)."""
    from pymatgen.analysis.hhi import HHIModel

    return {symbol: (float(p), float(r)) for symbol, (p, r) in HHIModel().symbol_hhip_hhir.items()}


@cache
def _cost_analyzer():
    from pymatgen.analysis.cost import CostAnalyzer, CostDBElements

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CostAnalyzer(CostDBElements())


@cache
def priced_elements() -> frozenset[str]:
    """Elements with a price in pymatgen's element cost table."""
    analyzer = _cost_analyzer()
    return frozenset(
        el.symbol for entries in analyzer.costdb._chemsys_entries.values() for e in entries for el in e.composition
    )


@cache
def crustal_abundance_ppm() -> dict[str, float]:
    """Element -> crustal abundance (ppm by mass) from SMACT's element data (CRC Handbook); elements without a
    value are absent."""
    import smact

    out = {}
    for symbol in smact.ordered_elements(1, 103):
        try:
            value = smact.Element(symbol).crustal_abundance
        except (NameError, KeyError):
            continue
        if value is not None and math.isfinite(float(value)) and float(value) > 0:
            out[symbol] = float(value)
    return out | ABUNDANCE_CORRECTIONS_PPM


@cache
def critical_raw_materials() -> frozenset[str]:
    """Elements on the EU critical raw materials list (``eu_critical_raw_materials_2023.csv``)."""
    text = read_text_file(DATA / "eu_critical_raw_materials_2023.csv")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return frozenset(
        symbol for row in csv.DictReader(io.StringIO("\n".join(lines))) for symbol in row["elements"].split()
    )


def sustainability_descriptors(composition: Composition | str) -> SustainabilityDescriptors:
    """Supply-chain descriptors of ``composition`` (a formula or a pymatgen Composition).

    Raises:
        InputError: the formula cannot be parsed or is empty.
    """
    try:
        comp = Composition(composition)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"formula {composition!r}: not a chemical formula ({exc})") from exc
    if comp.num_atoms == 0:
        raise InputError(f"formula {composition!r}: empty composition")
    unknown_symbols = [str(el) for el in comp.elements if not isinstance(el, Element)]
    if unknown_symbols:  # pymatgen reads an unknown symbol as a dummy species
        raise InputError(f"formula {composition!r}: {', '.join(unknown_symbols)} is not a chemical element")
    symbols = sorted(el.symbol for el in comp.elements)
    missing: dict[str, tuple[str, ...]] = {}

    hhi = hhi_table()
    lacking = tuple(s for s in symbols if s not in hhi)
    hhi_p = hhi_r = None
    if lacking:
        missing["hhi"] = lacking
    else:
        weights = {s: comp.get_wt_fraction(s) for s in symbols}
        hhi_p = sum(weights[s] * hhi[s][0] for s in symbols)
        hhi_r = sum(weights[s] * hhi[s][1] for s in symbols)

    lacking = tuple(s for s in symbols if s not in priced_elements())
    cost = None
    if lacking:
        missing["cost_per_kg"] = lacking
    else:
        cost = float(_cost_analyzer().get_cost_per_kg(comp))

    abundance = crustal_abundance_ppm()
    known = [s for s in symbols if s in abundance]
    lacking = tuple(s for s in symbols if s not in abundance)
    if lacking:
        missing["abundance"] = lacking
    # the scarcest known element; unknown if an element without data could be scarcer
    scarcest = min(known, key=abundance.__getitem__) if known and not lacking else None
    return SustainabilityDescriptors(
        formula=comp.reduced_formula,
        hhi_production=hhi_p,
        hhi_reserve=hhi_r,
        cost_per_kg=cost,
        scarcest_element=scarcest,
        scarcest_abundance_ppm=abundance[scarcest] if scarcest else None,
        toxic_elements=tuple(s for s in symbols if s in TOXIC_ELEMENTS),
        critical_raw_materials=tuple(s for s in symbols if s in critical_raw_materials()),
        missing=missing,
    )


def sustainability_rows(formulas: Sequence[str | None]) -> list[dict[str, Any]]:
    """:meth:`SustainabilityDescriptors.as_row` of each formula, for tables; a missing or unreadable formula gets
    None in every column (the table's reader reports why it is unreadable). Computed once per formula."""
    rows: dict[str | None, dict[str, Any]] = {}
    out = []
    for formula in formulas:
        if formula not in rows:
            try:
                rows[formula] = sustainability_descriptors(formula).as_row() if formula else {}
            except InputError:
                rows[formula] = {}
        out.append({column: rows[formula].get(column) for column in SUSTAINABILITY_COLUMNS})
    return out


@dataclass(frozen=True)
class SupplyConstraint:
    """Which candidates a campaign may consider, by what their elements cost the supply chain. Known from the
    formula alone, so it filters the pool before any evaluation.

    Attributes:
        hhi_production_max: the largest mass-weighted production HHI allowed (None: no limit). A formula whose
            HHI is unknown (an element without data) is excluded: the limit cannot be checked.
        exclude_elements: element symbols a candidate must not contain.
        exclude_toxic: also exclude :data:`TOXIC_ELEMENTS`.
    """

    hhi_production_max: float | None = None
    exclude_elements: tuple[str, ...] = ()
    exclude_toxic: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.exclude_elements if not Element.is_valid_symbol(s)]
        if bad:
            raise InputError(f"exclude_elements: {bad} are not element symbols (e.g. Cd, Pb)")

    @property
    def active(self) -> bool:
        return self.hhi_production_max is not None or bool(self.exclude_elements) or self.exclude_toxic

    def violation(self, formula: str) -> str | None:
        """Why ``formula`` is excluded (one line naming the rule and the elements), or None if it is allowed."""
        try:
            d = sustainability_descriptors(formula)
        except InputError as exc:
            return str(exc)
        symbols = {el.symbol for el in Composition(formula).elements}
        banned = sorted(symbols & set(self.exclude_elements))
        if banned:
            return f"contains excluded element(s) {' '.join(banned)} (exclude_elements)"
        if self.exclude_toxic and d.toxic_elements:
            return f"contains toxic element(s) {' '.join(d.toxic_elements)} (exclude_toxic)"
        if self.hhi_production_max is not None:
            if d.hhi_production is None:
                return (
                    f"production HHI unknown (no data for {' '.join(d.missing['hhi'])}): hhi_production_max unchecked"
                )
            if d.hhi_production > self.hhi_production_max:
                return f"production HHI {d.hhi_production:.0f} > hhi_production_max {self.hhi_production_max:.0f}"
        return None


def median_hhi_production(formulas: Sequence[str]) -> float:
    """The median production HHI over ``formulas`` (those with data), e.g. a pool's, for "below the pool median".

    Raises:
        InputError: no formula has a known HHI.
    """
    values = []
    for formula in formulas:
        try:
            value = sustainability_descriptors(formula).hhi_production
        except InputError:
            continue
        if value is not None:
            values.append(value)
    if not values:
        raise InputError("no formula of the pool has a known production HHI: give hhi_production_max as a number")
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
