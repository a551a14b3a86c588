"""The performance record: one table of ratios, all measured in one run on this machine (CPU).

Rows (goal in brackets):

  batched/ase_loop  tiny MACE   batched (torch-sim) vs ASE-loop relaxation, same model, same 64 small cells,
                                atoms·FIRE-steps per second (>= 2)                  -> benchmarks/relax_throughput.py
  batched/ase_loop  CHGNet      the same with CHGNet (>= 2)
  ray 2 vs 1 worker             the screen pipeline with 2 Ray workers vs 1, 40 structures, CHGNet,
                                structures per second (>= 1.7)                      -> benchmarks/screen_overhead.py
  pipeline/bare loop            the pipeline with 1 worker vs a bare ASE loop in one process, same structures
                                (>= 0.9)                                            -> benchmarks/screen_overhead.py
  peak RSS 2,000/200            peak resident memory of the driver process of a real screen
                                (``pipelines.screen.run_screen``, EMT, 2 workers) of 2,000 vs 200 candidates
                                (<= 1.2: flat in the number of candidates; results stream into SQLite chunk by
                                chunk, the driver never holds the relaxed structures)
  stability, 10,000/1,000       formation energies -> signed hull distances for 10,000 candidates over 1,000
                                chemical systems, candidates per second (>= 500), with the largest difference
                                from the previous (full-scan) method on 100 systems -> benchmarks/hull_scale.py
  peak RSS 100,000/1,000        driver peak RSS of a screen of 100,000 generated candidates vs one of 1,000
                                (<= 1.2), same settings (EMT, 3 FIRE steps, chunks of 250, stopped half-way
                                and resumed)                                        -> benchmarks/screen_scale.py
  throughput, 100,000           candidates/s stored in the last tenth of the screen over the first tenth (>= 0.8:
                                steady from the first chunk to the last)
  stability in the 100k screen  the screen's stability step (``compute_stability``: batches read from SQLite,
                                E_form, both hull distances, written back), candidates per second (>= 500)

The 100,000-candidate rows take ~30-60 minutes on 2 busy cores, so they are NOT rerun here: they read the JSON
that ``benchmarks/screen_scale.py --save`` wrote (``--scale-large`` and ``--scale-small``, default
``benchmarks/results/screen_scale_100k.json`` and ``screen_scale_1k.json``), and say so in their detail column;
the JSON holds the command that measured them. Rerun them with::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/screen_scale.py --n 1000 --chunk 250 \
        --save benchmarks/results/screen_scale_1k.json
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/screen_scale.py --n 100000 --chunk 250 \
        --save benchmarks/results/screen_scale_100k.json

The memory screens run in child processes (a fresh driver each, peak RSS = VmHWM of that child; Ray
workers are other processes and not counted). Their candidates are 2- and 4-atom ordered alloys of EMT's metals
written as extxyz files (``--structures``), ``relax.max_steps`` 5 to keep them cheap (memory, not physics, is
measured); EMT has energy convention ``self`` (elemental references relaxed with EMT).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf_record.py [--small] [--json FILE]
    # --small: 16 cells, 10 structures, 50 vs 500 candidates (a smoke run, ~3 min; ratios are noisier)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EMT_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
MEMORY_MAX_STEPS = 5


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_alloys(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` ordered binary alloys (B2 2-atom and L1_2 4-atom cells of EMT metals, random lattice constants) as
    extxyz files."""
    import numpy as np
    from ase import Atoms
    from ase.io import write

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b = rng.choice(EMT_METALS, size=2, replace=False)
        if i % 2:
            lat = rng.uniform(2.9, 3.3)
            atoms = Atoms([a, b], scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[lat] * 3, pbc=True)
        else:
            lat = rng.uniform(3.6, 4.1)
            frac = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
            atoms = Atoms([a, b, b, b], scaled_positions=frac, cell=[lat] * 3, pbc=True)
        write(folder / f"alloy{i:05d}.extxyz", atoms, format="extxyz")


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM (Linux; unlike ``ru_maxrss`` it does not carry over the
    parent's memory through fork+exec), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n: int, workdir: Path) -> dict[str, Any]:
    """Run one real EMT screen of ``n`` candidates in this (fresh) process; report its peak RSS."""
    from pipelines.config import parse_config
    from pipelines.screen import run_screen

    structures = workdir / "structures"
    write_alloys(structures, n)
    rss_before = _peak_rss_mb()
    config = parse_config(
        {
            "name": f"memory-{n}",
            "potential": {"name": "emt"},
            "relax": {"fmax": 0.05, "max_steps": MEMORY_MAX_STEPS},
            "ray": {"num_cpus": 2, "num_workers": 2, "chunk_size": 20, "max_in_flight_per_worker": 2},
            "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "perf-record-memory"},
        }
    )
    start = time.perf_counter()
    summary = run_screen(config, structures=str(structures), out_dir=workdir / "out", progress=False)
    seconds = time.perf_counter() - start
    rows = sqlite3.connect(workdir / "out" / "results.sqlite").execute("SELECT COUNT(*) FROM results").fetchone()[0]
    return {
        "candidates": n,
        "n_ok": summary.n_ok,
        "rows_in_sqlite": rows,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_before_screen_mb": round(rss_before, 1),  # imports and input files written
    }


def run_memory(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="perf-mem-") as tmp:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n), tmp], capture_output=True, text=True, timeout=1800
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory screen of {n} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def scale_rows(small: dict[str, Any] | None, large: dict[str, Any] | None) -> list[tuple]:
    """The screen-at-scale rows from the saved JSON of ``benchmarks/screen_scale.py`` (not rerun here)."""
    if not large:
        return []
    n = f"{large['n']:,}"
    saved = f"saved: {large.get('command', 'benchmarks/screen_scale.py')}"
    rows = []
    if small:
        rows.append(
            (
                f"driver peak RSS, {n}/{small['n']:,} candidates",
                round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "<=",
                1.2,
                f"{small['peak_rss_mb']:.0f} MB vs {large['peak_rss_mb']:.0f} MB, resume ok: {large['resume_ok']} "
                f"({saved})",
            )
        )
    steady = large.get("store_throughput") or {}
    if steady:
        rows.append(
            (
                f"throughput last/first tenth, {n}",
                steady["last/first"],
                ">=",
                0.8,
                f"{steady['first_tenth_candidates_per_s']} -> {steady['last_tenth_candidates_per_s']} candidates/s "
                f"stored ({saved})",
            )
        )
    phases = large.get("phases_candidates_per_s") or {}
    if "stability" in phases:
        rows.append(
            (
                f"stability candidates/s, {n}-candidate screen",
                phases["stability"],
                ">=",
                500.0,
                f"compute_stability over the screen's SQLite store ({saved})",
            )
        )
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    throughput = _load("relax_throughput")
    overhead = _load("screen_overhead")
    hull = _load("hull_scale")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    out: dict[str, Any] = {"sizes": vars(args).copy()}
    log(f"batched vs ASE loop, tiny MACE, {args.cells} cells ...")
    out["mace"] = throughput.measure("mace", "cpu", args.cells)
    log(f"batched vs ASE loop, CHGNet, {args.cells} cells ...")
    out["chgnet"] = throughput.measure("chgnet", "cpu", args.cells)
    log(f"Ray pipeline (1 and 2 workers) vs bare loop, {args.structures} structures ...")
    out["pipeline"] = overhead.measure(
        argparse.Namespace(n=args.structures, chunk_size=2, max_in_flight=2, fmax=0.05, max_steps=300)
    )
    log(f"driver peak RSS, EMT screens of {args.memory_small} and {args.memory_large} candidates ...")
    out["memory_small"] = run_memory(args.memory_small)
    out["memory_large"] = run_memory(args.memory_large)
    log(f"stability step, {args.hull_systems * 10} candidates over {args.hull_systems} chemical systems ...")
    out["stability"] = hull.measure(args.hull_systems, 10, max(1, args.hull_systems // 10))
    out["scale"] = {"small": _read_json(args.scale_small), "large": _read_json(args.scale_large)}
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    modes = {m["mode"]: m for m in out["pipeline"]["modes"]}
    rows = [
        (
            f"batched/ase_loop, tiny MACE, {args.cells} cells",
            out["mace"]["speedup_atom_steps_per_s"],
            ">=",
            2.0,
            f"{out['mace']['ase_loop']['atom_steps_per_s']:.0f} -> {out['mace']['batched']['atom_steps_per_s']:.0f}"
            f" atom·steps/s, max|dE| {out['mace']['max_abs_dE_ev_per_atom']:.1e} eV/atom",
        ),
        (
            f"batched/ase_loop, CHGNet, {args.cells} cells",
            out["chgnet"]["speedup_atom_steps_per_s"],
            ">=",
            2.0,
            f"{out['chgnet']['ase_loop']['atom_steps_per_s']:.0f} -> {out['chgnet']['batched']['atom_steps_per_s']:.0f}"
            f" atom·steps/s, max|dE| {out['chgnet']['max_abs_dE_ev_per_atom']:.1e} eV/atom",
        ),
        (
            f"ray 2 workers/1 worker, {args.structures} structures",
            round(modes["pipeline_1worker"]["seconds"] / modes["pipeline_2workers"]["seconds"], 3),
            ">=",
            1.7,
            f"{modes['pipeline_1worker']['structures_per_s']:.3f} -> "
            f"{modes['pipeline_2workers']['structures_per_s']:.3f} structures/s (CHGNet)",
        ),
        (
            f"pipeline 1 worker/bare loop, {args.structures} structures",
            out["pipeline"]["ratios"]["pipeline_1worker/ase_loop"],
            ">=",
            0.9,
            f"{modes['ase_loop']['structures_per_s']:.3f} vs {modes['pipeline_1worker']['structures_per_s']:.3f}"
            " structures/s",
        ),
        (
            f"driver peak RSS, {args.memory_large}/{args.memory_small} candidates",
            round(out["memory_large"]["peak_rss_mb"] / out["memory_small"]["peak_rss_mb"], 3),
            "<=",
            1.2,
            f"{out['memory_small']['peak_rss_mb']:.0f} MB vs {out['memory_large']['peak_rss_mb']:.0f} MB "
            f"({out['memory_large']['peak_rss_before_screen_mb']:.0f} MB before the screen); "
            f"{out['memory_large']['rows_in_sqlite']} rows in SQLite",
        ),
        (
            f"stability candidates/s, {out['stability']['candidates']} over {out['stability']['systems']} systems",
            out["stability"]["candidates_per_s"],
            ">=",
            500.0,
            f"previous method {out['stability']['previous_method_candidates_per_s']:.0f}/s; largest difference "
            f"{out['stability']['max_abs_difference_screen_hull']:.0e} eV/atom",
        ),
    ]
    rows += scale_rows(out["scale"]["small"], out["scale"]["large"])
    out["table"] = [
        {"row": r, "ratio": v, "goal": f"{op} {g}", "met": (v >= g) if op == ">=" else (v <= g), "detail": d}
        for r, v, op, g, d in rows
    ]
    return out


def report(out: dict[str, Any]) -> None:
    print(f"\nperformance record (CPU, {out['machine']['cpus']} cores, 1 torch thread per process)\n")
    print(f"{'measurement':46s} {'ratio':>7s} {'goal':>7s}  {'met':4s} detail")
    for row in out["table"]:
        met = "yes" if row["met"] else "NO"
        print(f"{row['row']:46s} {row['ratio']:7.2f} {row['goal']:>7s}  {met:4s} {row['detail']}")
    print(
        f"\nload average after: {out['machine']['load_average_after']} (other processes on the machine slow all rows)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="shrink every size (smoke run)")
    parser.add_argument("--cells", type=int, default=None, help="cells for the batched rows (default 64)")
    parser.add_argument("--structures", type=int, default=None, help="structures for the Ray rows (default 40)")
    parser.add_argument("--memory-small", type=int, default=None, help="candidates, small screen (default 200)")
    parser.add_argument("--memory-large", type=int, default=None, help="candidates, large screen (default 2000)")
    parser.add_argument("--hull-systems", type=int, default=None, help="chemical systems, stability row (default 1000)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full record as JSON here")
    parser.add_argument(
        "--scale-large",
        type=Path,
        default=HERE / "results" / "screen_scale_100k.json",
        help="saved benchmarks/screen_scale.py JSON of the 100,000-candidate screen (read, not rerun)",
    )
    parser.add_argument(
        "--scale-small",
        type=Path,
        default=HERE / "results" / "screen_scale_1k.json",
        help="saved benchmarks/screen_scale.py JSON of the 1,000-candidate screen it is compared with",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    if args.memory_child:
        with contextlib.redirect_stdout(sys.stderr):
            result = memory_child(int(args.memory_child[0]), Path(args.memory_child[1]))
        print(json.dumps(result))
        return 0
    defaults = (16, 10, 50, 500, 100) if args.small else (64, 40, 200, 2000, 1000)
    names = ("cells", "structures", "memory_small", "memory_large", "hull_systems")
    for name, value in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    sizes = argparse.Namespace(
        **{k: getattr(args, k) for k in names}, scale_small=str(args.scale_small), scale_large=str(args.scale_large)
    )
    with contextlib.redirect_stdout(sys.stderr):
        out = measure(sizes)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
