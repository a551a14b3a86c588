"""Formation energies and energies above the convex hull on the Materials Project scale.

Two ways to turn an MLIP total energy into a formation energy comparable with the reference table
(``mp_formation_energies.csv.gz``, MP's ~2018-2019 correction scheme):

* ``mp2020``: the MLIP energy is treated as an uncorrected MP GGA(+U) energy, pymatgen's
  MaterialsProject2020Compatibility corrections are applied (anion and GGA/GGA+U mixing), and MP's 2023
  elemental reference entries are subtracted. Needs no calibration; inherits the vintage mismatch between
  the table and today's MP.
* ``fitted`` (default): per-element reference energies mu_el (eV/atom) are fitted for the chosen potential so
  that well-known ground-state compounds, built from prototypes and relaxed with that same potential, reproduce
  the table's formation energies (ridge regression toward the mp2020-scheme values). The fit's leave-one-out
  error is recorded with the scheme.

Energies above hull are distances to a hull built from the table's entries of the candidate's chemical system
plus all screened candidates (elements at 0 eV/atom).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element
from pymatgen.entries.computed_entries import ComputedEntry

#: Hubbard U (eV) that MP applies to these metals in oxides and fluorides (MPRelaxSet); decides GGA vs GGA+U.
MP_HUBBARD_U = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}

#: Well-known ground states used to calibrate elemental reference energies: (prototype, species).
#: Each is the lowest-energy polymorph of its formula in Materials Project (or within a few meV/atom of it).
CALIBRATION_COMPOUNDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zincblende", ("Al", "P")),
    ("zincblende", ("Al", "As")),
    ("zincblende", ("Al", "Sb")),
    ("zincblende", ("Ga", "P")),
    ("zincblende", ("Ga", "As")),
    ("zincblende", ("Ga", "Sb")),
    ("zincblende", ("In", "P")),
    ("zincblende", ("In", "As")),
    ("zincblende", ("In", "Sb")),
    ("zincblende", ("Zn", "S")),
    ("zincblende", ("Zn", "Se")),
    ("zincblende", ("Zn", "Te")),
    ("zincblende", ("Cd", "Te")),
    ("zincblende", ("Cu", "Cl")),
    ("zincblende", ("Cu", "I")),
    ("zincblende", ("Si", "C")),
    ("wurtzite", ("Al", "N")),
    ("wurtzite", ("Ga", "N")),
    ("wurtzite", ("In", "N")),
    ("wurtzite", ("Zn", "O")),
    ("wurtzite", ("Cd", "S")),
    ("wurtzite", ("Cd", "Se")),
    ("wurtzite", ("Be", "O")),
    ("rocksalt", ("Mg", "O")),
    ("rocksalt", ("Ca", "O")),
    ("rocksalt", ("Sr", "O")),
    ("rocksalt", ("Ba", "O")),
    ("rocksalt", ("Cd", "O")),
    ("rocksalt", ("Li", "F")),
    ("rocksalt", ("Na", "Cl")),
    ("rocksalt", ("K", "Cl")),
    ("rocksalt", ("Pb", "S")),
    ("rocksalt", ("Pb", "Te")),
    ("rocksalt", ("Mg", "Se")),
    ("rocksalt", ("Ca", "S")),
    ("chalcopyrite", ("Cu", "In", "Se")),
    ("chalcopyrite", ("Cu", "Ga", "Se")),
    ("chalcopyrite", ("Cu", "In", "S")),
    ("chalcopyrite", ("Cu", "Ga", "S")),
    ("chalcopyrite", ("Cu", "Al", "S")),
    ("chalcopyrite", ("Ag", "Ga", "S")),
    ("chalcopyrite", ("Ag", "In", "Se")),
    ("chalcopyrite", ("Zn", "Ge", "P")),
    ("perovskite", ("Sr", "Ti", "O")),
    ("perovskite", ("Ba", "Zr", "O")),
    ("perovskite", ("Ba", "Sn", "O")),
    ("spinel", ("Mg", "Al", "O")),
    ("spinel", ("Zn", "Al", "O")),
    ("spinel", ("Zn", "Ga", "O")),
)

_ELEMENT_RE = re.compile(r"[A-Z][a-z]?")


def _data_path(name: str):
    return resources.files("materials.data").joinpath(name)


def mp_elemental_energies() -> dict[str, float]:
    """MP 2023 lowest-energy elemental phases: element -> uncorrected GGA energy, eV/atom."""
    with _data_path("mp_elemental_reference_entries.json.gz").open("rb") as raw:
        data = json.loads(gzip.decompress(raw.read()))
    out = {}
    for symbol, entry in data.items():
        comp = Composition(entry["composition"])
        out[symbol] = float(entry["energy"]) / comp.num_atoms
    return out


@dataclass(frozen=True)
class ReferenceRow:
    material_id: str
    formula: str
    e_form_per_atom: float
    elements: frozenset[str]


class ReferenceTable:
    """The MP formation-energy table (read once; query by chemical system). Energies in eV/atom."""

    def __init__(self, rows: Sequence[ReferenceRow]):
        self.rows = list(rows)
        self._by_formula: dict[str, list[ReferenceRow]] = defaultdict(list)
        for row in self.rows:
            self._by_formula[row.formula].append(row)

    @classmethod
    def load(cls) -> ReferenceTable:
        rows = []
        with _data_path("mp_formation_energies.csv.gz").open("rb") as raw:
            text = gzip.decompress(raw.read()).decode()
        for rec in csv.DictReader(text.splitlines()):
            value = float(rec["formation_energy_per_atom"])
            if not math.isfinite(value):
                continue
            formula = rec["formula"]
            rows.append(ReferenceRow(rec["material_id"], formula, value, frozenset(_ELEMENT_RE.findall(formula))))
        return cls(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def lowest_formation_energy(self, formula: str) -> float | None:
        """Lowest table E_form (eV/atom) among polymorphs of a formula, or None if absent."""
        rows = self._by_formula.get(Composition(formula).reduced_formula)
        return min(r.e_form_per_atom for r in rows) if rows else None

    def entries_within(self, elements: Iterable[str]) -> list[PDEntry]:
        """PDEntries (formation energy x atoms, eV) of every table row made only of ``elements``."""
        allowed = frozenset(elements)
        entries = []
        for row in self.rows:
            if row.elements <= allowed and len(row.elements) > 1:
                comp = Composition(row.formula)
                entries.append(PDEntry(comp, row.e_form_per_atom * comp.num_atoms, name=row.material_id))
        return entries


@dataclass
class EnergyReferences:
    """How MLIP energies become formation energies: the scheme, per-element reference energies mu (eV/atom),
    and the fit's quality. ``as_dict``/``from_dict`` round-trip; log it with every run."""

    scheme: str
    potential: str
    mu: dict[str, float]
    apply_mp2020: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnergyReferences:
        return cls(**dict(data))


def mp2020_correction(composition: Composition | str, energy: float) -> float:
    """MP2020 energy correction (eV, total) for an uncorrected GGA/GGA+U energy of ``composition``."""
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    comp = Composition(composition)
    symbols = {el.symbol for el in comp.elements}
    is_u = bool(symbols & {"O", "F"}) and bool(symbols & MP_HUBBARD_U.keys())
    params = {
        "run_type": "GGA+U" if is_u else "GGA",
        "is_hubbard": is_u,
        "hubbards": {el: MP_HUBBARD_U.get(el, 0.0) for el in symbols} if is_u else {},
        "potcar_spec": [],
    }
    entry = ComputedEntry(comp, energy, parameters=params)
    processed = MaterialsProject2020Compatibility(check_potcar=False).process_entry(entry)
    if processed is None:
        raise ValueError(f"{comp.reduced_formula}: MP2020 compatibility rejected the entry")
    return float(processed.correction)


def mp2020_references(potential: str) -> EnergyReferences:
    """The uncalibrated scheme: MP2020 corrections + MP 2023 elemental reference energies."""
    return EnergyReferences(scheme="mp2020", potential=potential, mu=mp_elemental_energies(), apply_mp2020=True)


def formation_energy_per_atom(composition: Composition | str, energy: float, refs: EnergyReferences) -> float:
    """E_form (eV/atom) of a total energy ``energy`` (eV) of ``composition`` under ``refs``.

    Raises:
        KeyError: an element has no reference energy (message names it).
    """
    comp = Composition(composition)
    missing = [el.symbol for el in comp.elements if el.symbol not in refs.mu]
    if missing:
        raise KeyError(f"no reference energy for {', '.join(missing)} in scheme {refs.scheme!r}")
    total = energy + (mp2020_correction(comp, energy) if refs.apply_mp2020 else 0.0)
    ref = sum(amount * refs.mu[el.symbol] for el, amount in comp.items())
    return (total - ref) / comp.num_atoms


@dataclass
class CalibrationPoint:
    """One calibration compound: its relaxed MLIP energy (eV/atom) and the table's E_form (eV/atom)."""

    formula: str
    energy_per_atom: float
    target_e_form: float


def fit_reference_energies(
    points: Sequence[CalibrationPoint],
    prior: EnergyReferences,
    ridge: float = 1e-3,
    potential: str | None = None,
) -> EnergyReferences:
    """Fit per-element reference energies so the points reproduce their table formation energies.

    Minimises sum_k (x_k . mu - y_k)^2 + ridge * sum_el (mu_el - mu0_el)^2 where x_k are atomic fractions,
    y_k = (corrected) energy per atom - target E_form, mu0 the prior's effective references (the prior's MP2020
    corrections folded in per compound). Elements absent from all points keep mu0. Records the RMSE and the
    leave-one-out RMSE (eV/atom) in ``calibration``.
    """
    if not points:
        raise ValueError("fit_reference_energies needs at least one calibration point")
    elements = sorted({el.symbol for p in points for el in Composition(p.formula).elements})
    index = {el: i for i, el in enumerate(elements)}
    x = np.zeros((len(points), len(elements)))
    y = np.zeros(len(points))
    for k, p in enumerate(points):
        comp = Composition(p.formula)
        for el, amount in comp.items():
            x[k, index[el.symbol]] = amount / comp.num_atoms
        n = comp.num_atoms
        corr = mp2020_correction(comp, p.energy_per_atom * n) / n if prior.apply_mp2020 else 0.0
        # folding the prior's correction into y keeps mu on the uncorrected-energy scale of the prior
        y[k] = p.energy_per_atom - p.target_e_form + corr
    mu0 = np.array([prior.mu[el] for el in elements])

    def solve(rows: np.ndarray) -> np.ndarray:
        a = x[rows].T @ x[rows] + ridge * np.eye(len(elements))
        b = x[rows].T @ y[rows] + ridge * mu0
        return np.linalg.solve(a, b)

    everything = np.arange(len(points))
    mu = solve(everything)
    residuals = x @ mu - y
    loo = []
    for k in everything:
        mu_k = solve(everything[everything != k])
        loo.append(float(x[k] @ mu_k - y[k]))
    fitted = dict(prior.mu)
    fitted.update({el: float(mu[i]) for el, i in index.items()})
    per_point = {
        p.formula: {"residual": float(-residuals[k]), "loo_residual": float(-loo[k])} for k, p in enumerate(points)
    }
    return EnergyReferences(
        scheme="fitted",
        potential=potential or prior.potential,
        mu=fitted,
        apply_mp2020=prior.apply_mp2020,
        calibration={
            "n_points": len(points),
            "ridge": ridge,
            "rmse": float(np.sqrt(np.mean(residuals**2))),
            "loo_rmse": float(np.sqrt(np.mean(np.square(loo)))),
            "fitted_elements": elements,
            "points": per_point,
        },
    )


@dataclass(frozen=True)
class HullItem:
    """A screened structure on the hull: id, composition, formation energy (eV/atom)."""

    id: str
    composition: Composition
    e_form_per_atom: float


def energies_above_hull(items: Sequence[HullItem], table: ReferenceTable) -> dict[str, float]:
    """Energy above hull (eV/atom) of each item against the table's phases of its chemical system plus all
    items within that system. Items with a non-finite formation energy get NaN."""
    valid = [it for it in items if math.isfinite(it.e_form_per_atom)]
    out = {it.id: math.nan for it in items}
    by_system: dict[frozenset[str], list[HullItem]] = defaultdict(list)
    for it in valid:
        by_system[frozenset(el.symbol for el in it.composition.elements)].append(it)
    for system, members in by_system.items():
        entries = [PDEntry(Composition({Element(el): 1}), 0.0, name=el) for el in sorted(system)]
        entries += table.entries_within(system)
        own = {}
        for it in valid:
            if frozenset(el.symbol for el in it.composition.elements) <= system:
                entry = PDEntry(it.composition, it.e_form_per_atom * it.composition.num_atoms, name=it.id)
                entries.append(entry)
                own[it.id] = entry
        diagram = PhaseDiagram(entries)
        for it in members:
            out[it.id] = float(diagram.get_e_above_hull(own[it.id], allow_negative=True))
    return out


def calibration_points(
    calculator,
    table: ReferenceTable,
    compounds: Sequence[tuple[str, Sequence[str]]] = CALIBRATION_COMPOUNDS,
    supported: Iterable[str] | None = None,
    relax_settings=None,
) -> tuple[list[CalibrationPoint], list[str]]:
    """Build each calibration compound from its prototype, relax it with ``calculator`` and pair its energy
    with the table's lowest E_form. Returns the points and a list of skipped compounds with reasons."""
    from materials.candidates import build_prototype
    from materials.relax import RelaxSettings, relax_structure

    settings = relax_settings or RelaxSettings(fmax=0.02, max_steps=400)
    allowed = set(supported) if supported is not None else None
    points, skipped = [], []
    for prototype, species in compounds:
        structure = build_prototype(prototype, species)
        formula = structure.composition.reduced_formula
        if allowed is not None and not set(species) <= allowed:
            skipped.append(f"{formula}: element not supported by the potential")
            continue
        target = table.lowest_formation_energy(formula)
        if target is None:
            skipped.append(f"{formula}: not in the reference table")
            continue
        result = relax_structure(structure, calculator, settings, item_id=f"{prototype}-{formula}")
        if result.status != "ok":
            skipped.append(f"{formula}: relaxation failed ({result.failure_reason})")
            continue
        points.append(CalibrationPoint(formula, result.energy_per_atom, target))
    return points, skipped


def calibrate_references(
    calculator,
    potential: str,
    table: ReferenceTable,
    supported: Iterable[str] | None = None,
    ridge: float = 1e-3,
) -> EnergyReferences:
    """Fitted scheme for one potential: relax the calibration compounds, fit mu around the mp2020 prior."""
    points, skipped = calibration_points(calculator, table, supported=supported)
    prior = mp2020_references(potential)
    if not points:
        prior.calibration = {"skipped": skipped, "note": "no calibration compound usable: mp2020 scheme kept"}
        return prior
    refs = fit_reference_energies(points, prior, ridge=ridge, potential=potential)
    refs.calibration["skipped"] = skipped
    return refs


def shipped_references(weights_hash: str) -> EnergyReferences | None:
    """Fitted references shipped in the package for a potential's weights hash, or None."""
    path = _data_path(f"reference_energies_{weights_hash}.json")
    if not path.is_file():
        return None
    return EnergyReferences.from_dict(json.loads(path.read_text()))
