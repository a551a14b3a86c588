"""Overhead of the Ray pipeline against a plain ASE loop, on the same structures and relaxation settings.

In one run, on the same N candidate structures (III-V / II-VI zincblende, wurtzite, rocksalt):

  (a) ase_loop           one CHGNet calculator in this process, ``relax_structure`` on each structure;
  (b) pipeline_1worker   ``init_ray`` + ``make_workers`` (1 actor) + ``run_chunks``;
  (c) pipeline_2workers  the same with 2 actors (Ray ``num_cpus=2``).

Timed: (a) the relaxation loop only (the model is loaded before the clock starts); (b)/(c) from the first
dispatch to the last result. ``ray.init`` and actor start-up (process spawn, imports, model load) are NOT
timed: every actor answers a trivial remote call (an empty chunk) before the clock starts. Nobody is warmed
up: the first relaxation of each calculator/actor is timed in all three modes.

Goals: pipeline_1worker / ase_loop >= 0.9 and pipeline_2workers / ase_loop >= 1.6 (structures/s ratios).
The energies of (a) and (b) (and (c)) must agree: max |dE| in eV/atom is reported.

Diagnostics per mode: ``relax_seconds_sum`` (time inside ``relax_structure``, summed over structures) and
``worker_utilisation`` = relax_seconds_sum / (workers x wall seconds): below 1 is dispatch/transfer overhead
and idle workers (e.g. the last chunks running on one worker); a larger relax_seconds_sum than the ASE loop's
means each relaxation got slower (CPU contention).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screen_overhead.py [--n 40] [--json]
"""

from __future__ import annotations

import os

# Thread settings before torch (or anything that imports it) is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from itertools import zip_longest  # noqa: E402
from typing import Any  # noqa: E402

#: Small III-V / II-VI set; candidates are interleaved across prototypes so that any --n mixes all three.
PROTOTYPE_SITES: dict[str, list[list[str]]] = {
    "zincblende": [["Al", "Ga", "In", "Zn", "Cd"], ["P", "As", "Sb", "S", "Se", "Te"]],
    "wurtzite": [["Al", "Ga", "In", "Zn", "Cd"], ["N", "P", "As", "S", "Se", "Te"]],
    "rocksalt": [["Mg", "Ca", "Sr", "Zn", "Cd"], ["O", "S", "Se", "Te"]],
}

GOAL_1WORKER = 0.9
GOAL_2WORKERS = 1.6
TIMING_NOTE = (
    "ase_loop: relaxation loop only (calculator loaded before timing). pipelines: first dispatch to last "
    "result; ray.init and actor start-up (spawn, imports, model load) excluded - every actor answered a "
    "trivial remote call before timing. No warm-up relaxation in any mode."
)


def build_items(n: int) -> list:
    """The first ``n`` candidates, interleaved zincblende / wurtzite / rocksalt, as pipeline WorkItems."""
    from materials.structures.candidates import enumerate_candidates
    from pipelines.execution import WorkItem

    per_proto = [enumerate_candidates({name: sites}) for name, sites in PROTOTYPE_SITES.items()]
    interleaved = [c for group in zip_longest(*per_proto) for c in group if c is not None]
    if n > len(interleaved):
        raise SystemExit(f"--n {n}: only {len(interleaved)} candidates in the benchmark set")
    return [WorkItem(c.id, c.formula, c.prototype, c.source, c.structure.as_dict()) for c in interleaved[:n]]


def run_ase_loop(items: list, relax_settings) -> dict[str, Any]:
    from pymatgen.core import Structure

    from materials.potentials.calculators import load_potential
    from materials.potentials.relax import relax_structure

    structures = [(it.id, Structure.from_dict(it.structure)) for it in items]
    t0 = time.perf_counter()
    calculator = load_potential("chgnet")
    load_s = time.perf_counter() - t0
    energies: dict[str, float] = {}
    statuses: dict[str, str] = {}
    relax_s = 0.0
    start = time.perf_counter()
    for item_id, structure in structures:
        result = relax_structure(structure, calculator, relax_settings, item_id=item_id)
        energies[item_id] = result.energy_per_atom
        statuses[item_id] = result.status
        relax_s += result.seconds
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "setup_seconds_untimed": load_s,
        "relax_seconds_sum": relax_s,
        "workers": 1,
        "energies": energies,
        "statuses": statuses,
    }


def run_pipeline(items: list, relax_settings, n_workers: int, chunk_size: int, max_in_flight: int) -> dict[str, Any]:
    import ray

    from materials.potentials.calculators import PotentialSpec
    from materials.structures.inputs import CheckSettings
    from pipelines.config import RaySettings
    from pipelines.execution import chunked, init_ray, make_workers, run_chunks

    settings = RaySettings(
        num_cpus=n_workers,
        num_workers=n_workers,
        chunk_size=chunk_size,
        max_in_flight_per_worker=max_in_flight,
    )
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    init_ray(settings)
    try:
        workers = make_workers(PotentialSpec(name="chgnet"), relax_settings, CheckSettings(), settings)
        ray.get([w.relax_chunk.remote([]) for w in workers])  # actors constructed, potential loaded
        setup_s = time.perf_counter() - t0
        records: list[dict[str, Any]] = []
        chunks = chunked(items, settings.chunk_size)
        start = time.perf_counter()
        for _ in run_chunks(workers, chunks, settings.max_in_flight_per_worker, records.extend):
            pass
        seconds = time.perf_counter() - start
        for w in workers:
            ray.kill(w)
    finally:
        ray.shutdown()
    energies = {r.id: math.nan if r.energy_per_atom is None else r.energy_per_atom for r in records}
    statuses = {r.id: r.status for r in records}
    return {
        "seconds": seconds,
        "setup_seconds_untimed": setup_s,
        "relax_seconds_sum": sum(r.seconds or 0.0 for r in records),
        "workers": n_workers,
        "energies": energies,
        "statuses": statuses,
    }


def max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float:
    diffs = [abs(a[k] - b[k]) for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(diffs) != len(a) or set(a) != set(b):
        return math.nan  # a missing or non-finite energy: no agreement claim
    return max(diffs) if diffs else math.nan


def summarise(name: str, n: int, run: dict[str, Any]) -> dict[str, Any]:
    statuses = run["statuses"]
    return {
        "mode": name,
        "n_structures": n,
        "seconds": round(run["seconds"], 3),
        "structures_per_s": round(n / run["seconds"], 4),
        "setup_seconds_untimed": round(run["setup_seconds_untimed"], 2),
        # time spent inside relax_structure, summed over structures, and its share of workers x wall time
        "relax_seconds_sum": round(run["relax_seconds_sum"], 3),
        "worker_utilisation": round(run["relax_seconds_sum"] / (run["workers"] * run["seconds"]), 3),
        "n_ok": sum(s == "ok" for s in statuses.values()),
        "n_failed": sum(s != "ok" for s in statuses.values()),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from materials.potentials.relax import RelaxSettings

    relax_settings = RelaxSettings(fmax=args.fmax, max_steps=args.max_steps)
    items = build_items(args.n)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = load_average()

    log(f"(a) plain ASE loop on {len(items)} structures ...")
    ase = run_ase_loop(items, relax_settings)
    log("(b) pipeline, 1 Ray worker ...")
    p1 = run_pipeline(items, relax_settings, 1, args.chunk_size, args.max_in_flight)
    log("(c) pipeline, 2 Ray workers ...")
    p2 = run_pipeline(items, relax_settings, 2, args.chunk_size, args.max_in_flight)

    n = len(items)
    modes = [summarise("ase_loop", n, ase), summarise("pipeline_1worker", n, p1), summarise("pipeline_2workers", n, p2)]
    ratio1 = ase["seconds"] / p1["seconds"]
    ratio2 = ase["seconds"] / p2["seconds"]
    de1 = max_abs_diff(ase["energies"], p1["energies"])
    de2 = max_abs_diff(ase["energies"], p2["energies"])
    out = {
        "n_structures": n,
        "prototypes": sorted({it.prototype for it in items}),
        "relax": {"fmax": args.fmax, "max_steps": args.max_steps, "relax_cell": relax_settings.relax_cell},
        "chunk_size": args.chunk_size,
        "max_in_flight_per_worker": args.max_in_flight,
        "potential": "chgnet",
        "timing": TIMING_NOTE,
        "modes": modes,
        "ratios": {
            "pipeline_1worker/ase_loop": round(ratio1, 3),
            "pipeline_2workers/ase_loop": round(ratio2, 3),
        },
        "goals": {
            "pipeline_1worker/ase_loop": {"goal": GOAL_1WORKER, "met": ratio1 >= GOAL_1WORKER},
            "pipeline_2workers/ase_loop": {"goal": GOAL_2WORKERS, "met": ratio2 >= GOAL_2WORKERS},
        },
        "energy_check": {  # null: an energy is missing or not finite in one of the runs
            "max_abs_dE_ev_per_atom_1worker_vs_ase": None if math.isnan(de1) else de1,
            "max_abs_dE_ev_per_atom_2workers_vs_ase": None if math.isnan(de2) else de2,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
    }
    return out


def report(out: dict[str, Any]) -> None:
    n, modes = out["n_structures"], out["modes"]
    de1, de2 = (math.nan if v is None else v for v in out["energy_check"].values())
    fmax, chunk, in_flight = out["relax"]["fmax"], out["chunk_size"], out["max_in_flight_per_worker"]
    print(f"\nscreen overhead: {n} structures ({', '.join(out['prototypes'])}), CHGNet, fmax={fmax} eV/Å")
    print(f"chunk_size={chunk}, max_in_flight_per_worker={in_flight}")
    print(f"timing: {TIMING_NOTE}\n")
    print(
        f"{'mode':20s} {'seconds':>9s} {'struct/s':>9s} {'ok':>4s} {'failed':>6s} {'relax s':>8s} {'util':>5s}"
        "   untimed setup (s)"
    )
    for m in modes:
        print(
            f"{m['mode']:20s} {m['seconds']:9.2f} {m['structures_per_s']:9.3f} {m['n_ok']:4d} {m['n_failed']:6d}"
            f" {m['relax_seconds_sum']:8.2f} {m['worker_utilisation']:5.2f}   {m['setup_seconds_untimed']:.1f}"
        )
    print("(relax s: time inside relax_structure summed over structures; util: relax s / (workers x seconds))")
    print()
    for key, goal in out["goals"].items():
        print(f"{key:28s} {out['ratios'][key]:6.3f}   goal >= {goal['goal']}: {'met' if goal['met'] else 'NOT met'}")
    print(f"\nmax |dE| (eV/atom): 1 worker vs ASE loop {de1:.2e}, 2 workers vs ASE loop {de2:.2e}")
    machine = out["machine"]
    print(
        f"load average before {machine['load_average_before']}, after {machine['load_average_after']} "
        f"({machine['cpus']} CPUs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="number of structures (default 40)")
    parser.add_argument("--chunk-size", type=int, default=2, help="pipeline chunk size (default 2, as RaySettings)")
    parser.add_argument("--max-in-flight", type=int, default=2, help="chunks in flight per worker (default 2)")
    parser.add_argument("--fmax", type=float, default=0.05, help="relax.fmax, eV/Å (default 0.05)")
    parser.add_argument("--max-steps", type=int, default=300, help="relax.max_steps (default 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):  # library banners (CHGNet) go to stderr; stdout is the report
        out = measure(args)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
