"""Batched (torch-sim) relaxation vs the ASE loop: same model, same cells, same settings, one process.

Cells: ``--cells`` small periodic cells (1-8 atoms), strained (±4 %) and rattled (0.03 Å) with a fixed seed;
semiconductors (Si, GaAs, ZnS, MgO, GaN, ...) for CHGNet, SevenNet and ``mace-medium``, Cu/Al/Ni for the tiny committed
MACE model (its only elements). The ASE loop relaxes the first ``--ase-cells`` of them (default: all), the batched path
all of them; throughput is compared per atom·FIRE-step, so the two sets may differ in size (on a GPU the batch should be
large; the ASE loop's rate does not depend on how many cells it does).

Potentials: ``chgnet`` (pretrained, in its wheel), ``sevennet`` (SevenNet-0, ``7net-0``, in the sevenn wheel; float32;
only in SevenNet's own environment, ``.venv-sevennet``, built by ``make setup-sevennet``: sevenn needs e3nn>=0.5 and
mace-torch pins 0.4.4), ``mace`` (the tiny committed model, tests/data/tiny_mace.model) and ``mace-medium``: MACE-MP
"medium"'s architecture with seeded random weights, built in code (throughput does not depend on the weights):
ScaleShiftMACE, 128x0e+128x1o hidden irreps (max_L 1), correlation 3, 2 interactions, r_max 6 Å, 8 Bessel functions,
polynomial cutoff 5, spherical harmonics to l=3, radial MLP [64, 64, 64], readout MLP 16x0e, 89 elements (Z 1-89),
residual first interaction: 4.69 M parameters, as MACE-MP-0 medium; float32 or float64 (``--dtype``). At mace-torch's
initialisation its forces are ~1e-3 eV/Å, so the cells stay near their (real) starting geometry and keep real neighbour
counts (~30-60 per atom within 6 Å).

Timed: the relaxations only (model loaded, and one warm-up relaxation of one cell done, before the clock).
Both paths relax to ``--fmax`` with at most ``--max-steps`` FIRE steps; ``--fixed-steps N`` instead runs exactly N
steps per cell (fmax 0), the same work in both paths whatever the convergence.

``--save PATH`` also writes the result as a JSON record with the command line, the commit (and ``worktree_modified``:
tracked files with uncommitted changes), the date and the load average before and after.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relax_throughput.py --potential mace --cells 64 [--device cuda]
    OMP_NUM_THREADS=1 .venv-sevennet/bin/python benchmarks/relax_throughput.py --potential sevennet --cells 64 \
        --save benchmarks/results/relax_throughput_sevennet_cpu.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.tracking import git_commit, git_modified_files  # noqa: E402

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
    from materials.potentials.calculators import PotentialSpec

    if potential == "mace":
        return PotentialSpec(name="mace", model=str(TINY_MACE), device=device, dtype=dtype)
    if potential == "mace-medium":
        return PotentialSpec(name="mace", device=device, dtype=dtype)  # the model itself: medium_mace()
    if potential == "sevennet":
        return PotentialSpec(name="sevennet", model="7net-0", device=device)
    return PotentialSpec(name="chgnet", device=device)


#: MACE-MP "medium" hyper-parameters (mace-torch's MACE-MP-0 medium training options).
MEDIUM = {
    "r_max": 6.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 3,
    "num_interactions": 2,
    "hidden_irreps": "128x0e+128x1o",
    "MLP_irreps": "16x0e",
    "correlation": 3,
    "radial_MLP": [64, 64, 64],
    "avg_num_neighbors": 61.96,
}


def medium_mace(dtype: str = "float32", seed: int = 0) -> torch.nn.Module:
    """A ScaleShiftMACE with MACE-MP medium's architecture (:data:`MEDIUM`, 89 elements, 4.69 M parameters) and
    seeded random weights (mace-torch's initialisation; random elemental energies)."""
    from materials.potentials.calculators import mace_unpickling

    with mace_unpickling():  # importing mace sets a process-wide variable; restored after the block
        from e3nn import o3
        from mace import modules
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = modules.ScaleShiftMACE(
            r_max=MEDIUM["r_max"],
            num_bessel=MEDIUM["num_bessel"],
            num_polynomial_cutoff=MEDIUM["num_polynomial_cutoff"],
            max_ell=MEDIUM["max_ell"],
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=MEDIUM["num_interactions"],
            num_elements=89,
            hidden_irreps=o3.Irreps(MEDIUM["hidden_irreps"]),
            MLP_irreps=o3.Irreps(MEDIUM["MLP_irreps"]),
            atomic_energies=rng.uniform(-8.0, -1.0, size=89),
            avg_num_neighbors=MEDIUM["avg_num_neighbors"],
            atomic_numbers=list(range(1, 90)),
            correlation=MEDIUM["correlation"],
            gate=torch.nn.functional.silu,
            radial_MLP=MEDIUM["radial_MLP"],
            use_reduced_cg=False,  # MACE-MP's models predate the reduced Clebsch-Gordan basis
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def load_models(potential: str, device: str, dtype: str, chgnet_graphs: str = "device"):
    """(label, ASE calculator, torch-sim model) sharing one set of weights; ``chgnet_graphs``: where the batched
    CHGNet model builds its graphs (``device`` or ``cpu``, CHGNet's own converter)."""
    from materials.potentials.batched import CHGNetModel, batched_model
    from materials.potentials.calculators import load_potential

    spec = potential_spec(potential, device, dtype)
    if potential == "mace-medium":
        from mace.calculators import MACECalculator

        from materials.potentials.calculators import mace_unpickling

        with mace_unpickling():
            calculator = MACECalculator(models=medium_mace(dtype), device=device, default_dtype=dtype)
        label = f"mace-medium-random-{sum(p.numel() for p in calculator.models[0].parameters()) / 1e6:.2f}M"
    else:
        calculator = load_potential(spec)
        label = spec.label()
    if potential == "chgnet" and chgnet_graphs != "device":
        return f"{label} (graphs on {chgnet_graphs})", calculator, CHGNetModel(calculator.model, device, graphs="cpu")
    return label, calculator, batched_model(spec, calculator)


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
    chgnet_graphs: str = "device",
    workers: int = 0,
) -> dict[str, Any]:
    """Run both paths and return rates and the agreement of their energies (see the module docstring); with
    ``workers``, also the fractional-GPU row (:func:`measure_fractional`) over the same cells."""
    from materials.potentials.batched import BatchLog, relax_structures_batched
    from materials.potentials.relax import RelaxSettings, relax_structure

    label, calculator, model = load_models(potential, device, dtype, chgnet_graphs)
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

    fractional = None
    if workers:
        fractional = measure_fractional(
            potential, device, dtype, workers, n_cells, fmax, max_steps, batch_max_atoms, chgnet_graphs
        )
        fractional["speedup_vs_single_process_batched"] = round(
            fractional["atom_steps_per_s"] / (atom_steps(batched_results) / batched_seconds), 2
        )
        fractional["speedup_vs_ase_loop"] = round(
            fractional["atom_steps_per_s"] / (atom_steps(ase_results) / ase_seconds), 2
        )

    ase_rate = atom_steps(ase_results) / ase_seconds
    batched_rate = atom_steps(batched_results) / batched_seconds
    de = [
        abs(a.energy_per_atom - b.energy_per_atom)
        for a, b in zip(ase_results, batched_results, strict=False)
        if math.isfinite(a.energy_per_atom) and math.isfinite(b.energy_per_atom)
    ]
    out = {
        "potential": label,
        "device": device,
        "dtype": {"chgnet": "float32 (CHGNet)", "sevennet": "float32 (SevenNet)"}.get(potential, dtype),
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
            "records_seconds": round(log.records_seconds, 3),
            "loop_atom_steps_per_s": round(atom_steps(batched_results) / (batched_seconds - log.records_seconds), 1),
        },
        "speedup_atom_steps_per_s": round(batched_rate / ase_rate, 2),
        "max_abs_dE_ev_per_atom": max(de) if de else None,
        "steps_equal_fraction": round(
            float(np.mean([a.steps == b.steps for a, b in zip(ase_results, batched_results, strict=False)])), 3
        ),
    }
    if fractional is not None:
        out["fractional_gpu"] = fractional
    return out


def _fractional_worker(task: dict, barrier, queue) -> None:
    """One worker of :func:`measure_fractional`: load the model, relax its share of the cells once to warm up,
    wait for the others, relax its share, report wall-clock start/end and atom·steps."""
    try:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        with contextlib.redirect_stdout(sys.stderr):
            from materials.potentials.batched import relax_structures_batched
            from materials.potentials.relax import RelaxSettings

            _, _, model = load_models(task["potential"], task["device"], task["dtype"], task["chgnet_graphs"])
            cells = make_cells(task["potential"], task["n_cells"])[task["worker"] :: task["workers"]]
            settings = RelaxSettings(
                fmax=task["fmax"], max_steps=task["max_steps"], batch_max_atoms=task["batch_max_atoms"]
            )
            relax_structures_batched(cells[:8], model, RelaxSettings(fmax=0.0, max_steps=3))
            _sync(task["device"])
            barrier.wait(timeout=900)
            start = time.time()
            results = relax_structures_batched(cells, model, settings)
            _sync(task["device"])
            end = time.time()
        queue.put(
            {
                "start": start,
                "end": end,
                "cells": len(cells),
                "atoms": sum(len(c) for c in cells),
                "atom_steps": sum(r.n_atoms * r.steps for r in results),
                "n_ok": sum(r.status == "ok" for r in results),
            }
        )
    except Exception as exc:  # reported to the parent, which raises
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_fractional(
    potential: str,
    device: str,
    dtype: str,
    workers: int,
    n_cells: int,
    fmax: float,
    max_steps: int,
    batch_max_atoms: int | None,
    chgnet_graphs: str = "device",
) -> dict[str, Any]:
    """Several processes share one device, each relaxing its own batch (every ``workers``-th cell of the same
    ``n_cells``), started together after each has loaded its model and warmed up: one process's CPU work (Python,
    graph building, kernel launches) overlaps the device work of the others. Aggregate atom·steps/s over the wall
    time from the first start to the last end. Plain multiprocessing (spawn) here: it stands in for Ray actors
    with fractional ``num_gpus`` (1/workers each), which is how the pipeline would place them (Ray is too large to
    carry to the benchmark's GPU machine)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(workers), context.Queue()
    base = {
        "potential": potential,
        "device": device,
        "dtype": dtype,
        "workers": workers,
        "n_cells": n_cells,
        "fmax": fmax,
        "max_steps": max_steps,
        "batch_max_atoms": batch_max_atoms,
        "chgnet_graphs": chgnet_graphs,
    }
    processes = [
        context.Process(target=_fractional_worker, args=({**base, "worker": w}, barrier, queue)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    reports = [queue.get(timeout=1200) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"fractional-GPU workers failed: {errors}")
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    total = sum(r["atom_steps"] for r in reports)
    return {
        "note": f"{workers} worker processes (multiprocessing, spawn) sharing one {device} device, each relaxing its "
        f"own batch; stands in for Ray actors with fractional num_gpus={1 / workers:.2g}",
        "workers": workers,
        "graphs": chgnet_graphs if potential == "chgnet" else "n/a",
        "cells": sum(r["cells"] for r in reports),
        "atoms": sum(r["atoms"] for r in reports),
        "seconds": round(seconds, 3),
        "atom_steps": total,
        "atom_steps_per_s": round(total / seconds, 1),
        "worker_seconds": [round(r["end"] - r["start"], 3) for r in reports],
        "n_ok": sum(r["n_ok"] for r in reports),
    }


def _command_line(argv: list[str]) -> str:
    """The command as run from the repository root, e.g. ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/...``."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    script = Path(__file__).resolve().relative_to(REPO)
    return shlex.join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", str(python), str(script), *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--potential", choices=("chgnet", "mace", "mace-medium", "sevennet"), default="mace")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="MACE only")
    parser.add_argument("--cells", type=int, default=64, help="cells relaxed by the batched path (default 64)")
    parser.add_argument("--ase-cells", type=int, default=None, help="cells relaxed by the ASE loop (default all)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--fixed-steps", type=int, default=None, help="exactly N FIRE steps per cell (fmax 0)")
    parser.add_argument("--batch-max-atoms", type=int, default=512)
    parser.add_argument(
        "--chgnet-graphs", choices=("device", "cpu"), default="device", help="where batched CHGNet builds graphs"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="also the fractional-GPU row: this many processes share the device"
    )
    parser.add_argument("--save", type=Path, default=None, help="also write the result, with the run's context, here")
    args = parser.parse_args(argv)
    if args.potential == "sevennet" and importlib.util.find_spec("sevenn") is None:
        print(
            f"error: --potential sevennet needs SevenNet's own environment and this Python ({sys.executable}) has no "
            "sevenn (it needs e3nn>=0.5, mace-torch pins 0.4.4): run `make setup-sevennet`, then "
            "`OMP_NUM_THREADS=1 .venv-sevennet/bin/python benchmarks/relax_throughput.py --potential sevennet ...`",
            file=sys.stderr,
        )
        return 2
    load_before = [round(x, 2) for x in os.getloadavg()]
    wall_start = time.perf_counter()
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
            args.chgnet_graphs,
            args.workers,
        )
    if args.save:
        out = {
            "command": _command_line(sys.argv[1:] if argv is None else argv),
            "commit": git_commit(),
            "worktree_modified": git_modified_files(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "load_average_before": load_before,
            **out,
            "wall_seconds": round(time.perf_counter() - wall_start, 1),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
