from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.structures.inputs import (
    CheckSettings,
    StructureCheckError,
    check_structure,
    load_structure_dir,
    min_interatomic_distance,
    read_structure,
)


def si() -> Structure:
    return AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.43))


def test_good_structure_passes_and_distance_is_bond_length():
    s = si()
    check_structure(s)
    assert min_interatomic_distance(s) == pytest.approx(5.43 * math.sqrt(3) / 4, abs=1e-6)


def test_overlapping_atoms_rejected_with_distance():
    s = Structure(Lattice.cubic(4.0), ["Ga", "As"], [[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(StructureCheckError, match=r"bad: atoms 0\.200 Å apart.*min_distance"):
        check_structure(s, name="bad")


@pytest.mark.parametrize("a, word", [(1.2, "volume per atom"), (12.0, "volume per atom")])
def test_absurd_volume_rejected(a, word):
    s = Structure(Lattice.cubic(a), ["Na"], [[0, 0, 0]])
    with pytest.raises(StructureCheckError, match=word):
        check_structure(s, CheckSettings(min_distance=0.1), name="x")


def test_nan_and_empty_cells_rejected():
    s = si()
    bad = Structure(Lattice(np.full((3, 3), np.nan)), ["Si"], [[0, 0, 0]], validate_proximity=False)
    with pytest.raises(StructureCheckError, match="NaN"):
        check_structure(bad)
    flat = Structure(Lattice([[1, 0, 0], [2, 0, 0], [0, 0, 1]]), ["Si"], [[0, 0, 0]])
    with pytest.raises(StructureCheckError, match="degenerate"):
        check_structure(flat)
    assert len(s) == 2


def test_unsupported_element_named():
    s = Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(StructureCheckError, match=r"element\(s\) Mg, O not supported"):
        check_structure(s, supported_elements={"Cu", "Al"})


def test_directory_loading_keeps_going_past_unreadable_files(tmp_path):
    si().to(filename=str(tmp_path / "si.cif"))
    (tmp_path / "broken.cif").write_text("data_x\n_cell_length_a oops\n")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = {item.id: item for item in load_structure_dir(tmp_path)}
    assert set(loaded) == {"si", "broken"}
    assert loaded["si"].structure.composition.reduced_formula == "Si"
    assert loaded["broken"].structure is None and "unreadable structure file" in loaded["broken"].error


def test_read_extxyz(tmp_path):
    from ase.io import write

    write(tmp_path / "gaas.extxyz", bulk("GaAs", "zincblende", a=5.65))
    s = read_structure(tmp_path / "gaas.extxyz")
    assert s.composition.reduced_formula == "GaAs"
    assert s.volume == pytest.approx(5.65**3 / 4, rel=1e-6)


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_structure_dir(tmp_path / "nope")
