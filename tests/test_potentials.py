from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from materials.potentials.calculators import (
    PotentialError,
    PotentialSpec,
    load_potential,
    supported_elements,
    weights_hash,
)


def test_chgnet_default_is_offline_and_physical(chgnet_calc):
    atoms = bulk("Si", "diamond", a=5.47)
    atoms.calc = chgnet_calc
    # MP PBE energy of Si is -5.42 eV/atom; CHGNet is trained on MP
    assert atoms.get_potential_energy() / 2 == pytest.approx(-5.4, abs=0.15)
    assert np.abs(atoms.get_forces()).max() < 1e-3  # symmetric positions: zero force
    assert len(weights_hash(PotentialSpec(name="chgnet"))) == 16


def test_emt_elements():
    assert supported_elements(PotentialSpec(name="emt")) >= {"Cu", "Al", "Ni"}
    calc = load_potential("emt")
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = calc
    assert abs(atoms.get_potential_energy()) < 0.1


def test_tiny_mace_local_file(tiny_mace_path):
    spec = PotentialSpec(name="mace", model=str(tiny_mace_path))
    calc = load_potential(spec)
    assert supported_elements(spec, calc) == frozenset({"Al", "Ni", "Cu"})
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    atoms.calc = load_potential("emt")
    # trained on EMT labels: within the tiny model's ~60 meV/atom error
    assert energy / len(atoms) == pytest.approx(atoms.get_potential_energy() / len(atoms), abs=0.25)
    assert spec.label() == "mace-tiny_mace.model"


def test_missing_mace_file_is_clear(tmp_path):
    with pytest.raises(PotentialError, match="MACE model file not found"):
        load_potential(PotentialSpec(name="mace", model=str(tmp_path / "none.model")))


def test_unknown_mace_name_is_clear():
    with pytest.raises(PotentialError, match="neither a MACE foundation name"):
        load_potential(PotentialSpec(name="mace", model="gigantic"))


def test_mace_foundation_offline_gives_one_clear_message(tmp_path, monkeypatch):
    # an empty cache: with no network the download must fail with a message naming the fix
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        calc = load_potential(PotentialSpec(name="mace", model="small"))
    except PotentialError as exc:
        assert "potential.model: /path/to/file.model" in str(exc)
        assert "could not be downloaded" in str(exc)
    else:  # a machine with network: the foundation model works
        assert calc is not None
