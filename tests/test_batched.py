"""Batched (torch-sim) relaxation against the ASE path: same energies, cells, step counts and failure records."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from materials.potentials.batched import BatchLog, batched_model, relax_structures_batched
from materials.potentials.calculators import PotentialSpec, load_potential
from materials.potentials.relax import RelaxSettings, relax_structure

#: Stated agreement of the two paths: final energy per atom (eV/atom) and cell lengths (relative).
ENERGY_TOL = 0.005
LATTICE_TOL = 0.01
TINY_MACE = Path(__file__).parent / "data" / "tiny_mace.model"


def metal_cells():
    """Six Cu/Al/Ni cells of 1-4 atoms (the tiny MACE model's elements), strained and rattled."""
    cells = [
        bulk("Cu", "fcc", a=3.7),
        bulk("Al", "fcc", a=4.0, cubic=True),
        bulk("Ni", "fcc", a=3.5) * (1, 1, 2),
        bulk("Cu", "fcc", a=3.5, cubic=True),
        bulk("Al", "fcc", a=4.1) * (2, 1, 1),
        bulk("Ni", "fcc", a=3.6, cubic=True),
    ]
    for atoms in cells:
        atoms.rattle(0.05, seed=1)
    return cells


def semiconductor_cells():
    """Six semiconductor cells of 2-8 atoms for CHGNet, away from equilibrium."""
    cells = [
        bulk("Si", "diamond", a=5.6),
        bulk("GaAs", "zincblende", a=5.5),
        bulk("MgO", "rocksalt", a=4.3),
        bulk("Si", "diamond", a=5.3, cubic=True),
        bulk("ZnS", "zincblende", a=5.5) * (1, 1, 2),
        bulk("GaN", "wurtzite", a=3.1, c=5.0),
    ]
    for atoms in cells:
        atoms.rattle(0.05, seed=1)
    return cells


@pytest.fixture(scope="module")
def tiny_mace():
    spec = PotentialSpec(name="mace", model=str(TINY_MACE))
    calculator = load_potential(spec)
    return calculator, batched_model(spec, calculator)


def assert_same_relaxation(ase_results, batched_results, fmax):
    for a, b in zip(ase_results, batched_results, strict=True):
        assert a.status == b.status == "ok", (a.id, a.failure_reason, b.failure_reason)
        assert a.converged and b.converged
        assert abs(a.energy_per_atom - b.energy_per_atom) < ENERGY_TOL, (a.id, a.energy_per_atom, b.energy_per_atom)
        lengths_a = np.array(a.structure.lattice.abc)
        lengths_b = np.array(b.structure.lattice.abc)
        assert np.all(np.abs(lengths_b / lengths_a - 1) < LATTICE_TOL), (a.id, lengths_a, lengths_b)
        assert abs(a.steps - b.steps) <= 3, (a.id, a.steps, b.steps)  # same FIRE: step counts agree closely
        assert b.max_force < fmax and b.n_atoms == a.n_atoms and b.formula == a.formula


@pytest.mark.slow
def test_mace_batched_matches_ase(tiny_mace):
    calculator, model = tiny_mace
    settings = RelaxSettings(fmax=0.02, max_steps=300)
    cells = metal_cells()
    ase_results = [relax_structure(c, calculator, settings, item_id=f"c{i}") for i, c in enumerate(cells)]
    log = BatchLog()
    batched = relax_structures_batched(cells, model, settings, ids=[f"c{i}" for i in range(6)], log=log)
    assert [r.id for r in batched] == [f"c{i}" for i in range(6)]
    assert_same_relaxation(ase_results, batched, settings.fmax)
    assert log.max_atoms == sum(len(c) for c in cells)  # default limit: all six relaxed in one batch
    assert log.n_calls < sum(r.steps for r in ase_results)  # fewer model calls than the ASE loop


@pytest.mark.slow
def test_chgnet_batched_matches_ase(chgnet_calc):
    model = batched_model(PotentialSpec(name="chgnet"), chgnet_calc)
    settings = RelaxSettings(fmax=0.05, max_steps=200)
    cells = semiconductor_cells()
    ase_results = [relax_structure(c, chgnet_calc, settings) for c in cells]
    batched = relax_structures_batched(cells, model, settings)
    assert_same_relaxation(ase_results, batched, settings.fmax)
    # GaAs zincblende: CHGNet's lattice constant (~5.75 Å), conventional a = sqrt(2) x primitive length
    gaas = batched[1].structure
    assert 5.6 < gaas.lattice.a * np.sqrt(2) < 5.9


def test_autobatcher_respects_memory_limit(tiny_mace):
    _, model = tiny_mace
    cells = metal_cells()  # 1, 4, 2, 4, 2, 4 atoms
    settings = RelaxSettings(fmax=0.02, batch_max_atoms=6)
    log = BatchLog()
    limited = relax_structures_batched(cells, model, settings, log=log)
    assert log.max_atoms <= 6 and max(log.systems_per_call) >= 2  # batched, never above the limit
    unlimited = relax_structures_batched(cells, model, RelaxSettings(fmax=0.02, batch_max_atoms=1000))
    for a, b in zip(limited, unlimited, strict=True):
        assert a.status == b.status == "ok"
        assert abs(a.energy_per_atom - b.energy_per_atom) < 1e-4  # only float summation order differs
        assert abs(a.steps - b.steps) <= 2

    # a structure larger than the limit is relaxed alone, the others still batched under the limit
    log = BatchLog()
    relax_structures_batched(cells, model, RelaxSettings(fmax=0.02, batch_max_atoms=3), log=log)
    assert log.max_atoms == 4
    assert all(s == 1 for a, s in zip(log.atoms_per_call, log.systems_per_call, strict=True) if a > 3)


def test_failures_have_the_same_reasons_and_stay_isolated(tiny_mace):
    calculator, model = tiny_mace
    # blow-up detection: the same reason text in both paths
    strict = RelaxSettings(fmax=0.05, min_energy_per_atom=0.0)
    cells = metal_cells()[:2]  # Cu (E < 0: "blow-up") and Al (E > 0: ok)
    ase_results = [relax_structure(c, calculator, strict) for c in cells]
    batched = relax_structures_batched(cells, model, strict)
    assert [r.status for r in batched] == [r.status for r in ase_results] == ["failed", "ok"]
    assert batched[0].failure_reason == ase_results[0].failure_reason
    assert "relax.min_energy_per_atom=0.0" in batched[0].failure_reason

    # an element the model does not know breaks the batch's model call: it fails alone, with its reason
    mixed = [metal_cells()[0], bulk("Si", "diamond", a=5.43), metal_cells()[1]]
    results = relax_structures_batched(mixed, model, RelaxSettings(fmax=0.05), ids=["cu", "si", "al"])
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].failure_reason.startswith("calculation failed:") and results[1].id == "si"


def test_neighbor_list_matches_ase():
    import torch
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    from materials.potentials.batched import neighbor_list, neighbors

    rng = np.random.default_rng(0)
    cells = []
    for k in range(12):  # skewed cells of 1-4 atoms, some atoms far outside their cell
        atoms = [bulk("Si", "diamond", a=5.43), bulk("GaN", "wurtzite", a=3.19, c=5.19), bulk("Cu", "fcc", a=3.6)][
            k % 3
        ]
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.uniform(-0.15, 0.15, (3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, 1.5, atoms.positions.shape)
        cells.append(atoms)
    offsets = np.cumsum([0] + [len(c) for c in cells])
    positions = torch.tensor(np.concatenate([c.positions for c in cells]))
    lattice = torch.tensor(np.stack([c.cell.array for c in cells]))
    system_idx = torch.tensor(np.repeat(np.arange(len(cells)), [len(c) for c in cells]))
    for cutoff in (3.0, 6.0):
        want = set()
        for s, atoms in enumerate(cells):
            i, j, shift = ase_neighbor_list("ijS", atoms, cutoff)
            want |= set(zip((i + offsets[s]).tolist(), (j + offsets[s]).tolist(), *shift.T.tolist(), strict=True))
        for finder in (neighbor_list, neighbors):  # the GPU algorithm (run here on the CPU) and the CPU one (vesin)
            edges, shifts = finder(positions, lattice, system_idx, cutoff)
            got = set(zip(edges[0].tolist(), edges[1].tolist(), *shifts.round().long().T.tolist(), strict=True))
            assert got == want and len(got) > 100, finder.__name__


def test_batched_models_match_their_calculators(chgnet_calc, tiny_mace):
    """One batched call (energies, forces, stresses of several cells) against the ASE calculator cell by cell; for
    CHGNet with its graphs built on the device and with CHGNet's own converter."""
    import torch_sim as ts

    from materials.potentials.batched import CHGNetModel

    def compare(model, calculator, cells, tol_e, tol_f):
        state = ts.initialize_state(cells, model.device, model.dtype)
        out = model(state)
        start = 0
        for k, atoms in enumerate(cells):
            atoms = atoms.copy()
            atoms.calc = calculator
            n = len(atoms)
            assert abs(float(out["energy"][k]) - atoms.get_potential_energy()) < tol_e * n
            assert np.abs(out["forces"][start : start + n].numpy() - atoms.get_forces()).max() < tol_f
            assert np.abs(out["stress"][k].numpy() - atoms.get_stress(voigt=False)).max() < tol_f
            start += n

    cells = semiconductor_cells()
    cells.append(bulk("Cu", "fcc", a=2.6))  # one atom: bonds to its own images within the 3 Å bond-graph cutoff
    for graphs in ("device", "cpu"):
        compare(CHGNetModel(chgnet_calc.model, graphs=graphs), chgnet_calc, cells, 1e-5, 2e-4)
    calculator, model = tiny_mace
    compare(model, calculator, metal_cells(), 1e-8, 1e-8)
    with pytest.raises(ValueError, match="graphs="):
        CHGNetModel(chgnet_calc.model, graphs="gpu")


def test_batched_rejects_potentials_without_a_torch_model():
    from materials.potentials.calculators import PotentialError

    with pytest.raises(PotentialError, match="relax.batched"):
        batched_model(PotentialSpec(name="emt"), load_potential("emt"))


def test_batched_config_is_validated_and_does_not_change_the_fingerprint():
    from pipelines.config import ConfigError, load_config, parse_config
    from pipelines.screen import config_fingerprint

    gpu = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu-screen.yaml")
    assert gpu.relax.batched and gpu.potential.device == "cuda" and gpu.ray.gpus_per_worker == 0.25
    with pytest.raises(ConfigError, match="relax.batched: true needs potential.name chgnet, mace or sevennet"):
        parse_config({"potential": {"name": "emt"}, "relax": {"batched": True}})
    with pytest.raises(ConfigError, match="needs potential.device: cuda"):
        parse_config({"relax": {"batched": True, "batch_max_atoms": None}})
    # batching chooses how, not what: a CPU screen can be resumed batched (and old output folders still match)
    plain, batched = parse_config({}), parse_config({"relax": {"batched": True, "batch_max_atoms": 64}})
    assert config_fingerprint(plain, None, None) == config_fingerprint(batched, None, None)
    assert config_fingerprint(plain, None, None) != config_fingerprint(
        parse_config({"relax": {"fmax": 0.1}}), None, None
    )


@pytest.mark.slow
def test_screen_batched_gives_the_same_stable_set(tmp_path):
    from pipelines.config import parse_config
    from pipelines.screen import run_screen

    base = {
        "name": "batched",
        "candidates": {
            "prototypes": {"zincblende": [["Ga", "In", "Zn"], ["P", "As", "Se"]], "rocksalt": [["Ga"], ["As"]]}
        },
        "relax": {"fmax": 0.05, "max_steps": 200},
        "ray": {"num_cpus": 1, "num_workers": 1, "chunk_size": 8},
        "tracking": {"enabled": False},
    }
    rows = {}
    for batched in (False, True):
        config = parse_config({**base, "relax": {**base["relax"], "batched": batched}})
        out = tmp_path / f"batched-{batched}"
        summary = run_screen(config, limit=5, out_dir=out, progress=False)
        assert summary.n_ok == 5
        rows[batched] = {r["id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows[True]) == set(rows[False])
    stable = {b: {i for i, r in rows[b].items() if float(r["e_above_hull"]) <= 0.1} for b in rows}
    assert stable[True] == stable[False] and len(stable[True]) >= 2
    for item_id, row in rows[False].items():
        assert abs(float(rows[True][item_id]["energy_per_atom"]) - float(row["energy_per_atom"])) < ENERGY_TOL
