"""Tests for materials.structures.candidates: prototypes, starting volumes, charge balance and enumeration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from materials.structures.candidates import (
    GENERATED,
    PROTOTYPES,
    Candidate,
    build_prototype,
    chalcopyrite,
    charge_balanced,
    dedup_candidates,
    enumerate_candidates,
    estimate_volume,
    half_heusler,
    kesterite,
    perovskite,
    prototype_names,
    rocksalt,
    spinel,
    wurtzite,
    zincblende,
)


def _min_distance(structure: Structure) -> float:
    """Smallest interatomic distance including periodic images, Å."""
    _, _, _, distances = structure.get_neighbor_list(4.0)
    return float(distances.min())


# name, species, expected reduced formula, atoms in primitive cell, space group number
PROTOTYPE_CASES = [
    ("zincblende", ("Ga", "As"), "GaAs", 2, 216),
    ("wurtzite", ("Zn", "O"), "ZnO", 4, 186),
    ("rocksalt", ("Mg", "O"), "MgO", 2, 225),
    ("chalcopyrite", ("Cu", "In", "Se"), "InCuSe2", 8, 122),
    ("perovskite", ("Sr", "Ti", "O"), "SrTiO3", 5, 221),
    ("half_heusler", ("Li", "Zn", "As"), "LiZnAs", 3, 216),
    ("spinel", ("Mg", "Al", "O"), "MgAl2O4", 14, 227),
    ("kesterite", ("Cu", "Zn", "Sn", "S"), "ZnCu2SnS4", 8, 82),
]


@pytest.mark.parametrize(("name", "species", "formula", "natoms", "sg"), PROTOTYPE_CASES)
def test_prototype_stoichiometry_and_space_group(
    name: str, species: tuple[str, ...], formula: str, natoms: int, sg: int
) -> None:
    s = build_prototype(name, species)
    assert len(s) == natoms
    assert s.composition.reduced_formula == formula
    proto = PROTOTYPES[name]
    expected = Composition(dict(zip(species, proto.multiplicities, strict=True)))
    assert s.composition.reduced_composition == expected.reduced_composition
    assert SpacegroupAnalyzer(s, symprec=0.1).get_space_group_number() == sg == proto.spacegroup
    assert _min_distance(s) > 1.5


def test_named_builders_match_registry() -> None:
    assert zincblende("Ga", "As") == build_prototype("zincblende", ["Ga", "As"])
    assert wurtzite("Zn", "O").composition.reduced_formula == "ZnO"
    assert rocksalt("Mg", "O").composition.reduced_formula == "MgO"
    assert chalcopyrite("Cu", "In", "Se").composition.reduced_formula == "InCuSe2"
    assert perovskite("Ba", "Zr", "O").composition.reduced_formula == "BaZrO3"
    assert half_heusler("Li", "Mg", "N").composition.reduced_formula == "LiMgN"
    assert spinel("Zn", "Ga", "O").composition.reduced_formula == Composition("ZnGa2O4").reduced_formula
    assert kesterite("Cu", "Zn", "Sn", "Se").composition.reduced_formula == Composition("Cu2ZnSnSe4").reduced_formula


def test_prototype_names_and_registry() -> None:
    names = prototype_names()
    assert names == list(PROTOTYPES)
    for required in (
        "zincblende",
        "wurtzite",
        "rocksalt",
        "chalcopyrite",
        "perovskite",
        "half_heusler",
        "spinel",
    ):
        assert required in names
    for proto in PROTOTYPES.values():
        assert len(proto.roles) == len(proto.multiplicities)


def test_spinel_site_roles_and_distances() -> None:
    s = spinel("Mg", "Al", "O")
    # Roles in order: A (2 tetrahedral sites), B (4 octahedral), X (8) in the 14-atom primitive cell.
    assert [site.specie.symbol for site in s] == ["Mg"] * 2 + ["Al"] * 4 + ["O"] * 8
    nn = {}
    for i, site in enumerate(s):
        neighbours = s.get_neighbors(site, 2.4)
        nn[i] = (site.specie.symbol, sorted({n.specie.symbol for n in neighbours}), len(neighbours))
    assert all(v == ("Mg", ["O"], 4) for k, v in nn.items() if k < 2)  # tetrahedral A
    assert all(v == ("Al", ["O"], 6) for k, v in nn.items() if 2 <= k < 6)  # octahedral B


def test_unknown_prototype_names_known_ones() -> None:
    with pytest.raises(ValueError, match="bogus") as err:
        build_prototype("bogus", ["Ga", "As"])
    assert "zincblende" in str(err.value)
    with pytest.raises(ValueError, match="bogus"):
        enumerate_candidates({"bogus": [["Ga"], ["As"]]})


def test_wrong_species_count_names_prototype_and_count() -> None:
    with pytest.raises(ValueError, match=r"'chalcopyrite'.*3 species"):
        build_prototype("chalcopyrite", ["Cu", "Se"])
    with pytest.raises(ValueError, match="not an element"):
        build_prototype("zincblende", ["Ga", "Xx"])
    with pytest.raises(ValueError, match=r"'rocksalt'.*2 element lists"):
        enumerate_candidates({"rocksalt": [["Mg", "Ca", "O"]]})


# Experimental conventional cells: (prototype, species, volume per atom in Å^3/atom).
EXPERIMENT = [
    ("zincblende", ("Ga", "As"), 5.653**3 / 8),
    ("wurtzite", ("Zn", "O"), math.sqrt(3) / 2 * 3.25**2 * 5.21 / 4),
    ("rocksalt", ("Mg", "O"), 4.21**3 / 8),
    ("chalcopyrite", ("Cu", "In", "Se"), 5.78**2 * 11.62 / 16),
]


@pytest.mark.parametrize(("name", "species", "v_exp"), EXPERIMENT)
def test_starting_volume_near_experiment(name: str, species: tuple[str, ...], v_exp: float) -> None:
    s = build_prototype(name, species)
    v = s.volume / len(s)
    assert abs(v / v_exp - 1) < 0.15, f"{name} {species}: {v:.2f} vs expt {v_exp:.2f} Å^3/atom"
    assert _min_distance(s) > 1.5


def test_gaas_lattice_constant_within_5_percent() -> None:
    s = zincblende("Ga", "As")
    a_conv = (4 * s.volume) ** (1 / 3)  # primitive FCC cell is a quarter of the conventional cube
    assert abs(a_conv / 5.653 - 1) < 0.05


def test_volume_does_not_depend_on_input_scale() -> None:
    nominal = build_prototype("rocksalt", ["Mg", "O"], scale_volume=False)
    stretched = nominal.copy()
    stretched.scale_lattice(nominal.volume * 3.0)
    v1, m1 = estimate_volume(nominal)
    v2, m2 = estimate_volume(stretched)
    assert m1 == m2 == "covalent"
    assert v1 == pytest.approx(v2, rel=1e-9)


def test_dls_method_is_available_and_sane() -> None:
    s = build_prototype("zincblende", ["Ga", "As"], scale_volume=False)
    v, method = estimate_volume(s, method="dls")
    assert method in ("dls", "covalent")
    assert 0.7 < v / len(s) / (5.653**3 / 8) < 1.3
    with pytest.raises(ValueError, match="volume method"):
        estimate_volume(s, method="magic")


def test_dls_fallback_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """An element without DLS bond parameters falls back to the covalent volume, and the log names it."""
    s = build_prototype("rocksalt", ["Ra", "O"], scale_volume=False)
    with caplog.at_level("WARNING", logger="materials.structures.candidates"):
        volume, method = estimate_volume(s, method="dls")
    assert method == "covalent"
    assert volume == pytest.approx(estimate_volume(s)[0], rel=1e-12)
    assert "RaO: no DLS bond parameters for Ra" in caplog.text


def test_charge_balance() -> None:
    assert charge_balanced(["Ga", "As"], [1, 1])
    assert not charge_balanced(["Ga", "As"], [1, 2])
    assert not charge_balanced(["Zn", "N"], [1, 1])
    assert charge_balanced(["Zn", "Se"], [1, 1])
    assert charge_balanced(["Cu", "In", "Se"], [1, 1, 2])
    assert charge_balanced(["Mg", "Al", "O"], [1, 2, 4])
    assert charge_balanced(["Cu", "Zn", "Sn", "S"], [2, 1, 1, 4])
    # Electronegativity ordering: the anion must sit on the last role when asked for.
    assert not charge_balanced(["As", "Ga"], [1, 1], anion_last=True)
    assert charge_balanced(["Ga", "As"], [1, 1], anion_last=True)
    # Oxidation-state override.
    assert charge_balanced(["Zn", "N"], [1, 1], states={"Zn": [3], "N": [-3]})
    with pytest.raises(ValueError, match="multiplicit"):
        charge_balanced(["Ga", "As"], [1])


SMALL_SET = {
    "zincblende": [["Ga", "In", "Al", "Zn", "Cd"], ["N", "P", "As", "Sb", "S", "Se", "Te", "O"]],
    "rocksalt": [["Mg", "Ca", "N"], ["O", "S", "Mg"]],
}


def test_enumeration_formulas() -> None:
    cands = enumerate_candidates(SMALL_SET)
    ids = [c.id for c in cands]
    formulas = {(c.prototype, c.formula) for c in cands}
    for f in ("GaAs", "GaN", "InP", "AlSb", "ZnSe", "CdTe", "ZnO"):
        assert ("zincblende", f) in formulas
    assert ("rocksalt", "MgO") in formulas and ("rocksalt", "CaS") in formulas
    # Not charge balanced with II/VI + V or III + VI in a 1:1 cell.
    for f in ("ZnN", "GaSe", "AlO", "CdAs"):
        assert ("zincblende", f) not in formulas
    # N on the cation site, or a cation on the anion site, is excluded; so is Mg on both roles.
    assert all(not (c.prototype == "rocksalt" and "N" in c.formula) for c in cands)
    assert "rocksalt-CaMg" not in ids and "rocksalt-MgCa" not in ids
    assert all(c.source == GENERATED and c.id == f"{c.prototype}-{c.formula}" for c in cands)
    assert len(set(ids)) == len(ids)
    assert all(_min_distance(c.structure) > 1.5 for c in cands)


def test_enumeration_deterministic_and_truncated() -> None:
    first = enumerate_candidates(SMALL_SET)
    second = enumerate_candidates(SMALL_SET)
    assert [c.id for c in first] == [c.id for c in second]
    assert all(a.structure == b.structure for a, b in zip(first, second, strict=True))
    assert first[0].id == "zincblende-GaN"  # product order: first cation, first anion
    top = enumerate_candidates(SMALL_SET, max_candidates=5)
    assert [c.id for c in top] == [c.id for c in first[:5]]
    assert enumerate_candidates(SMALL_SET, max_candidates=0) == []


def test_enumeration_dedup() -> None:
    # Cu/In on both cation roles yields CuInSe2 twice (A/B swapped), and a repeated element list repeats GaAs.
    sites = {
        "chalcopyrite": [["Cu", "In"], ["In", "Cu"], ["Se"]],
        "zincblende": [["Ga", "Ga"], ["As"]],
    }
    deduped = enumerate_candidates(sites)
    assert [c.id for c in deduped] == ["chalcopyrite-InCuSe2", "zincblende-GaAs"]
    raw = enumerate_candidates(sites, dedup=False)
    assert [c.id for c in raw] == [
        "chalcopyrite-InCuSe2",
        "chalcopyrite-InCuSe2-2",
        "zincblende-GaAs",
        "zincblende-GaAs-2",
    ]


def test_dedup_candidates_uses_structure_matcher() -> None:
    generated = enumerate_candidates({"zincblende": [["Ga"], ["As"]], "wurtzite": [["Ga"], ["As"]]})
    # A "user" GaAs zincblende in a conventional cell at the experimental lattice constant.
    conv = Structure.from_spacegroup("F-43m", Lattice.cubic(5.653), ["Ga", "As"], [[0, 0, 0], [0.25] * 3])
    user = Candidate("file-GaAs", "GaAs", "from_file", "data/GaAs.cif", conv)
    kept = dedup_candidates([*generated, user])
    assert [c.id for c in kept] == ["zincblende-GaAs", "wurtzite-GaAs"]


def test_candidate_round_trip() -> None:
    cand = enumerate_candidates({"chalcopyrite": [["Cu"], ["In"], ["Se"]]})[0]
    d = json.loads(json.dumps(cand.as_dict()))
    back = Candidate.from_dict(d)
    assert (back.id, back.formula, back.prototype, back.source) == (
        cand.id,
        cand.formula,
        cand.prototype,
        cand.source,
    )
    assert back.structure == cand.structure
    assert np.allclose(back.structure.lattice.matrix, cand.structure.lattice.matrix)
    with pytest.raises(ValueError, match="structure"):
        Candidate.from_dict({k: v for k, v in d.items() if k != "structure"})
