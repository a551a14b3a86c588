from __future__ import annotations

import math

import pytest
from ase.build import bulk

from materials.potentials.calculators import PotentialSpec, load_potential
from materials.potentials.relax import RelaxResult, RelaxSettings, relax_structure


def test_chgnet_relaxes_strained_si_to_its_lattice_constant(chgnet_calc):
    result = relax_structure(bulk("Si", "diamond", a=5.2), chgnet_calc, RelaxSettings(fmax=0.02), item_id="si")
    assert result.status == "ok" and result.converged
    a = (4 * result.volume_per_atom * 2) ** (1 / 3)  # 8 atoms per conventional cell
    assert a == pytest.approx(5.47, abs=0.04)  # PBE 5.47 Å (CHGNet is trained on PBE)
    assert result.max_force < 0.02
    assert max(abs(s) for s in result.stress[:3]) < 1.0  # GPa, relaxed cell
    assert result.structure is not None and result.structure.composition.reduced_formula == "Si"


def test_gaas_energy_on_mp_scale(chgnet_calc):
    result = relax_structure(bulk("GaAs", "zincblende", a=5.65), chgnet_calc)
    assert result.status == "ok"
    assert result.energy_per_atom == pytest.approx(-4.06, abs=0.1)  # MP GaAs: about -4.05 eV/atom (PBE)


def test_emt_copper_lattice_constant():
    result = relax_structure(bulk("Cu", "fcc", a=3.7), load_potential("emt"), RelaxSettings(fmax=0.01))
    assert result.status == "ok"
    assert (4 * result.volume_per_atom) ** (1 / 3) == pytest.approx(3.59, abs=0.02)  # EMT Cu


def test_unphysical_energy_is_a_failure_with_reason():
    settings = RelaxSettings(min_energy_per_atom=1.0)  # any Cu energy is "too low"
    result = relax_structure(bulk("Cu", "fcc", a=3.6), load_potential("emt"), settings, item_id="cu")
    assert result.status == "failed"
    assert "blow-up: energy" in result.failure_reason
    assert result.structure is None


def test_volume_blow_up_detected():
    settings = RelaxSettings(max_volume_factor=1.05)
    result = relax_structure(bulk("Cu", "fcc", a=4.3), load_potential("emt"), settings)
    assert result.status == "failed" and "volume changed by a factor" in result.failure_reason


def test_calculator_error_recorded_not_raised(tiny_mace_path):
    calc = load_potential(PotentialSpec(name="mace", model=str(tiny_mace_path)))  # knows only Al, Ni, Cu
    result = relax_structure(bulk("Si", "diamond", a=5.43), calc, item_id="si-on-tiny-mace")
    assert result.status == "failed"
    assert result.failure_reason.startswith("calculation failed")
    assert math.isnan(result.energy)


def test_tiny_mace_relaxation_converges(tiny_mace_path):
    # the tiny model is trained on energies and forces only (no stress): relax positions of a rattled cell
    calc = load_potential(PotentialSpec(name="mace", model=str(tiny_mace_path)))
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    atoms.calc = calc
    e_start = atoms.get_potential_energy()
    result = relax_structure(atoms, calc, RelaxSettings(fmax=0.01, relax_cell=False))
    assert result.status == "ok" and result.converged and result.max_force < 0.01
    assert result.energy < e_start


def test_result_round_trip(chgnet_calc):
    result = relax_structure(bulk("GaAs", "zincblende", a=5.65), chgnet_calc)
    back = RelaxResult.from_dict(result.as_dict())
    assert back.energy == result.energy and back.structure == result.structure
