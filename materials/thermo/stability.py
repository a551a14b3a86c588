"""Formation energies and signed distances to the convex hull, on the Materials Project 2020 scale.

One scale for everything a scientist compares: MP's energies with the MP2020 corrections
(pymatgen's ``MaterialsProject2020Compatibility``) minus MP's 2023 elemental reference energies. This is
Matbench Discovery's recipe. How a potential's energies reach that scale is its *energy convention*:

* ``mp2020``: already on the MP2020-corrected scale (CHGNet 0.2.0/0.3.0, trained on MPtrj's corrected
  energies). Nothing is added: E_form = (E - sum_el n_el mu_el^MP) / N.
* ``uncorrected``: raw GGA/GGA+U energies (MACE-MP foundation models, SevenNet and most MPtrj models). The
  MP2020 correction of the composition is added exactly once before the MP elemental energies are subtracted.
* ``self``: a model trained on this project's own DFT (a fine-tuned MACE) or any model whose absolute energies
  are not MP's (EMT). Elemental references come from the same model: the elemental crystals
  (:func:`elemental_reference_structure`) relaxed with it (:func:`model_elemental_references`).

The reference hull is the shipped MP formation-energy table, put on the MP2020 scale row by row
(:func:`mp2020_from_legacy`; provenance and the measurement behind it in ``materials/data/README.md``), plus the
elements at 0 eV/atom. :func:`hull_distances` gives each screened structure two numbers, eV/atom:

* ``e_above_hull``: signed distance to the reference hull (table + elements). Negative when the structure lies
  below every known phase; below :data:`BELOW_HULL_WARNING` the row carries a warning (most often a model
  error, sometimes a discovery).
* ``e_above_hull_screen``: distance to the hull that also holds this screen's structures (>= 0).
"""

from __future__ import annotations

import csv
import functools
import gzip
import itertools
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any, Literal

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Structure
from pymatgen.entries.computed_entries import ComputedEntry

from materials.composition import formula_symbols
from materials.errors import InputError
from materials.potentials.relax import RelaxSettings, relax_structure
from materials.structures.candidates import build_prototype

EnergyConvention = Literal["mp2020", "uncorrected", "self"]
#: The energy conventions a potential can declare (see the module docstring).
ENERGY_CONVENTIONS: tuple[str, ...] = ("mp2020", "uncorrected", "self")
#: A structure this far below the reference hull (eV/atom) gets a warning: most often a model error.
BELOW_HULL_WARNING = -0.1
#: The shipped reference table, on the MP2020 scale (``scripts/convert_reference_table.py`` writes it).
REFERENCE_TABLE_FILE = "mp_formation_energies_mp2020.csv.gz"
#: Elements whose elemental reference is a molecular crystal: relax positions only, never the cell.
MOLECULAR_REFERENCES = frozenset({"H", "N", "O", "F", "Cl", "Br", "I"})


class StabilityError(InputError):
    """Energies cannot be put on the reference scale; the message names the item and the fix."""


def _data_path(name: str):
    return resources.files("materials.data").joinpath(name)


# ------------------------------------------------------------------------------------------ energy references


@functools.cache
def mp_elemental_energies() -> Mapping[str, float]:
    """MP 2023 lowest-energy elemental phases: element -> uncorrected GGA energy, eV/atom (89 elements, the
    MPtrj coverage). Elements carry no MP2020 correction, so these serve both ``mp2020`` and ``uncorrected``."""
    with _data_path("mp_elemental_reference_entries.json.gz").open("rb") as raw:
        data = json.loads(gzip.decompress(raw.read()))
    return {
        symbol: float(entry["energy"]) / Composition(entry["composition"]).num_atoms for symbol, entry in data.items()
    }


@dataclass
class ElementalEnergies:
    """How a potential's total energies become formation energies.

    Attributes:
        convention: ``mp2020`` | ``uncorrected`` | ``self`` (module docstring); ``gpaw`` for raw DFT references.
        potential: label of the potential (or DFT settings) the energies come from.
        mu: elemental reference energies, eV/atom, on the convention's scale.
        source: where ``mu`` comes from: ``mp-2023`` (MP's elemental entries) or ``model`` (relaxed with it).
        missing: element -> why it has no reference (``self`` references that could not be computed).
        offsets: optional fitted per-element offsets delta_el (eV/atom of that element), subtracted as
            sum_el x_el delta_el from E_form (:func:`fit_element_offsets`); empty for the plain recipe.
        calibration: how the offsets were fitted and how well they do on held-out elements.
    """

    convention: str
    potential: str
    mu: dict[str, float]
    source: str = "mp-2023"
    missing: dict[str, str] = field(default_factory=dict)
    offsets: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def applies_mp2020(self) -> bool:
        """True when the MP2020 correction is added to the potential's energies (``uncorrected``)."""
        return self.convention == "uncorrected"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ElementalEnergies:
        return cls(**dict(data))


def mp_references(convention: str, potential: str) -> ElementalEnergies:
    """References for a potential on MP's scale (``mp2020`` or ``uncorrected``): MP 2023 elemental energies.

    Raises:
        StabilityError: ``convention`` is ``self`` (its references come from the model) or unknown.
    """
    if convention not in ("mp2020", "uncorrected"):
        raise StabilityError(
            f"energy convention {convention!r} has no MP elemental references: use model_elemental_references "
            "for 'self', or one of 'mp2020', 'uncorrected'"
        )
    return ElementalEnergies(convention=convention, potential=potential, mu=dict(mp_elemental_energies()))


@functools.cache
def _mp_run_settings() -> tuple[Mapping[str, float], Mapping[str, str]]:
    """MP's Hubbard U values for oxides/fluorides (eV) and POTCAR names, from pymatgen's ``MPRelaxSet``."""
    from pymatgen.io.vasp.sets import MPRelaxSet

    config = MPRelaxSet.CONFIG
    return config["INCAR"]["LDAUU"]["O"], config["POTCAR"]


def _mp_computed_entry(composition: Composition, energy: float) -> ComputedEntry:
    """A ComputedEntry carrying the run parameters MP would have used (GGA+U for oxides/fluorides of the U
    metals), so pymatgen's compatibility classes accept it and pick the right corrections."""
    hubbard_u, potcars = _mp_run_settings()
    symbols = sorted(el.symbol for el in composition.elements)
    is_u = bool({"O", "F"} & set(symbols)) and bool(set(symbols) & hubbard_u.keys())
    titles = [f"PAW_PBE {potcars.get(s, s)}" for s in symbols]
    params = {
        "run_type": "GGA+U" if is_u else "GGA",
        "is_hubbard": is_u,
        "hubbards": {s: hubbard_u.get(s, 0.0) for s in symbols} if is_u else {},
        "potcar_symbols": titles,
        "potcar_spec": [{"titel": t, "hash": None} for t in titles],
    }
    return ComputedEntry(composition, energy, parameters=params)


def _correction(compatibility, composition: Composition | str, energy: float, scheme: str) -> float:
    comp = Composition(composition)
    with warnings.catch_warnings():  # "no structure: peroxides detected by formula" and oxidation-guess notes
        warnings.simplefilter("ignore")
        processed = compatibility.process_entry(_mp_computed_entry(comp, energy))
    if processed is None:
        raise StabilityError(f"{comp.reduced_formula}: pymatgen's {scheme} compatibility rejected the entry")
    return float(processed.correction)


@functools.cache
def _mp2020_compatibility():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


@functools.cache
def _legacy_compatibility():
    from pymatgen.entries.compatibility import MaterialsProjectCompatibility

    with warnings.catch_warnings():  # deprecated for new data; used here only to undo it on legacy rows
        warnings.simplefilter("ignore", DeprecationWarning)
        return MaterialsProjectCompatibility(check_potcar_hash=False)


@functools.lru_cache(maxsize=65536)
def _per_formula_unit(formula: str, scheme: str) -> float:
    compatibility = _mp2020_compatibility() if scheme == "MP2020" else _legacy_compatibility()
    return _correction(compatibility, formula, -1.0, scheme)


def _scaled(composition: Composition | str, scheme: str) -> float:
    comp = Composition(composition)
    formula, units = comp.get_reduced_formula_and_factor()
    return _per_formula_unit(formula, scheme) * units


def mp2020_correction(composition: Composition | str, energy: float = 0.0) -> float:
    """MP2020 energy correction (eV, total) of an uncorrected GGA/GGA+U energy of ``composition``: anion
    corrections and, for oxides/fluorides of V, Cr, Mn, Fe, Co, Ni, Mo and W, the GGA/GGA+U mixing correction.
    Depends on the composition only (peroxides and superoxides are recognised by formula), so it is computed
    once per reduced formula; ``energy`` is accepted for the signature's sake."""
    return _scaled(composition, "MP2020")


def legacy_mp_correction(composition: Composition | str, energy: float = 0.0) -> float:
    """MP's pre-2020 correction (eV, total; pymatgen's ``MaterialsProjectCompatibility``): oxide and sulfide
    anion corrections and older U corrections; no Br, I, Se, Te, N, F, Cl, H or Sb corrections (N, F, Cl and H
    were corrected through fitted elemental energies instead: :func:`legacy_gas_references`)."""
    return _scaled(composition, "legacy MP")


@functools.cache
def legacy_gas_references() -> Mapping[str, float]:
    """Fitted elemental energies (eV/atom) the legacy scheme used for N, F, Cl and H in place of the computed
    diatomic molecules (``MPCompatibility.yaml``, ``CompoundEnergies``)."""
    from monty.serialization import loadfn
    from pymatgen.analysis import compatibility

    config = loadfn(resources.files(compatibility).joinpath("MPCompatibility.yaml"))
    energies = config["Advanced"]["CompoundEnergies"]
    return {Composition(name).elements[0].symbol: float(value) for name, value in energies.items()}


def mp2020_from_legacy(composition: Composition | str, e_form_legacy: float) -> float:
    """A formation energy (eV/atom) of MP's pre-2020 scheme put on the MP2020 scale.

    E_form(MP2020) = E_form(legacy) + [C_2020 - C_legacy] / N + sum_el x_el (mu_el^legacy - mu_el^2023), with C
    the two schemes' compound corrections (pymatgen's two compatibility classes) and mu^legacy the fitted gas
    references of N, F, Cl, H (other elements: the MP 2023 energies, i.e. no term). Leaving out the gas term is
    what made a blanket shift put LiF 0.23 eV/atom too low.

    Raises:
        StabilityError: a compatibility class rejects the composition.
    """
    comp = Composition(composition)
    n = comp.num_atoms
    delta = (mp2020_correction(comp) - legacy_mp_correction(comp)) / n
    if len(comp) > 1:
        mu = mp_elemental_energies()
        for symbol, value in legacy_gas_references().items():
            amount = comp[Element(symbol)]
            if amount:
                delta += amount * (value - mu[symbol]) / n
    return e_form_legacy + delta


def formation_energy_per_atom(composition: Composition | str, energy: float, refs: ElementalEnergies) -> float:
    """E_form (eV/atom) of a total energy ``energy`` (eV) of ``composition``: the MP2020 correction is added
    when ``refs.convention`` is ``uncorrected`` (and only then), then the elemental references (plus any fitted
    offsets) subtracted.

    Raises:
        KeyError: an element has no reference energy (message names it and the convention).
    """
    comp = Composition(composition)
    missing = [el.symbol for el in comp.elements if el.symbol not in refs.mu]
    if missing:
        raise KeyError(f"no reference energy for {', '.join(missing)} under convention {refs.convention!r}")
    total = energy + (mp2020_correction(comp, energy) if refs.applies_mp2020 and len(comp) > 1 else 0.0)
    ref = sum(amount * (refs.mu[el.symbol] + refs.offsets.get(el.symbol, 0.0)) for el, amount in comp.items())
    return (total - ref) / comp.num_atoms


# ------------------------------------------------------------------------------------- the model's own elements


def elemental_reference_structure(symbol: str) -> Structure:
    """The elemental reference crystal for ``symbol``: the Delta-test structure (``ase.collections.dcdft``:
    71 elements at their all-electron PBE equilibrium volumes, with the Delta test's magnetic orders: AFM O2
    crystal, Cr and Mn, FM Fe, Co and Ni; molecular crystals for H, N, O, F, Cl, Br, I; α-Ga; graphite) reduced
    to its primitive cell, else ASE's ``bulk(symbol)`` reference state.

    Raises:
        StabilityError: no structure is known for ``symbol``.
    """
    from ase.build import bulk
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    if symbol in dcdft.names:
        structure = AseAtomsAdaptor.get_structure(dcdft[symbol])
        return structure.get_primitive_structure(use_site_props=True)
    try:
        return AseAtomsAdaptor.get_structure(bulk(symbol))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StabilityError(
            f"no elemental reference structure for {symbol}: not in ase.collections.dcdft and "
            f"ase.build.bulk fails ({exc})"
        ) from exc


def model_elemental_references(
    calculator, symbols: Iterable[str], potential: str, relax_settings=None
) -> ElementalEnergies:
    """``self`` references: each element's reference crystal (:func:`elemental_reference_structure`) relaxed with
    ``calculator`` (cell and positions; positions only for the molecular crystals). An element whose structure is
    unknown or whose relaxation fails is listed in ``missing`` with the reason, never given a made-up value."""
    settings = relax_settings or RelaxSettings(fmax=0.02, max_steps=400)
    mu: dict[str, float] = {}
    missing: dict[str, str] = {}
    for symbol in sorted(set(symbols)):
        try:
            structure = elemental_reference_structure(symbol)
        except StabilityError as exc:
            missing[symbol] = str(exc)
            continue
        if symbol in MOLECULAR_REFERENCES:
            run = RelaxSettings(**{**asdict(settings), "relax_cell": False, "batched": False})
        else:
            run = RelaxSettings(**{**asdict(settings), "batched": False})
        result = relax_structure(structure, calculator, run, item_id=f"reference-{symbol}")
        if result.status != "ok":
            missing[symbol] = f"relaxation of the {symbol} reference crystal failed: {result.failure_reason}"
            continue
        mu[symbol] = float(result.energy_per_atom)
    return ElementalEnergies(convention="self", potential=potential, mu=mu, source="model", missing=missing)


# ----------------------------------------------------------------------------------- fitted offsets (opt-in)

#: Known ground states (the lowest MP polymorph of their formula) built from prototypes: (prototype, species,
#: anion class). ``fluorite:a`` and ``cesiumchloride:a`` are ASE ``bulk`` structures with lattice constant a (Å).
#: Every anion class and the U-metal oxides are present; benchmarks/stability_accuracy.py measures on them.
GROUND_STATES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("rocksalt", ("Mg", "O"), "oxide"),
    ("wurtzite", ("Zn", "O"), "oxide"),
    ("rocksalt", ("Ca", "O"), "oxide"),
    ("wurtzite", ("Be", "O"), "oxide"),
    ("perovskite", ("Sr", "Ti", "O"), "oxide"),
    ("spinel", ("Mg", "Al", "O"), "oxide"),
    ("rocksalt", ("Mn", "O"), "oxide+U"),
    ("rocksalt", ("Fe", "O"), "oxide+U"),
    ("rocksalt", ("Co", "O"), "oxide+U"),
    ("rocksalt", ("Ni", "O"), "oxide+U"),
    ("rocksalt", ("Li", "F"), "fluoride"),
    ("rocksalt", ("Na", "F"), "fluoride"),
    ("fluorite:5.46", ("Ca", "F"), "fluoride"),
    ("rocksalt", ("Na", "Cl"), "chloride"),
    ("rocksalt", ("K", "Cl"), "chloride"),
    ("zincblende", ("Cu", "Cl"), "chloride"),
    ("cesiumchloride:4.12", ("Cs", "Cl"), "chloride"),
    ("rocksalt", ("Na", "Br"), "bromide"),
    ("rocksalt", ("K", "Br"), "bromide"),
    ("zincblende", ("Cu", "Br"), "bromide"),
    ("cesiumchloride:4.29", ("Cs", "Br"), "bromide"),
    ("rocksalt", ("Na", "I"), "iodide"),
    ("rocksalt", ("K", "I"), "iodide"),
    ("zincblende", ("Cu", "I"), "iodide"),
    ("cesiumchloride:4.57", ("Cs", "I"), "iodide"),
    ("zincblende", ("Zn", "S"), "sulfide"),
    ("wurtzite", ("Cd", "S"), "sulfide"),
    ("rocksalt", ("Pb", "S"), "sulfide"),
    ("rocksalt", ("Ca", "S"), "sulfide"),
    ("chalcopyrite", ("Cu", "Ga", "S"), "sulfide"),
    ("zincblende", ("Zn", "Se"), "selenide"),
    ("wurtzite", ("Cd", "Se"), "selenide"),
    ("rocksalt", ("Pb", "Se"), "selenide"),
    ("chalcopyrite", ("Cu", "In", "Se"), "selenide"),
    ("zincblende", ("Zn", "Te"), "telluride"),
    ("zincblende", ("Cd", "Te"), "telluride"),
    ("rocksalt", ("Pb", "Te"), "telluride"),
    ("wurtzite", ("Ga", "N"), "nitride"),
    ("wurtzite", ("Al", "N"), "nitride"),
    ("rocksalt", ("Sc", "N"), "nitride"),
    ("rocksalt", ("Ti", "N"), "nitride"),
    ("zincblende", ("Ga", "P"), "pnictide"),
    ("zincblende", ("In", "P"), "pnictide"),
    ("zincblende", ("Ga", "As"), "pnictide"),
    ("zincblende", ("In", "As"), "pnictide"),
    ("zincblende", ("Al", "Sb"), "pnictide"),
    ("zincblende", ("In", "Sb"), "pnictide"),
    ("rocksalt", ("Li", "H"), "hydride"),
    ("rocksalt", ("Na", "H"), "hydride"),
    ("zincblende", ("Si", "C"), "carbide"),
)


def build_ground_state(prototype: str, species: Sequence[str]) -> Structure:
    """The structure of a :data:`GROUND_STATES` entry (prototype cells scaled to a covalent volume estimate)."""
    if ":" in prototype:
        from ase.build import bulk
        from pymatgen.io.ase import AseAtomsAdaptor

        name, a = prototype.split(":")
        formula = "".join(species) + ("2" if name == "fluorite" else "")
        return AseAtomsAdaptor.get_structure(bulk(formula, name, a=float(a)))
    return build_prototype(prototype, species)


def fit_element_offsets(
    points: Sequence[tuple[Composition, float]], ridge: float = 1e-3
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-element offsets delta (eV/atom of the element) with sum_el x_el delta_el ~ residual, where residual =
    E_form(plain recipe) - E_form(reference) of each point; ridge toward 0, so an element seen rarely moves little
    and an element never seen keeps the plain recipe.

    Returns the offsets and the calibration record: in-sample MAE, the plain MAE, and the leave-one-element-out
    MAE (each compound predicted, for each of its elements X, by a fit that never saw X; averaged over its
    elements) beside the plain MAE on the same compounds: the figure to quote.
    """
    import numpy as np

    if not points:
        raise StabilityError("fit_element_offsets needs at least one (composition, residual) point")
    elements = sorted({el.symbol for comp, _ in points for el in comp.elements})
    x = np.array([[comp.get_atomic_fraction(Element(el)) for el in elements] for comp, _ in points])
    y = np.array([residual for _, residual in points])

    def fit(rows: np.ndarray) -> np.ndarray:
        a = x[rows].T @ x[rows] + ridge * np.eye(len(elements))
        return np.linalg.solve(a, x[rows].T @ y[rows])

    everything = np.arange(len(points))
    delta = fit(everything)
    held: list[list[float]] = [[] for _ in everything]
    for j in range(len(elements)):
        has = x[:, j] > 0
        if has.all():
            continue
        without = fit(everything[~has])
        for k in everything[has]:
            held[k].append(float(y[k] - x[k] @ without))
    predicted = [k for k in everything if held[k]]
    calibration = {
        "n_points": len(points),
        "ridge": ridge,
        "mae_plain": float(np.mean(np.abs(y))),
        "mae_in_sample": float(np.mean(np.abs(y - x @ delta))),
        "mae_leave_one_element_out": float(np.mean([abs(np.mean(held[k])) for k in predicted])),
        "mae_plain_same_compounds": float(np.mean(np.abs(y[predicted]))),
        "fitted_elements": elements,
    }
    return {el: float(delta[j]) for j, el in enumerate(elements)}, calibration


def calibrate_element_offsets(
    calculator, refs: ElementalEnergies, table: HullTable, supported: Iterable[str] | None = None, ridge=1e-3
) -> ElementalEnergies:
    """Relax :data:`GROUND_STATES` with ``calculator`` (ASE, fmax 0.02 eV/Å) and fit offsets on top of ``refs``
    (:func:`fit_element_offsets`). Compounds with elements outside ``supported`` or failing to relax are skipped
    and listed in ``calibration["skipped"]``."""
    settings = RelaxSettings(fmax=0.02, max_steps=400)
    allowed = set(supported) if supported is not None else None
    points, skipped = [], []
    plain = replace(refs, offsets={}, calibration={})
    for prototype, species, _ in GROUND_STATES:
        structure = build_ground_state(prototype, species)
        comp = Composition(structure.composition.reduced_formula)
        target = table.lowest_formation_energy(comp.reduced_formula)
        if (allowed is not None and not set(species) <= allowed) or target is None:
            skipped.append(f"{comp.reduced_formula}: outside the potential's elements or the table")
            continue
        result = relax_structure(structure, calculator, settings, item_id=f"offsets-{comp.reduced_formula}")
        if result.status != "ok":
            skipped.append(f"{comp.reduced_formula}: relaxation failed ({result.failure_reason})")
            continue
        e_form = formation_energy_per_atom(comp, result.energy_per_atom * comp.num_atoms, plain)
        points.append((comp, e_form - target))
    if not points:
        raise StabilityError(f"no ground state could be used to fit offsets for {refs.potential}: {skipped}")
    offsets, calibration = fit_element_offsets(points, ridge)
    calibration["skipped"] = skipped
    return replace(plain, offsets=offsets, calibration=calibration)


def shipped_element_offsets(weights_hash: str) -> ElementalEnergies | None:
    """Offsets shipped in the package for a potential's weights hash (``element_offsets_<hash>.json``), or None."""
    path = _data_path(f"element_offsets_{weights_hash}.json")
    if not path.is_file():
        return None
    return ElementalEnergies.from_dict(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------- reference hull


@dataclass(frozen=True)
class HullEntry:
    """One row of the MP table: formation energy on the MP2020 scale and, for the record, the legacy value."""

    material_id: str
    formula: str
    e_form_per_atom: float
    elements: frozenset[str]
    e_form_legacy: float = math.nan


class HullTable:
    """The MP formation-energy table on the MP2020 scale, eV/atom (read once; indexed by chemical system).

    Only the lowest row of each formula can be on a hull, so the hull uses those; ``rows`` keeps every row.
    """

    def __init__(self, rows: Sequence[HullEntry]):
        self.rows = list(rows)
        self._by_formula: dict[str, list[HullEntry]] = defaultdict(list)
        for row in self.rows:
            self._by_formula[row.formula].append(row)
        # the lowest row of each compound formula, by its exact chemical system; PDEntries made on first use
        self._by_system: dict[frozenset[str], list[HullEntry]] = defaultdict(list)
        for group in self._by_formula.values():
            best = min(group, key=lambda r: r.e_form_per_atom)
            if len(best.elements) > 1:
                self._by_system[best.elements].append(best)
        self._entries: dict[frozenset[str], list[PDEntry]] = {}
        self._diagrams: dict[frozenset[str], PhaseDiagram] = {}

    @classmethod
    @functools.cache
    def load(cls) -> HullTable:
        """The shipped table (cached: one read per process)."""
        rows = []
        with _data_path(REFERENCE_TABLE_FILE).open("rb") as raw:
            text = gzip.decompress(raw.read()).decode()
        for rec in csv.DictReader(text.splitlines()):
            value = float(rec["formation_energy_per_atom"])
            if not math.isfinite(value):
                continue
            formula = rec["formula"]
            elements = formula_symbols(formula)  # reduced formulas: no groups, no charges
            legacy = float(rec.get("formation_energy_per_atom_legacy") or "nan")
            rows.append(HullEntry(rec["material_id"], formula, value, elements, legacy))
        return cls(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def lowest_formation_energy(self, formula: str) -> float | None:
        """Lowest table E_form (eV/atom) among polymorphs of a formula, or None if absent."""
        rows = self._by_formula.get(Composition(formula).reduced_formula)
        return min(r.e_form_per_atom for r in rows) if rows else None

    def entries_within(self, elements: Iterable[str]) -> list[PDEntry]:
        """PDEntries (formation energy x atoms, eV) of the lowest row of every formula made only of
        ``elements`` (compounds; the elements themselves are not included)."""
        allowed = sorted(set(elements))
        return [
            entry
            for size in range(2, len(allowed) + 1)
            for subset in itertools.combinations(allowed, size)
            for entry in self._compounds_of(frozenset(subset))
        ]

    def _compounds_of(self, system: frozenset[str]) -> list[PDEntry]:
        """PDEntries of the lowest row of each formula whose chemical system is exactly ``system``."""
        if system not in self._entries:
            self._entries[system] = [
                PDEntry(comp, row.e_form_per_atom * comp.num_atoms, name=row.material_id)
                for row in self._by_system.get(system, ())
                for comp in (Composition(row.formula),)
            ]
        return self._entries[system]

    def diagram(self, elements: Iterable[str]) -> PhaseDiagram:
        """The reference hull of a chemical system: table compounds within it plus the elements at 0 eV/atom
        (built once per system and kept)."""
        system = frozenset(elements)
        if system not in self._diagrams:
            entries = [PDEntry(Composition({Element(el): 1}), 0.0, name=el) for el in sorted(system)]
            self._diagrams[system] = PhaseDiagram(entries + self.entries_within(system))
        return self._diagrams[system]


@dataclass(frozen=True)
class HullItem:
    """A screened structure: id, composition, formation energy (eV/atom)."""

    id: str
    composition: Composition
    e_form_per_atom: float


@dataclass(frozen=True)
class HullDistance:
    """Distances to the hull, eV/atom: signed to the reference hull; to the hull with this screen's structures."""

    e_above_hull: float
    e_above_hull_screen: float


def _system(composition: Composition) -> frozenset[str]:
    return frozenset(el.symbol for el in composition.elements)


def hull_distances(items: Sequence[HullItem], table: HullTable) -> dict[str, HullDistance]:
    """Signed E_hull against the reference hull, and the distance to the hull that also holds the screened
    structures, for each item (NaN for a non-finite formation energy).

    Each chemical system's reference diagram is built once. The screen's hull differs from the reference hull
    only where some item of a subsystem lies below the reference hull, so only those systems get a second
    diagram (of the reference entries plus the items below it).
    """
    nan = HullDistance(math.nan, math.nan)
    out = {it.id: nan for it in items}
    by_system: dict[frozenset[str], list[HullItem]] = defaultdict(list)
    for it in items:
        if math.isfinite(it.e_form_per_atom):
            by_system[_system(it.composition)].append(it)
    signed: dict[str, float] = {}
    below: dict[frozenset[str], list[HullItem]] = defaultdict(list)
    for system, members in by_system.items():
        diagram = table.diagram(system)
        for it in members:
            value = it.e_form_per_atom - diagram.get_hull_energy_per_atom(it.composition)
            signed[it.id] = float(value)
            if value < 0:
                below[system].append(it)
    for system, members in by_system.items():
        lower = [
            it
            for size in range(1, len(system) + 1)
            for subset in itertools.combinations(sorted(system), size)
            for it in below.get(frozenset(subset), ())
        ]
        if not lower:
            for it in members:
                out[it.id] = HullDistance(signed[it.id], signed[it.id])
            continue
        reference = table.diagram(system)
        # only the reference hull's vertices and the items below it can be on the screen's hull
        entries = list(reference.stable_entries) + [
            PDEntry(it.composition, it.e_form_per_atom * it.composition.num_atoms, name=it.id) for it in lower
        ]
        diagram = PhaseDiagram(entries)
        for it in members:
            screen = it.e_form_per_atom - diagram.get_hull_energy_per_atom(it.composition)
            out[it.id] = HullDistance(signed[it.id], max(0.0, float(screen)))
    return out


# ------------------------------------------------------------------------------------------------ assessment


@dataclass(frozen=True)
class StabilityRow:
    """What the screen reports per structure: E_form, both hull distances (eV/atom) and a warning ('' if none)."""

    e_form_per_atom: float
    e_above_hull: float
    e_above_hull_screen: float
    warning: str = ""


def assess_stability(
    energies: Mapping[str, tuple[Composition, float]],
    refs: ElementalEnergies,
    table: HullTable,
    training_elements: Iterable[str] | None = None,
) -> dict[str, StabilityRow]:
    """Formation energies, hull distances and warnings for relaxed structures.

    Args:
        energies: id -> (composition, total energy in eV) on the potential's own scale.
        refs: the potential's references (its convention decides whether MP2020 is added).
        table: the reference hull.
        training_elements: the elements the potential was trained on (None: not checked).

    A row warns when an element lies outside ``training_elements``, when an element has no reference energy
    (E_form is then NaN, never a made-up number), and when it lies more than |BELOW_HULL_WARNING| below the
    reference hull.
    """
    covered = frozenset(training_elements) if training_elements is not None else None
    notes: dict[str, list[str]] = defaultdict(list)
    items = [
        HullItem(item_id, comp, _formation_with_notes(comp, energy, refs, covered, notes[item_id]))
        for item_id, (comp, energy) in energies.items()
    ]
    distances = hull_distances(items, table)
    out = {}
    for it in items:
        dist = distances[it.id]
        _below_hull_note(dist.e_above_hull, notes[it.id])
        out[it.id] = StabilityRow(
            it.e_form_per_atom, dist.e_above_hull, dist.e_above_hull_screen, "; ".join(notes[it.id])
        )
    return out


def _formation_with_notes(
    comp: Composition, energy: float, refs: ElementalEnergies, covered: frozenset[str] | None, notes: list[str]
) -> float:
    """E_form (eV/atom; NaN when it cannot be computed) of one structure, appending its warnings to ``notes``."""
    symbols = sorted(el.symbol for el in comp.elements)
    if covered is not None and (outside := [s for s in symbols if s not in covered]):
        notes.append(f"elements outside the potential's training data: {', '.join(outside)}")
    lacking = [s for s in symbols if s not in refs.mu]
    if lacking:
        reasons = "; ".join(f"{s}: {refs.missing[s]}" for s in lacking if s in refs.missing)
        notes.append(
            f"no {refs.convention} reference energy for {', '.join(lacking)}"
            + (f" ({reasons})" if reasons else "")
            + ": E_form and E_hull not computed"
        )
        return math.nan
    try:
        return formation_energy_per_atom(comp, energy, refs)
    except StabilityError as exc:
        notes.append(str(exc))
        return math.nan


def _below_hull_note(e_above_hull: float, notes: list[str]) -> None:
    if e_above_hull < BELOW_HULL_WARNING:
        notes.append(
            f"{-e_above_hull:.2f} eV/atom below the known hull: most often a model error, "
            "sometimes a discovery; check with DFT"
        )


def _composition_key(composition: Composition) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((el.symbol, float(amount)) for el, amount in composition.items()))


class StreamingStability:
    """:func:`assess_stability` for screens too large to hold at once: the same numbers, in batches.

    Two passes over the screen's structures, in batches of any size and order:

    1. :meth:`assess` gives each structure of a batch its final E_form, signed E_hull and warning, and a
       provisional screen-hull distance (= the signed one, final where nothing lies below the reference hull
       in the structure's chemical system or its subsystems). The reference hull energy
       is computed once per composition (the reference diagram once per chemical system, as before).
    2. After every batch went through pass 1, :meth:`screen_distances` gives the final distance to the screen's
       hull for a batch; only structures whose chemical system holds (in itself or a subsystem) a structure
       below the reference hull get a value, the others keep the pass-1 value.

    What is kept between batches is per composition, not per structure: the reference hull energy of each
    composition seen and, of the structures below the reference hull, the lowest one of each composition (a
    higher one of the same composition cannot be on the screen's hull). Memory grows with the number of
    distinct compositions, not with the number of structures.
    """

    def __init__(self, refs: ElementalEnergies, table: HullTable, training_elements: Iterable[str] | None = None):
        self.refs = refs
        self.table = table
        self.covered = frozenset(training_elements) if training_elements is not None else None
        self._hull: dict[tuple, float] = {}
        self._below: dict[frozenset[str], dict[tuple, HullItem]] = defaultdict(dict)
        self._screen: dict[frozenset[str], PhaseDiagram | None] = {}
        self._screen_hull: dict[tuple, float] = {}

    def _reference_hull(self, key: tuple, comp: Composition) -> float:
        value = self._hull.get(key)
        if value is None:
            value = self._hull[key] = self.table.diagram(_system(comp)).get_hull_energy_per_atom(comp)
        return value

    def assess(self, energies: Mapping[str, tuple[Composition, float]]) -> dict[str, StabilityRow]:
        """Pass 1 for a batch: id -> row with final E_form, E_hull and warning (see the class docstring)."""
        if self._screen:
            raise RuntimeError("StreamingStability.assess after screen_distances: start a new one")
        out = {}
        for item_id, (comp, energy) in energies.items():
            notes: list[str] = []
            value = _formation_with_notes(comp, energy, self.refs, self.covered, notes)
            signed = math.nan
            if math.isfinite(value):
                key = _composition_key(comp)
                signed = float(value - self._reference_hull(key, comp))
                if signed < 0:
                    lowest = self._below[_system(comp)].get(key)
                    if lowest is None or value < lowest.e_form_per_atom:
                        self._below[_system(comp)][key] = HullItem(item_id, comp, value)
            _below_hull_note(signed, notes)
            out[item_id] = StabilityRow(value, signed, signed, "; ".join(notes))
        return out

    def _screen_diagram(self, system: frozenset[str]) -> PhaseDiagram | None:
        if system not in self._screen:
            lower = [
                it
                for size in range(1, len(system) + 1)
                for subset in itertools.combinations(sorted(system), size)
                for it in self._below.get(frozenset(subset), {}).values()
            ]
            diagram = None
            if lower:
                reference = self.table.diagram(system)
                entries = list(reference.stable_entries) + [
                    PDEntry(it.composition, it.e_form_per_atom * it.composition.num_atoms, name=it.id) for it in lower
                ]
                diagram = PhaseDiagram(entries)
            self._screen[system] = diagram
        return self._screen[system]

    def screen_distances(self, items: Iterable[tuple[str, Composition, float]]) -> dict[str, float]:
        """Pass 2 for a batch of ``(id, composition, E_form)``: id -> final distance to the screen's hull
        (eV/atom, >= 0), only for the structures whose value differs from pass 1's (see the class docstring)."""
        out = {}
        for item_id, comp, e_form in items:
            if not math.isfinite(e_form):
                continue
            diagram = self._screen_diagram(_system(comp))
            if diagram is None:
                continue
            key = _composition_key(comp)
            hull = self._screen_hull.get(key)
            if hull is None:
                hull = self._screen_hull[key] = diagram.get_hull_energy_per_atom(comp)
            out[item_id] = max(0.0, float(e_form - hull))
        return out

    @property
    def needs_second_pass(self) -> bool:
        """True when some structure lies below the reference hull (pass 2 can change a value)."""
        return bool(self._below)
