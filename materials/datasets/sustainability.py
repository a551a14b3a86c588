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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Element

from materials.datasets.records import finite_float, read_text_file
from materials.errors import InputError

DATA = Path(__file__).parent.parent / "data"
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


#: Band-gap window (eV) of a single-junction photovoltaic absorber (the ``sustainable_absorber`` preset's window),
#: shaded on :func:`gap_supply_figure`.
PV_GAP_WINDOW = (1.1, 1.8)


@dataclass(frozen=True)
class StableCandidate:
    """One stable candidate of :class:`SupplyRiskSummary` (values as in results.csv; None where missing)."""

    id: str
    formula: str
    e_above_hull: float
    gap: float | None
    hhi_production: float | None
    toxic_elements: tuple[str, ...]
    low_supply_risk: bool


@dataclass(frozen=True)
class SupplyRiskSummary:
    """The stable candidates of a screen split by what they cost the supply chain.

    *Low supply risk* means: production HHI known and below ``hhi_median`` (the median over every successfully
    relaxed candidate of the screen, the same "below the pool median" as the ``sustainable_absorber`` preset) and
    no toxic element (:data:`TOXIC_ELEMENTS`). A candidate whose HHI is unknown is never counted as low risk.

    Attributes:
        stable_threshold: E_hull (eV/atom) at or below which a candidate counts as stable.
        gap_column: the band-gap column read for each candidate (``gap_expt``; None values where absent).
        hhi_median: median production HHI of the screen's relaxed candidates (None: no candidate has one).
        n_relaxed: candidates with status ok; n_relaxed_hhi_unknown: those among them without a production HHI.
        stable: every stable candidate, lowest E_hull first.
    """

    stable_threshold: float
    gap_column: str
    hhi_median: float | None
    n_relaxed: int
    n_relaxed_hhi_unknown: int
    stable: tuple[StableCandidate, ...]

    @property
    def low_risk(self) -> tuple[StableCandidate, ...]:
        return tuple(c for c in self.stable if c.low_supply_risk)

    def as_dict(self) -> dict[str, Any]:
        """Counts for a run record (MLflow metrics, JSON)."""
        return {
            "stable_threshold": self.stable_threshold,
            "hhi_production_median": self.hhi_median,
            "n_relaxed": self.n_relaxed,
            "n_relaxed_hhi_unknown": self.n_relaxed_hhi_unknown,
            "n_stable": len(self.stable),
            "n_stable_low_supply_risk": len(self.low_risk),
            "n_stable_toxic": sum(1 for c in self.stable if c.toxic_elements),
            "n_stable_hhi_unknown": sum(1 for c in self.stable if c.hhi_production is None),
            "n_stable_low_supply_risk_in_pv_window": sum(
                1 for c in self.low_risk if c.gap is not None and PV_GAP_WINDOW[0] <= c.gap <= PV_GAP_WINDOW[1]
            ),
        }


def supply_risk_summary(
    rows: Iterable[dict[str, Any]], stable_threshold: float, gap_column: str = "gap_expt"
) -> SupplyRiskSummary:
    """Split a screen's stable candidates into low and higher supply risk (see :class:`SupplyRiskSummary`).

    Args:
        rows: results.csv rows (``csv.DictReader`` or ``DataFrame.to_dict("records")``): ``id``, ``formula``,
            ``status``, ``e_above_hull`` (eV/atom), ``hhi_production``, ``toxic_elements`` and, if present,
            ``gap_column`` (eV). Read once, keeping only the stable rows and one number per relaxed row.
        stable_threshold: E_hull (eV/atom) at or below which a candidate is stable.
    """
    hhis: list[float] = []
    n_relaxed = 0
    stable: list[tuple[str, str, float, float | None, float | None, tuple[str, ...]]] = []
    for row in rows:
        if row.get("status") != "ok":
            continue
        n_relaxed += 1
        hhi = finite_float(row.get("hhi_production"))
        if hhi is not None:
            hhis.append(hhi)
        e_hull = finite_float(row.get("e_above_hull"))
        if e_hull is None or e_hull > stable_threshold:
            continue
        toxic = row.get("toxic_elements")
        toxic = tuple(str(toxic).split()) if isinstance(toxic, str) else ()
        stable.append(
            (str(row.get("id")), str(row.get("formula")), e_hull, finite_float(row.get(gap_column)), hhi, toxic)
        )
    median = None
    if hhis:
        hhis.sort()
        mid = len(hhis) // 2
        median = hhis[mid] if len(hhis) % 2 else 0.5 * (hhis[mid - 1] + hhis[mid])
    candidates = tuple(
        StableCandidate(
            id=i,
            formula=f,
            e_above_hull=e,
            gap=g,
            hhi_production=h,
            toxic_elements=t,
            low_supply_risk=median is not None and h is not None and h < median and not t,
        )
        for i, f, e, g, h, t in sorted(stable, key=lambda s: (s[2], s[0]))
    )
    return SupplyRiskSummary(
        stable_threshold=stable_threshold,
        gap_column=gap_column,
        hhi_median=median,
        n_relaxed=n_relaxed,
        n_relaxed_hhi_unknown=n_relaxed - len(hhis),
        stable=candidates,
    )


def gap_supply_figure(summary: SupplyRiskSummary, path: str | Path | None = None, label_top: int = 12):
    """Band gap (y, eV) against production HHI (x) of the stable candidates: low supply risk (green), toxic
    elements (red crosses), the rest (grey); the screen's HHI median as a dashed line and the single-junction PV
    window (:data:`PV_GAP_WINDOW`) shaded. Candidates without a gap or an HHI are counted in the title, not drawn.

    Returns the ``matplotlib.figure.Figure`` (saved to ``path`` when given); None when no stable candidate has
    both numbers.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    drawn = [c for c in summary.stable if c.gap is not None and c.hhi_production is not None]
    if not drawn:
        return None
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.axhspan(*PV_GAP_WINDOW, color="gold", alpha=0.18, label=f"PV window {PV_GAP_WINDOW[0]}-{PV_GAP_WINDOW[1]} eV")
    groups = (
        ("low supply risk", "tab:green", "o", [c for c in drawn if c.low_supply_risk]),
        ("toxic element", "tab:red", "x", [c for c in drawn if c.toxic_elements]),
        ("higher supply risk", "0.55", "o", [c for c in drawn if not c.low_supply_risk and not c.toxic_elements]),
    )
    for label, colour, marker, members in groups:
        if members:
            ax.scatter(
                [c.hhi_production for c in members],
                [c.gap for c in members],
                c=colour,
                marker=marker,
                s=28,
                label=f"{label} ({len(members)})",
            )
    if summary.hhi_median is not None:
        ax.axvline(summary.hhi_median, color="k", ls="--", lw=1, label=f"screen median HHI {summary.hhi_median:.0f}")
    for c in sorted(drawn, key=lambda c: (not c.low_supply_risk, c.e_above_hull))[:label_top]:
        ax.annotate(c.formula, (c.hhi_production, c.gap), fontsize=7, xytext=(3, 3), textcoords="offset points")
    hidden = len(summary.stable) - len(drawn)
    ax.set_xlabel("production HHI (supply concentration, 0-10,000)")
    ax.set_ylabel(f"band gap, {summary.gap_column} (eV)")
    title = f"{len(summary.stable)} stable candidates (E_hull <= {summary.stable_threshold} eV/atom)"
    ax.set_title(title + (f"; {hidden} without gap or HHI not drawn" if hidden else ""), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
