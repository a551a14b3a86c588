"""Train a tiny MACE model on EMT-labelled Cu/Al/Ni cells, for use as a test fixture.

The script

1. generates 50 training and 10 test structures: 8-atom fcc supercells (the 4-atom cubic
   conventional cell repeated twice along x) of pure Cu, Al, Ni or random Cu/Al/Ni mixtures,
   with a random symmetric strain of up to +/-3 % per component and a Gaussian rattle whose
   standard deviation is drawn uniformly from 0.02-0.1 Angstrom (numpy RNG, seed 1);
2. labels them with ASE's EMT calculator and writes them as extxyz with
   ``info["REF_energy"]`` (eV), ``info["REF_stress"]`` (Voigt 6-vector, eV/Angstrom^3) and
   ``arrays["REF_forces"]`` (eV/Angstrom);
3. runs ``mace_run_train`` (CPU, float64, OMP_NUM_THREADS=1) in a temporary directory with the
   hyperparameters from the shared recipe, and copies the resulting non-compiled
   ``tiny_mace.model`` to ``--out``;
4. evaluates the copied model against EMT on the test set and prints the energy MAE
   (meV/atom) and the force RMSE (meV/Angstrom).

Units: Angstrom for lengths, eV for energies, eV/Angstrom for forces, eV/Angstrom^3 for stress.

Usage::

    python scripts/train_tiny_mace.py [--out tests/data/tiny_mace.model] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

ELEMENTS = ("Cu", "Al", "Ni")
# Approximate fcc lattice constants (Angstrom); mixtures use Vegard's law.
LATTICE_CONSTANTS = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "tiny_mace.model"


def make_structure(rng: np.random.Generator) -> Atoms:
    """Return one strained, rattled 8-atom fcc cell of Cu, Al, Ni or a random mixture."""
    kind = rng.choice(len(ELEMENTS) + 1)
    if kind < len(ELEMENTS):
        symbols = [ELEMENTS[kind]] * 8
    else:
        symbols = list(rng.choice(ELEMENTS, size=8))
    a = float(np.mean([LATTICE_CONSTANTS[s] for s in symbols]))
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 1, 1))
    atoms.set_chemical_symbols(symbols)

    eps = rng.uniform(-0.03, 0.03, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)

    sigma = rng.uniform(0.02, 0.1)
    atoms.positions = atoms.positions + rng.normal(0.0, sigma, size=atoms.positions.shape)
    return atoms


def label_with_emt(atoms: Atoms) -> Atoms:
    """Attach EMT energy/forces/stress as REF_* info/arrays and detach the calculator."""
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=True)
    atoms.calc = None
    atoms.info["REF_energy"] = float(energy)
    atoms.info["REF_stress"] = np.asarray(stress, dtype=float)
    atoms.arrays["REF_forces"] = np.asarray(forces, dtype=float)
    return atoms


def make_dataset(n_train: int, n_test: int, seed: int) -> tuple[list[Atoms], list[Atoms]]:
    """Generate EMT-labelled training and test structures with a seeded RNG."""
    rng = np.random.default_rng(seed)
    structures = [label_with_emt(make_structure(rng)) for _ in range(n_train + n_test)]
    return structures[:n_train], structures[n_train:]


def find_mace_run_train() -> str:
    """Locate the ``mace_run_train`` entry point, preferring the running interpreter's bin dir."""
    candidate = Path(sys.executable).parent / "mace_run_train"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mace_run_train")
    if found is None:
        raise FileNotFoundError("mace_run_train not found; install mace-torch in this environment")
    return found


def train(workdir: Path, epochs: int, seed: int) -> Path:
    """Run mace_run_train in ``workdir`` and return the path of the non-compiled model."""
    cmd = [
        find_mace_run_train(),
        "--name",
        "tiny_mace",
        "--seed",
        str(seed),
        "--train_file",
        "train.xyz",
        "--valid_fraction",
        "0.1",
        "--test_file",
        "test.xyz",
        "--energy_key",
        "REF_energy",
        "--forces_key",
        "REF_forces",
        "--stress_key",
        "REF_stress",
        "--E0s",
        "average",
        "--model",
        "MACE",
        "--r_max",
        "4.0",
        "--num_channels",
        "16",
        "--max_L",
        "0",
        "--correlation",
        "2",
        "--num_interactions",
        "2",
        "--num_radial_basis",
        "6",
        "--MLP_irreps",
        "16x0e",
        "--batch_size",
        "5",
        "--valid_batch_size",
        "5",
        "--max_num_epochs",
        str(epochs),
        "--lr",
        "0.01",
        "--device",
        "cpu",
        "--default_dtype",
        "float64",
        "--eval_interval",
        "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"mace_run_train failed with exit code {proc.returncode}")
    model = workdir / "tiny_mace.model"
    if not model.exists():
        raise FileNotFoundError(
            f"mace_run_train did not write {model}; found {sorted(p.name for p in workdir.iterdir())}"
        )
    return model


def evaluate(model_path: Path, test: list[Atoms]) -> tuple[float, float]:
    """Return (energy MAE in meV/atom, force RMSE in meV/Angstrom) of the model vs EMT."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    e_err = []
    f_err = []
    for ref in test:
        atoms = ref.copy()
        atoms.calc = calc
        e_err.append((atoms.get_potential_energy() - ref.info["REF_energy"]) / len(atoms))
        f_err.append((atoms.get_forces() - ref.arrays["REF_forces"]).ravel())
    e_mae = 1000.0 * float(np.mean(np.abs(e_err)))
    f_rmse = 1000.0 * float(np.sqrt(np.mean(np.concatenate(f_err) ** 2)))
    return e_mae, f_rmse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to copy tiny_mace.model")
    parser.add_argument("--n-train", type=int, default=50, help="number of training structures")
    parser.add_argument("--n-test", type=int, default=10, help="number of test structures")
    parser.add_argument("--epochs", type=int, default=30, help="max_num_epochs for mace_run_train")
    parser.add_argument("--seed", type=int, default=1, help="seed for data generation and training")
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the training dir")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    train_set, test_set = make_dataset(args.n_train, args.n_test, args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="tiny_mace_"))
    try:
        write(workdir / "train.xyz", train_set, format="extxyz")
        write(workdir / "test.xyz", test_set, format="extxyz")
        t1 = time.perf_counter()
        print(f"data: {len(train_set)} train + {len(test_set)} test structures ({t1 - t0:.1f} s)")

        model = train(workdir, args.epochs, args.seed)
        t2 = time.perf_counter()
        print(f"training: {t2 - t1:.1f} s")

        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, args.out)
    finally:
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    size_mb = args.out.stat().st_size / 1e6
    print(f"model: {args.out} ({size_mb:.2f} MB)")

    e_mae, f_rmse = evaluate(args.out, test_set)
    print(f"test energy MAE: {e_mae:.2f} meV/atom")
    print(f"test force RMSE: {f_rmse:.1f} meV/A")
    print(f"total: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
