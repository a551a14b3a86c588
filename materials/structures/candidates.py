"""Candidate semiconductor structures: prototype builders, starting volumes and charge-balanced enumeration.

A *prototype* is a crystal structure type (zincblende, chalcopyrite, ...) with named site roles; a tuple of
element symbols, one per role, decorates it into a concrete :class:`~pymatgen.core.Structure`.

Starting volumes are not fixed lattice constants: every built structure is scaled isotropically so that its
first-shell bonds best match sums of covalent radii (:func:`estimate_volume`; pymatgen's DLS predictor is
available as ``method="dls"`` but fits ideal prototypes worse, see there). The result is a sane starting point
for an ML-potential relaxation, within ~15% of experiment (Å^3/atom) for tetrahedral semiconductors, rocksalt
oxides and spinels.

Enumeration keeps only species tuples that some combination of common oxidation states (SMACT's ICSD-2024
statistics) makes charge neutral with the prototype's multiplicities and that pass the Pauling
electronegativity test. Everything here is a pure function of its arguments; the only module-level state is
read-only tables and a memo of SMACT's oxidation-state table.
"""

from __future__ import annotations

import functools
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import smact
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Element, Lattice, Structure
from smact.screening import pauling_test

from materials.errors import InputError
from materials.serialise import Record

log = logging.getLogger(__name__)

#: Source tag of candidates built here (as opposed to a file path for structures read from disk).
GENERATED = "generated"

#: SMACT ICSD-2024 filter: an oxidation state counts when it is reported in >= this many compounds ...
OXIDATION_CONSENSUS = 3
#: ... and makes up >= this percentage of the element's reports (5% keeps As/P -3, drops exotic states).
OXIDATION_COMMONALITY_PERCENT = 5.0

#: Nominal lattice constant used to build a prototype before its volume is scaled, Å.
_NOMINAL_A = 5.0

#: Starting volume: first-shell bond length = this factor x the sum of covalent radii (Cordero, via SMACT).
#: 1.01 puts GaAs zincblende at a = 5.62 Å (expt 5.653 Å) and MgO rocksalt at 4.18 Å (expt 4.21 Å).
COVALENT_BOND_FACTOR = 1.01
#: A neighbour is in a site's first shell when closer than this factor x that site's nearest distance.
FIRST_SHELL_TOL = 1.1


# ---------------------------------------------------------------------------------------------------------
# Candidate record
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Candidate(Record):
    """One hypothetical material to screen.

    Attributes:
        id: deterministic identifier, ``f"{prototype}-{formula}"``.
        formula: pymatgen reduced formula, e.g. ``"GaAs"``.
        prototype: prototype name (a key of :data:`PROTOTYPES`), or a free label for structures from files.
        source: ``"generated"`` for enumerated candidates, otherwise the path the structure was read from.
        structure: starting structure, volume already scaled (Å, Å^3).
    """

    id: str
    formula: str
    prototype: str
    source: str
    structure: Structure


# ---------------------------------------------------------------------------------------------------------
# Prototype cells at nominal geometry (species given per role, in role order)
# ---------------------------------------------------------------------------------------------------------


def _fcc_primitive(a: float) -> Lattice:
    """Primitive lattice of a face-centred cubic cell with conventional constant ``a`` (Å)."""
    return Lattice(0.5 * a * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))


def _zincblende_cell(species: Sequence[str]) -> Structure:
    # F-43m: A on 4a (0,0,0), B on 4c (1/4,1/4,1/4); FCC primitive fractional coords equal conventional ones
    # for these positions because the primitive vectors sum to (a, a, a).
    a, b = species
    return Structure(_fcc_primitive(_NOMINAL_A), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])


def _rocksalt_cell(species: Sequence[str]) -> Structure:
    # Fm-3m: A on 4a (0,0,0), B on 4b (1/2,1/2,1/2).
    a, b = species
    return Structure(_fcc_primitive(_NOMINAL_A), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _half_heusler_cell(species: Sequence[str]) -> Structure:
    # F-43m: X on 4a (0,0,0) and Y on 4b (1/2,1/2,1/2) form a rocksalt sublattice; Z on 4c (1/4,1/4,1/4)
    # sits in the tetrahedral hole bonded to both (the anion in Nowotny-Juza LiZnAs; TiNiSn would be
    # ("Ti", "Sn", "Ni")).
    x, y, z = species
    return Structure(_fcc_primitive(_NOMINAL_A), [x, y, z], [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])


def _wurtzite_cell(species: Sequence[str], c_over_a: float = 1.633, u: float = 0.375) -> Structure:
    # P6_3mc: A on 2b (1/3,2/3,0), B on 2b (1/3,2/3,u); ideal tetrahedra for c/a = sqrt(8/3), u = 3/8.
    a, b = species
    lattice = Lattice.hexagonal(_NOMINAL_A * 0.7, _NOMINAL_A * 0.7 * c_over_a)
    coords = [[1 / 3, 2 / 3, 0.0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, u], [2 / 3, 1 / 3, 0.5 + u]]
    return Structure(lattice, [a, a, b, b], coords)


def _perovskite_cell(species: Sequence[str]) -> Structure:
    # Pm-3m: A on 1a (0,0,0) (12-fold), B on 1b (1/2,1/2,1/2) (octahedral), X on 3c face centres.
    a, b, x = species
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]
    return Structure(Lattice.cubic(_NOMINAL_A * 0.8), [a, b, x, x, x], coords)


_PLACEHOLDERS = ("H", "He", "Li", "Be", "B", "C", "N", "O")


@functools.cache
def _primitive_template(
    symbol: str, abc: tuple[float, float, float], coords: tuple[tuple[float, float, float], ...]
) -> tuple[tuple[tuple[float, ...], ...], tuple[int, ...], tuple[tuple[float, ...], ...]]:
    """Primitive cell of a space-group decoration, one placeholder species per Wyckoff entry in ``coords``.

    Returns (lattice rows in Å, Wyckoff-entry index of each site, fractional coords), sites sorted by entry.
    Memoised and immutable: generating a high-symmetry group's operations costs ~0.4 s per call.
    """
    conv = Structure.from_spacegroup(
        symbol, Lattice.from_parameters(*abc, 90, 90, 90), list(_PLACEHOLDERS[: len(coords)]), list(coords)
    )
    prim = conv.get_primitive_structure()
    entry = {el: k for k, el in enumerate(_PLACEHOLDERS)}
    order = sorted(range(len(prim)), key=lambda n: (entry[prim[n].specie.symbol], n))
    return (
        tuple(tuple(row) for row in prim.lattice.matrix.tolist()),
        tuple(entry[prim[n].specie.symbol] for n in order),
        tuple(tuple(prim[n].frac_coords.tolist()) for n in order),
    )


def _from_template(
    symbol: str,
    abc: tuple[float, float, float],
    wyckoff: Sequence[tuple[str, tuple[float, float, float]]],
) -> Structure:
    """Primitive cell of space group ``symbol`` with ``(species, fractional position)`` per Wyckoff entry."""
    matrix, entries, frac = _primitive_template(symbol, abc, tuple(pos for _, pos in wyckoff))
    return Structure(Lattice(matrix), [wyckoff[k][0] for k in entries], frac)


def _chalcopyrite_cell(species: Sequence[str], x: float = 0.25) -> Structure:
    # I-42d: A on 4a (0,0,0), B on 4b (0,0,1/2), X on 8d (x,1/4,1/8); c = 2a; 16-atom cell -> 8-atom
    # primitive.
    a, b, anion = species
    abc = (_NOMINAL_A, _NOMINAL_A, 2 * _NOMINAL_A)
    return _from_template("I-42d", abc, [(a, (0, 0, 0)), (b, (0, 0, 0.5)), (anion, (x, 0.25, 0.125))])


def _kesterite_cell(species: Sequence[str]) -> Structure:
    # I-4: A on 2a (0,0,0) and 2c (0,1/2,1/4), B on 2d (0,1/2,3/4), C on 2b (0,0,1/2), X on 8g at the ideal
    # zincblende position (1/4,1/4,1/8); c = 2a; 16-atom cell -> 8-atom primitive.
    a, b, c, anion = species
    abc = (_NOMINAL_A, _NOMINAL_A, 2 * _NOMINAL_A)
    wyckoff = [
        (a, (0, 0, 0)),
        (a, (0, 0.5, 0.25)),
        (b, (0, 0.5, 0.75)),
        (c, (0, 0, 0.5)),
        (anion, (0.25, 0.25, 0.125)),
    ]
    return _from_template("I-4", abc, wyckoff)


def _spinel_cell(species: Sequence[str], u: float = 0.26) -> Structure:
    # Fd-3m origin choice 2: A on 8a (1/8,1/8,1/8) (tetrahedral), B on 16d (1/2,1/2,1/2) (octahedral),
    # X on 32e (u,u,u); 56-atom cell -> 14-atom primitive (normal spinel, e.g. MgAl2O4).
    a, b, anion = species
    abc = (1.6 * _NOMINAL_A,) * 3
    return _from_template("Fd-3m:2", abc, [(a, (0.125, 0.125, 0.125)), (b, (0.5, 0.5, 0.5)), (anion, (u, u, u))])


# ---------------------------------------------------------------------------------------------------------
# Prototype registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prototype:
    """A structure type with named site roles.

    Attributes:
        name: registry key, e.g. ``"chalcopyrite"``.
        roles: site-role labels in the order species are given, e.g. ``("A", "B", "X")``.
        multiplicities: atoms of each role per formula unit, e.g. ``(1, 1, 2)`` for ABX2.
        spacegroup: international space-group number of the ideal structure.
        anion_last: enumeration requires the last role to carry a negative oxidation state and all others
            positive ones; False (half-Heusler) leaves ordering to the Pauling test alone.
        description: one line for humans: formula type, symmetry, Wyckoff sites.
        cell: builds the primitive cell at nominal geometry (before volume scaling) from species per role.
    """

    name: str
    roles: tuple[str, ...]
    multiplicities: tuple[int, ...]
    spacegroup: int
    anion_last: bool
    description: str
    cell: Callable[[Sequence[str]], Structure]


#: Known prototypes, read-only.
PROTOTYPES: Mapping[str, Prototype] = MappingProxyType(
    {
        p.name: p
        for p in (
            Prototype("zincblende", ("A", "B"), (1, 1), 216, True, "AB, F-43m, A 4a, B 4c", _zincblende_cell),
            Prototype("wurtzite", ("A", "B"), (1, 1), 186, True, "AB, P6_3mc, u=0.375, c/a=1.633", _wurtzite_cell),
            Prototype("rocksalt", ("A", "B"), (1, 1), 225, True, "AB, Fm-3m, A 4a, B 4b", _rocksalt_cell),
            Prototype(
                "chalcopyrite",
                ("A", "B", "X"),
                (1, 1, 2),
                122,
                True,
                "ABX2, I-42d, A 4a, B 4b, X 8d (x=0.25)",
                _chalcopyrite_cell,
            ),
            Prototype("perovskite", ("A", "B", "X"), (1, 1, 3), 221, True, "ABX3, Pm-3m cubic", _perovskite_cell),
            Prototype(
                "half_heusler",
                ("X", "Y", "Z"),
                (1, 1, 1),
                216,
                False,
                "XYZ, F-43m, X 4a, Y 4b, Z 4c (tetrahedral centre)",
                _half_heusler_cell,
            ),
            Prototype(
                "spinel",
                ("A", "B", "X"),
                (1, 2, 4),
                227,
                True,
                "AB2X4 normal spinel, Fd-3m (origin 2), A 8a, B 16d, X 32e (u=0.26)",
                _spinel_cell,
            ),
            Prototype(
                "kesterite",
                ("A", "B", "C", "X"),
                (2, 1, 1, 4),
                82,
                True,
                "A2BCX4, I-4, A 2a+2c, B 2d, C 2b, X 8g",
                _kesterite_cell,
            ),
        )
    }
)


def prototype_names() -> list[str]:
    """Names of the known prototypes, in registry order."""
    return list(PROTOTYPES)


def get_prototype(name: str) -> Prototype:
    """Look up a prototype by name.

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    try:
        return PROTOTYPES[name]
    except KeyError:
        raise InputError(f"Unknown prototype {name!r}; known prototypes: {prototype_names()}.") from None


def _check_species(proto: Prototype, species: Sequence[str]) -> list[str]:
    if isinstance(species, str) or len(species) != len(proto.roles):
        raise InputError(
            f"Prototype {proto.name!r} ({proto.description}) takes {len(proto.roles)} species, one per site "
            f"role {proto.roles}; got {species!r}."
        )
    out = []
    for sym in species:
        if not Element.is_valid_symbol(str(sym)):
            raise InputError(
                f"Prototype {proto.name!r}: {sym!r} is not an element symbol; pass symbols like 'Ga', 'As'."
            )
        out.append(str(sym))
    return out


def build_prototype(name: str, species: Sequence[str], scale_volume: bool = True) -> Structure:
    """Build the primitive cell of prototype ``name`` decorated with ``species`` (one symbol per site role).

    Args:
        name: a key of :data:`PROTOTYPES`.
        species: element symbols in role order, e.g. ``("Cu", "In", "Se")`` for chalcopyrite (A, B, X).
        scale_volume: scale the cell to :func:`estimate_volume` (Å^3); False keeps the nominal geometry.

    Raises:
        ValueError: unknown prototype (listing the known names), or wrong number of species / a non-element
            (naming the prototype and the number of species it expects).
    """
    proto = get_prototype(name)
    symbols = _check_species(proto, species)
    structure = proto.cell(symbols)
    if scale_volume:
        structure = scale_to_estimated_volume(structure)
    return structure


def zincblende(a: str, b: str) -> Structure:
    """Zincblende AB (F-43m, 2-atom primitive cell), volume-scaled; e.g. ``zincblende("Ga", "As")``."""
    return build_prototype("zincblende", (a, b))


def wurtzite(a: str, b: str) -> Structure:
    """Wurtzite AB (P6_3mc, 4 atoms, u=0.375, c/a=1.633), volume-scaled; e.g. ``wurtzite("Zn", "O")``."""
    return build_prototype("wurtzite", (a, b))


def rocksalt(a: str, b: str) -> Structure:
    """Rocksalt AB (Fm-3m, 2-atom primitive cell), volume-scaled; e.g. ``rocksalt("Mg", "O")``."""
    return build_prototype("rocksalt", (a, b))


def chalcopyrite(a: str, b: str, x: str) -> Structure:
    """Chalcopyrite ABX2 (I-42d, 8-atom primitive), volume-scaled; e.g. ``chalcopyrite("Cu", "In", "Se")``."""
    return build_prototype("chalcopyrite", (a, b, x))


def perovskite(a: str, b: str, x: str) -> Structure:
    """Cubic perovskite ABX3 (Pm-3m, 5 atoms), volume-scaled; e.g. ``perovskite("Sr", "Ti", "O")``."""
    return build_prototype("perovskite", (a, b, x))


def half_heusler(x: str, y: str, z: str) -> Structure:
    """Half-Heusler XYZ (F-43m, 3-atom primitive cell; Z at the tetrahedral centre), volume-scaled."""
    return build_prototype("half_heusler", (x, y, z))


def spinel(a: str, b: str, x: str) -> Structure:
    """Normal spinel AB2X4 (Fd-3m, 14-atom primitive), volume-scaled; e.g. ``spinel("Mg", "Al", "O")``."""
    return build_prototype("spinel", (a, b, x))


def kesterite(a: str, b: str, c: str, x: str) -> Structure:
    """Kesterite A2BCX4 (I-4, 8-atom primitive), volume-scaled; e.g. ``kesterite("Cu", "Zn", "Sn", "S")``."""
    return build_prototype("kesterite", (a, b, c, x))


# ---------------------------------------------------------------------------------------------------------
# Starting volume
# ---------------------------------------------------------------------------------------------------------


def _covalent_radius(symbol: str) -> float:
    """Covalent radius, Å (SMACT's Cordero table; pymatgen's atomic radius when SMACT has none)."""
    radius = smact.Element(symbol).covalent_radius
    if radius is None:
        radius = Element(symbol).atomic_radius
    if radius is None:
        raise InputError(
            f"No covalent or atomic radius known for {symbol!r}; cannot estimate a starting volume. "
            "Scale the structure yourself and pass scale_volume=False."
        )
    return float(radius)


def first_shell_bonds(structure: Structure, shell_tol: float = FIRST_SHELL_TOL) -> list[tuple[int, int, float]]:
    """Nearest-neighbour bonds ``(i, j, distance in Å)``: for each site, neighbours within ``shell_tol`` x its
    nearest-neighbour distance (periodic images included; each bond appears once from each end)."""
    cutoff = 2.5 * (structure.volume / len(structure)) ** (1 / 3)
    centres, neighbours, _, distances = structure.get_neighbor_list(cutoff)
    bonds = []
    for i in range(len(structure)):
        mask = centres == i
        if not mask.any():
            raise InputError(
                f"Site {i} ({structure[i].specie}) of {structure.composition.reduced_formula} has no "
                f"neighbour within {cutoff:.2f} Å; the structure is too dilute to estimate bond lengths."
            )
        nearest = distances[mask].min()
        for j, d in zip(neighbours[mask], distances[mask], strict=True):
            if d <= shell_tol * nearest:
                bonds.append((i, int(j), float(d)))
    return bonds


def _covalent_volume(structure: Structure) -> float:
    """Cell volume (Å^3) that best matches first-shell bonds to COVALENT_BOND_FACTOR x (r_i + r_j).

    "Best" is the geometric mean over bonds of (expected / actual length), so a prototype whose ideal geometry
    cannot fit every bond (chalcopyrite with a short Cu-Se and a long In-Se bond) lands in between.
    """
    radii = {sp.symbol: _covalent_radius(sp.symbol) for sp in structure.composition}
    symbols = [site.specie.symbol for site in structure]
    log_ratios = [
        np.log(COVALENT_BOND_FACTOR * (radii[symbols[i]] + radii[symbols[j]]) / d)
        for i, j, d in first_shell_bonds(structure)
    ]
    return float(structure.volume * np.exp(3 * np.mean(log_ratios)))


def _dls_volume(structure: Structure) -> float | None:
    """pymatgen DLS predicted cell volume, Å^3, or None when the predictor or an element's parameters are
    missing or it fails; the reason is logged (warning) with the formula, and the caller falls back to the
    covalent-radius volume (reported as the method used)."""
    formula = structure.composition.reduced_formula
    try:
        from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor, bond_params
    except ImportError as exc:
        log.warning("%s: DLS volume predictor unavailable (%s); using the covalent-radius volume", formula, exc)
        return None
    missing = sorted({sp.symbol for sp in structure.composition if sp.symbol not in bond_params})
    if missing:
        log.warning("%s: no DLS bond parameters for %s; using the covalent-radius volume", formula, ", ".join(missing))
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = DLSVolumePredictor(min_scaling=0.5, max_scaling=2.0).predict(structure)
    except Exception as exc:  # noqa: BLE001 - any failure of the heuristic means "use the fallback", said here
        log.warning("%s: DLS volume prediction failed (%s: %s); using the covalent-radius volume",
                    formula, type(exc).__name__, exc)  # fmt: skip
        return None
    if not (np.isfinite(volume) and volume > 0):
        log.warning("%s: DLS predicted a volume of %s; using the covalent-radius volume", formula, volume)
        return None
    return float(volume)


VOLUME_METHODS = ("covalent", "dls")


def estimate_volume(structure: Structure, method: str = "covalent") -> tuple[float, str]:
    """Starting cell volume for ``structure`` (Å^3) and the method that produced it.

    Args:
        structure: any geometry with the intended shape; only its bond topology and shape matter.
        method: ``"covalent"`` (default): isotropic scale at which first-shell bonds best match
            covalent-radius sums (geometric mean, see :data:`COVALENT_BOND_FACTOR`). ``"dls"``: pymatgen's
            data-mined lattice scaling applied to the covalent estimate; falls back to ``"covalent"`` (and
            says so in the returned method) when pymatgen lacks DLS parameters for an element or DLS fails.

    Why covalent is the default: on ideal prototypes DLS (which scales so the single most compressed pair
    fits) was 18% small for rocksalt MgO, 16% small for ZnO and 22% large for chalcopyrite CuInSe2; the
    covalent fit stays within ~13% of experiment (Å^3/atom) for III-V, II-VI, chalcopyrite, spinel, kesterite
    and Nowotny-Juza benchmarks (cubic perovskites come out ~18% large, rocksalt PbTe ~30% small).

    Raises:
        ValueError: unknown method (listing the known ones) or an element without a radius.
    """
    if method not in VOLUME_METHODS:
        raise InputError(f"Unknown volume method {method!r}; use one of {VOLUME_METHODS}.")
    volume = _covalent_volume(structure)
    if method == "dls":
        guess = structure.copy()
        guess.scale_lattice(volume)
        dls = _dls_volume(guess)
        if dls is not None:
            return dls, "dls"
    return volume, "covalent"


def scale_to_estimated_volume(structure: Structure, method: str = "covalent") -> Structure:
    """Copy of ``structure`` isotropically scaled to :func:`estimate_volume` (fractional coords unchanged)."""
    volume, _ = estimate_volume(structure, method)
    scaled = structure.copy()
    scaled.scale_lattice(volume)
    return scaled


# ---------------------------------------------------------------------------------------------------------
# Charge balance
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _icsd24_table() -> Mapping[str, tuple[int, ...]]:
    """SMACT ICSD-2024 oxidation states passing the consensus/commonality filter (read-only memo)."""
    try:
        from smact.screening import ICSD24OxStatesFilter
    except ImportError:  # older SMACT keeps it in smact.utils.oxidation
        try:
            from smact.utils.oxidation import ICSD24OxStatesFilter
        except ImportError:
            return MappingProxyType({})
    df = ICSD24OxStatesFilter().filter(consensus=OXIDATION_CONSENSUS, commonality=OXIDATION_COMMONALITY_PERCENT)
    table = {}
    for element, states in zip(df["element"], df["oxidation_state"], strict=True):
        values = states.split() if isinstance(states, str) else list(np.atleast_1d(states))
        table[str(element)] = tuple(sorted(int(v) for v in values))
    return MappingProxyType(table)


def oxidation_states(symbol: str) -> tuple[int, ...]:
    """Common oxidation states of an element (SMACT ICSD-2024, >= OXIDATION_COMMONALITY_PERCENT of reports).

    Elements missing from the filtered table fall back to SMACT's full default list.

    Raises:
        ValueError: ``symbol`` is not an element, naming it.
    """
    if not Element.is_valid_symbol(symbol):
        raise InputError(f"{symbol!r} is not an element symbol; pass symbols like 'Ga', 'As'.")
    states = _icsd24_table().get(symbol)
    if states:
        return states
    return tuple(smact.Element(symbol).oxidation_states or ())


def _pauling_eneg(symbol: str) -> float | None:
    return smact.Element(symbol).pauling_eneg


def _oxidation_assignments(
    species: Sequence[str],
    multiplicities: Sequence[int],
    anion_last: bool,
    states: Mapping[str, Sequence[int]] | None,
) -> Iterator[tuple[int, ...]]:
    """Yield oxidation-state tuples (one per role) that are neutral, ordered if asked, and pass Pauling."""
    per_role = []
    for i, sym in enumerate(species):
        allowed = tuple(states[sym]) if states is not None and sym in states else oxidation_states(sym)
        if anion_last:
            last = i == len(species) - 1
            allowed = tuple(s for s in allowed if (s < 0 if last else s > 0))
        per_role.append(allowed)
    enegs = [_pauling_eneg(s) for s in species]
    if any(e is None for e in enegs):
        return
    for combo in itertools.product(*per_role):
        if sum(m * q for m, q in zip(multiplicities, combo, strict=True)) != 0:
            continue
        if pauling_test(combo, enegs, symbols=list(species)):
            yield combo


def charge_balanced(
    species: Sequence[str],
    multiplicities: Sequence[int],
    anion_last: bool = False,
    states: Mapping[str, Sequence[int]] | None = None,
) -> bool:
    """True when some choice of one oxidation state per role is charge neutral and passes Pauling's test.

    Args:
        species: element symbols, one per site role, e.g. ``("Cu", "In", "Se")``.
        multiplicities: atoms per formula unit for each role, e.g. ``(1, 1, 2)``.
        anion_last: also require the last role negative and all other roles positive.
        states: optional override of oxidation states per element; others use :func:`oxidation_states`.

    Raises:
        ValueError: lengths differ or a multiplicity is not a positive integer, showing both.
    """
    if len(species) != len(multiplicities) or not species:
        raise InputError(
            f"charge_balanced: need one multiplicity per species; got species {list(species)} and "
            f"multiplicities {list(multiplicities)}."
        )
    if any(int(m) != m or m < 1 for m in multiplicities):
        raise InputError(f"charge_balanced: multiplicities must be positive integers; got {list(multiplicities)}.")
    return next(_oxidation_assignments(species, multiplicities, anion_last, states), None) is not None


# ---------------------------------------------------------------------------------------------------------
# Enumeration
# ---------------------------------------------------------------------------------------------------------


def _reduced_formula(species: Sequence[str], multiplicities: Sequence[int]) -> str:
    comp = Composition({s: m for s, m in zip(species, multiplicities, strict=True)})
    return comp.reduced_formula


class _Deduplicator:
    """Streaming duplicate filter used by :func:`dedup_candidates` and :func:`enumerate_candidates`.

    Local to one call (no module state): remembers (prototype, formula) keys and kept structures per formula.
    """

    def __init__(self) -> None:
        self._matcher = StructureMatcher()
        self._keys: set[tuple[str, str]] = set()
        self._by_formula: dict[str, list[Structure]] = {}

    def seen_key(self, prototype: str, formula: str) -> bool:
        return (prototype, formula) in self._keys

    def is_duplicate(self, prototype: str, formula: str, structure: Structure) -> bool:
        if self.seen_key(prototype, formula):
            return True
        return any(self._matcher.fit(structure, other) for other in self._by_formula.get(formula, []))

    def add(self, prototype: str, formula: str, structure: Structure) -> None:
        self._keys.add((prototype, formula))
        self._by_formula.setdefault(formula, []).append(structure)


def dedup_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Drop duplicates, keeping the first occurrence and the input order.

    A candidate is a duplicate when an earlier kept one has the same prototype and reduced formula, or the
    same reduced formula and a structure pymatgen's :class:`StructureMatcher` (default tolerances, volume
    normalised) finds equal, e.g. a user's GaAs CIF against the generated ``zincblende-GaAs``.
    """
    dedup = _Deduplicator()
    kept = []
    for cand in candidates:
        if dedup.is_duplicate(cand.prototype, cand.formula, cand.structure):
            continue
        dedup.add(cand.prototype, cand.formula, cand.structure)
        kept.append(cand)
    return kept


def enumerate_candidates(
    prototype_sites: Mapping[str, Sequence[Sequence[str]]],
    max_candidates: int | None = None,
    dedup: bool = True,
) -> list[Candidate]:
    """Enumerate charge-balanced decorations of prototypes into volume-scaled candidates.

    Args:
        prototype_sites: prototype name -> per-role lists of allowed elements, e.g.
            ``{"zincblende": [["Ga", "In"], ["As", "Sb"]]}``. Prototypes are visited in mapping order and
            species tuples in Cartesian-product order, which fixes the output order.
        max_candidates: keep the first N candidates (after dedup); None keeps all.
        dedup: drop duplicates as :func:`dedup_candidates` does (same prototype and reduced formula, or same
            reduced formula and a StructureMatcher match). With ``dedup=False`` repeats are kept and their
            ids get a ``-2``, ``-3``, ... suffix so ids stay unique.

    A species tuple is kept when no element appears on two roles and :func:`charge_balanced` holds with the
    prototype's multiplicities (``anion_last`` as the prototype declares).

    Raises:
        ValueError: unknown prototype (listing known names), wrong number of role lists (naming the
            prototype and its roles), a non-element symbol, or a negative ``max_candidates``.
    """
    specs = _enumeration_specs(prototype_sites, max_candidates)
    return list(_generate(specs, max_candidates, dedup))


def _enumeration_specs(prototype_sites: Mapping[str, Sequence[Sequence[str]]], max_candidates: int | None) -> list:
    """Checked ``(Prototype, role lists)`` pairs (see :func:`enumerate_candidates` for what is refused)."""
    if max_candidates is not None and max_candidates < 0:
        raise InputError(f"max_candidates must be >= 0 or None; got {max_candidates}.")
    specs = []
    for name, role_lists in prototype_sites.items():
        proto = get_prototype(name)
        if isinstance(role_lists, str) or len(role_lists) != len(proto.roles):
            raise InputError(
                f"Prototype {name!r} ({proto.description}) needs {len(proto.roles)} element lists, one per "
                f"site role {proto.roles}; got {role_lists!r}."
            )
        for role, elements in zip(proto.roles, role_lists, strict=True):
            if isinstance(elements, str):
                raise InputError(
                    f"Prototype {name!r} role {role!r}: give a list of symbols, not the string {elements!r}."
                )
            for sym in elements:
                if not Element.is_valid_symbol(str(sym)):
                    raise InputError(f"Prototype {name!r} role {role!r}: {sym!r} is not an element symbol.")
        specs.append((proto, [[str(sym) for sym in elements] for elements in role_lists]))
    return specs


def iter_candidates(
    prototype_sites: Mapping[str, Sequence[Sequence[str]]],
    max_candidates: int | None = None,
    dedup: bool = True,
) -> Iterator[Candidate]:
    """:func:`enumerate_candidates`, one candidate at a time (the settings are checked at once, each structure
    built only when it is reached): a screen need not hold every starting structure."""
    specs = _enumeration_specs(prototype_sites, max_candidates)
    return _generate(specs, max_candidates, dedup)


def _generate(specs: list, max_candidates: int | None, dedup: bool) -> Iterator[Candidate]:
    filt = _Deduplicator()
    n_kept = 0
    id_counts: dict[str, int] = {}
    for proto, role_lists in specs:
        for species in itertools.product(*role_lists):
            if max_candidates is not None and n_kept >= max_candidates:
                return
            if len(set(species)) != len(species):
                continue
            if not charge_balanced(species, proto.multiplicities, anion_last=proto.anion_last):
                continue
            formula = _reduced_formula(species, proto.multiplicities)
            if dedup and filt.seen_key(proto.name, formula):
                continue
            structure = build_prototype(proto.name, species)
            if dedup:
                if filt.is_duplicate(proto.name, formula, structure):
                    continue
                filt.add(proto.name, formula, structure)
            base_id = f"{proto.name}-{formula}"
            id_counts[base_id] = id_counts.get(base_id, 0) + 1
            cid = base_id if id_counts[base_id] == 1 else f"{base_id}-{id_counts[base_id]}"
            n_kept += 1
            yield Candidate(cid, formula, proto.name, GENERATED, structure)
