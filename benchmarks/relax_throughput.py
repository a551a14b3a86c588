"""Batched (torch-sim) relaxation vs the ASE loop: same model, same cells, same settings, one process.

Cells: ``--cells`` small periodic cells (1-8 atoms), strained (±4 %) and rattled (0.03 Å) with a fixed seed;
semiconductors (Si, GaAs, ZnS, MgO, GaN, ...) for CHGNet, Cu/Al/Ni for the tiny committed MACE model (its only
elements). The ASE loop relaxes the first ``--ase-cells`` of them (default: all), the batched path all of them;
throughput is compared per atom·FIRE-step, so the two sets may differ in size (on a GPU the batch should be
large; the ASE loop's rate does not depend on how many cells it does).

Timed: the relaxations only (model loaded, and one warm-up relaxation of one cell done, before the clock).
Both paths relax to ``--fmax`` with at most ``--max-steps`` FIRE steps; ``--fixed-steps N`` instead runs exactly N
steps per cell (fmax 0), the same work in both paths whatever the convergence.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relax_throughput.py --potential mace --cells 64 [--device cuda]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable without installing the project (gpu_check.sh)
    sys.path.insert(0, str(REPO))

TINY_MACE = REPO / "tests" / "data" / "tiny_mace.model"


def _templates(potential: str) -> list:
    from ase.build import bulk

    if potential == "mace":
        return [
            bulk("Cu", "fcc", a=3.61),
            bulk("Al", "fcc", a=4.05, cubic=True),
            bulk("Ni", "fcc", a=3.52) * (1, 1, 2),
            bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1),
            bulk("Al", "fcc", a=4.05) * (2, 2, 1),
            bulk("Ni", "fcc", a=3.52, cubic=True),
        ]
    return [
        bulk("Si", "diamond", a=5.43),
        bulk("GaAs", "zincblende", a=5.65),
        bulk("ZnS", "zincblende", a=5.41),
        bulk("MgO", "rocksalt", a=4.21),
        bulk("GaN", "wurtzite", a=3.19, c=5.19),
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("InP", "zincblende", a=5.87) * (1, 1, 2),
        bulk("CdTe", "zincblende", a=6.48),
    ]


def make_cells(potential: str, n: int, seed: int = 0) -> list:
    """``n`` cells of 1-8 atoms: templates in turn, each strained (±4 %) and rattled (0.03 Å)."""
    rng = np.random.default_rng(seed)
    templates = _templates(potential)
    cells = []
    for i in range(n):
        atoms = templates[i % len(templates)].copy()
        strain = np.eye(3) + rng.uniform(-0.04, 0.04, size=(3, 3)) * np.array([[1, 0.3, 0.3]] * 3)
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.03, seed=int(rng.integers(1 << 30)))
        cells.append(atoms)
    return cells


def potential_spec(potential: str, device: str, dtype: str):
    from materials.potentials import PotentialSpec

    if potential == "mace":
        return PotentialSpec(name="mace", model=str(TINY_MACE), device=device, dtype=dtype)
    return PotentialSpec(name="chgnet", device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    potential: str,
    device: str = "cpu",
    n_cells: int = 64,
    n_ase_cells: int | None = None,
    fmax: float = 0.05,
    max_steps: int = 300,
    fixed_steps: int | None = None,
    batch_max_atoms: int | None = 512,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Run both paths and return rates and the agreement of their energies (see the module docstring)."""
    from materials.batched import BatchLog, batched_model, relax_structures_batched
    from materials.potentials import load_potential
    from materials.relax import RelaxSettings, relax_structure

    spec = potential_spec(potential, device, dtype)
    calculator = load_potential(spec)
    model = batched_model(spec, calculator)
    if fixed_steps is not None:
        fmax, max_steps = 0.0, fixed_steps
    settings = RelaxSettings(fmax=fmax, max_steps=max_steps, batch_max_atoms=batch_max_atoms)
    cells = make_cells(potential, n_cells)
    ase_cells = cells[: n_ase_cells or n_cells]

    warm = make_cells(potential, 1, seed=99)  # first-call costs (CUDA context, kernels) outside the clock
    relax_structure(warm[0], calculator, RelaxSettings(max_steps=3))
    relax_structures_batched(warm, model, RelaxSettings(max_steps=3))

    _sync(device)
    start = time.perf_counter()
    ase_results = [relax_structure(c, calculator, settings, item_id=str(i)) for i, c in enumerate(ase_cells)]
    _sync(device)
    ase_seconds = time.perf_counter() - start

    log = BatchLog()
    start = time.perf_counter()
    batched_results = relax_structures_batched(cells, model, settings, ids=[str(i) for i in range(len(cells))], log=log)
    _sync(device)
    batched_seconds = time.perf_counter() - start

    def atom_steps(results) -> int:
        return sum(r.n_atoms * r.steps for r in results)

    ase_rate = atom_steps(ase_results) / ase_seconds
    batched_rate = atom_steps(batched_results) / batched_seconds
    de = [
        abs(a.energy_per_atom - b.energy_per_atom)
        for a, b in zip(ase_results, batched_results, strict=False)
        if math.isfinite(a.energy_per_atom) and math.isfinite(b.energy_per_atom)
    ]
    return {
        "potential": spec.label(),
        "device": device,
        "dtype": dtype if potential == "mace" else "float32 (CHGNet)",
        "relax": {"fmax": fmax, "max_steps": max_steps, "fixed_steps": fixed_steps, "batch_max_atoms": batch_max_atoms},
        "ase_loop": {
            "cells": len(ase_cells),
            "atoms": sum(len(c) for c in ase_cells),
            "seconds": round(ase_seconds, 3),
            "atom_steps": atom_steps(ase_results),
            "atom_steps_per_s": round(ase_rate, 1),
            "structures_per_s": round(len(ase_cells) / ase_seconds, 3),
            "n_ok": sum(r.status == "ok" for r in ase_results),
        },
        "batched": {
            "cells": len(cells),
            "atoms": sum(len(c) for c in cells),
            "seconds": round(batched_seconds, 3),
            "atom_steps": atom_steps(batched_results),
            "atom_steps_per_s": round(batched_rate, 1),
            "structures_per_s": round(len(cells) / batched_seconds, 3),
            "n_ok": sum(r.status == "ok" for r in batched_results),
            "model_calls": log.n_calls,
            "max_atoms_per_call": log.max_atoms,
        },
        "speedup_atom_steps_per_s": round(batched_rate / ase_rate, 2),
        "max_abs_dE_ev_per_atom": max(de) if de else None,
        "steps_equal_fraction": round(
            float(np.mean([a.steps == b.steps for a, b in zip(ase_results, batched_results, strict=False)])), 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--potential", choices=("chgnet", "mace"), default="mace")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="MACE only")
    parser.add_argument("--cells", type=int, default=64, help="cells relaxed by the batched path (default 64)")
    parser.add_argument("--ase-cells", type=int, default=None, help="cells relaxed by the ASE loop (default all)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--fixed-steps", type=int, default=None, help="exactly N FIRE steps per cell (fmax 0)")
    parser.add_argument("--batch-max-atoms", type=int, default=512)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):
        out = measure(
            args.potential,
            args.device,
            args.cells,
            args.ase_cells,
            args.fmax,
            args.max_steps,
            args.fixed_steps,
            args.batch_max_atoms,
            args.dtype,
        )
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
