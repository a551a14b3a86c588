"""The screen at scale: driver memory, per-phase throughput and resume for N generated candidates (1k .. 100k).

Candidates come from a simple seeded generator here (:func:`generate`), not from the project's enumerator:
``materials.structures.candidates.enumerate_candidates`` produces charge-balanced decorations of a few prototypes (with
StructureMatcher dedup), a few thousand at most for any sensible element lists, never 100,000. The generator
draws small cells of EMT's elements (Al Cu Ag Au Ni Pd Pt H C N O): 4-atom fcc-based cubic cells with 1-3
metals on the sites (A4, A3B, A2B2, A2BC ...), 2-atom B2 cells, and 2-atom rocksalt cells of a metal and H/C/N/O,
random lattice constants. Each is written as a pymatgen JSON file; the screen reads the folder
(``run_screen(structures=DIR)``), as a user's screen of their own files does.

What is measured, each phase separately (candidates/s):

  generation   the generator building pymatgen Structures, and writing them as files (two numbers)
  checks       ``materials.structures.inputs.check_structure`` on every candidate (in this process; in a screen the
               Ray workers run it on each chunk before relaxing)
  dispatch     a real screen (``pipelines.screen.run_screen``: EMT, ``--steps`` FIRE steps, 2 Ray workers,
               ``--chunk`` structures per chunk): candidates/s from the first dispatch to the last result, and
               per chunk (first and last tenth of the chunks compared: steady throughput)
  writing      the driver's time storing each chunk (SQLite) and writing its relaxed structures as CIF files
  stability    E_form, signed E_hull and the screen hull's E_hull for every stored candidate
  csv          results.csv written with the band-gap columns

The screen runs in a child process (a fresh driver; its peak RSS is VmHWM of that child; Ray workers are other
processes and not counted). With ``--resume-at F`` (default 0.5) the first child is stopped with SIGTERM once a
fraction F of the candidates is stored and a second child resumes it to the end: the record then holds both
drivers' peak RSS, and the resumed run must relax exactly the candidates not stored before.

EMT's energies have no relation to MP's (convention ``self``: elemental references relaxed with EMT), and 3-5
FIRE steps relax nothing: the physics is not what is measured, the pipeline is. Positions only by default
(``--relax-cell`` adds ASE's Frechet cell filter, whose matrix logarithms cost ~10x the CPU of EMT itself here).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/screen_scale.py --n 1000 \
        --save benchmarks/results/screen_scale_1k.json
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/screen_scale.py --n 100000 --chunk 250 \
        --save benchmarks/results/screen_scale_100k.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
LIGHT = ("H", "C", "N", "O")
FCC = ((0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5))


def generate(n: int, seed: int = 0) -> Iterator[tuple[str, Any]]:
    """``n`` seeded small cells of EMT elements as ``(id, pymatgen Structure)``, lazily (see the docstring)."""
    import numpy as np
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:  # fcc-based 4-atom cubic cell, 1-3 metals on its sites
            k = int(rng.integers(1, 4))
            pool = list(rng.choice(METALS, size=k, replace=False))
            species = [pool[j % k] for j in range(4)] if k > 1 else pool * 4
            species = [species[j] for j in rng.permutation(4)] if k == 3 else species
            if k > 1 and rng.random() < 0.5:
                species = [pool[0]] + [pool[int(rng.integers(0, k))] for _ in range(3)]
            structure = Structure(Lattice.cubic(rng.uniform(3.6, 4.2)), species, FCC)
        elif kind < 0.85:  # B2
            a, b = rng.choice(METALS, size=2, replace=False)
            structure = Structure(Lattice.cubic(rng.uniform(2.9, 3.3)), [a, b], [(0, 0, 0), (0.5, 0.5, 0.5)])
        else:  # rocksalt, primitive fcc cell of a metal and H/C/N/O
            a = rng.uniform(4.0, 4.6)
            lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
            structure = Structure(
                lattice, [str(rng.choice(METALS)), str(rng.choice(LIGHT))], [(0, 0, 0), (0.5, 0.5, 0.5)]
            )
        yield f"gen{i:06d}", structure


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM (Linux), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_inputs(n: int, folder: Path, seed: int) -> dict[str, Any]:
    """Write the candidates as pymatgen JSON files; time building and writing separately."""
    folder.mkdir(parents=True, exist_ok=True)
    build = write = 0.0
    it = generate(n, seed)
    while True:
        t0 = time.perf_counter()
        try:
            item_id, structure = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        (folder / f"{item_id}.json").write_text(json.dumps(structure.as_dict()))
        write += time.perf_counter() - t1
        build += t1 - t0
    return {
        "candidates": n,
        "build_seconds": round(build, 2),
        "build_candidates_per_s": round(n / build, 1),
        "write_files_seconds": round(write, 2),
        "write_files_candidates_per_s": round(n / write, 1),
    }


def measure_checks(n: int, seed: int) -> dict[str, Any]:
    from ase.calculators.emt import EMT  # noqa: F401  (EMT's element set, as the workers check it)

    from materials.potentials.calculators import EMT_ELEMENTS
    from materials.structures.inputs import CheckSettings, StructureCheckError, check_structure

    settings = CheckSettings()
    seconds, failed = 0.0, 0
    for item_id, structure in generate(n, seed):
        t0 = time.perf_counter()
        try:
            check_structure(structure, settings, EMT_ELEMENTS, name=item_id)
        except StructureCheckError:
            failed += 1
        seconds += time.perf_counter() - t0
    return {
        "candidates": n,
        "seconds": round(seconds, 2),
        "candidates_per_s": round(n / seconds, 1),
        "rejected": failed,
    }


def screen_child(args: argparse.Namespace) -> dict[str, Any]:
    """One real EMT screen of the folder ``args.child_dir/structures`` in this (fresh) process."""
    from pipelines.config import parse_config
    from pipelines.interrupts import install_sigterm_handler
    from pipelines.screen import run_screen

    install_sigterm_handler()
    workdir = Path(args.child_dir)
    rss_before = _peak_rss_mb()
    config = parse_config(
        {
            "name": f"screen-scale-{args.n}",
            "potential": {"name": "emt"},
            "relax": {"fmax": 0.05, "max_steps": args.steps, "relax_cell": args.relax_cell},
            "ray": {"num_cpus": 2, "num_workers": 2, "chunk_size": args.chunk, "max_in_flight_per_worker": 2},
            "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "screen-scale"},
        }
    )
    start = time.perf_counter()
    out: dict[str, Any] = {"resume": args.child_resume}
    try:
        summary = run_screen(
            config,
            structures=str(workdir / "structures"),
            out_dir=workdir / "out",
            resume=args.child_resume,
            progress=False,
        )
    except KeyboardInterrupt:
        out.update(interrupted=True)
    else:
        out.update(
            interrupted=False,
            n_items=summary.n_items,
            n_ok=summary.n_ok,
            n_failed=summary.n_failed,
            n_new_this_run=summary.n_new_this_run,
            n_stable=summary.n_stable,
            n_below_known_hull=len(summary.below_hull),
            n_warnings=summary.n_warnings,
            timings=getattr(summary, "timings", None),
        )
    out.update(
        seconds=round(time.perf_counter() - start, 1),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        rss_end_mb=round(_rss_mb(), 1),
        peak_rss_before_screen_mb=round(rss_before, 1),
    )
    return out


def _stored(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return int(con.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


def run_child(args: argparse.Namespace, workdir: Path, resume: bool, stop_at: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--n", str(args.n), "--steps", str(args.steps), "--chunk", str(args.chunk)]
    cmd += ["--relax-cell"] if args.relax_cell else []
    cmd += ["--child-dir", str(workdir)] + (["--child-resume"] if resume else [])
    log = (workdir / f"child-{'resume' if resume else 'first'}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    stopped_at = None
    db = workdir / "out" / "results.sqlite"
    samples = []  # [wall clock s, rows stored], every second, from outside the driver
    while proc.poll() is None:
        time.sleep(1.0)
        count = _stored(db) if db.is_file() else 0
        samples.append([round(time.time(), 2), count])
        if stop_at is not None and count >= stop_at:
            stopped_at = count
            proc.send_signal(signal.SIGTERM)
            break
    stdout, _ = proc.communicate(timeout=4 * 3600)
    if proc.returncode != 0 and not stdout.strip():
        raise RuntimeError(f"screen child failed (rc {proc.returncode}); see {log.name}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["stored_when_stopped"] = stopped_at
    result["store_samples"] = samples
    result["stored_after"] = _stored(workdir / "out" / "results.sqlite")
    return result


def store_throughput(samples: list[list[float]], n: int) -> dict[str, Any]:
    """Candidates/s over the first and the last tenth of the screen (by rows stored, sampled every second from
    outside the driver, across the stopped and the resumed run): from the first row stored to a tenth more,
    and from nine tenths to the end."""
    samples = [s for s in samples if s[1] > 0]
    if len(samples) < 4:
        return {}
    start_t, start_n = samples[0]

    def first_at(count: float) -> list[float]:
        return next(s for s in samples if s[1] >= count)

    def last_below(count: float) -> list[float]:
        return [s for s in samples if s[1] < count][-1]

    a = first_at(start_n + n / 10)
    b = last_below(0.9 * n)
    c = first_at(n)
    if a[0] <= start_t or c[0] <= b[0]:
        return {}  # too few samples (a small screen stored in a few chunks)
    first_rate = (a[1] - start_n) / (a[0] - start_t)
    last_rate = (c[1] - b[1]) / (c[0] - b[0])
    return {
        "first_tenth_candidates_per_s": round(first_rate, 1),
        "last_tenth_candidates_per_s": round(last_rate, 1),
        "last/first": round(last_rate / first_rate, 3),
    }


def chunk_throughput(chunks: list[list[float]]) -> dict[str, Any]:
    """``chunks``: [seconds since dispatch start, items finished] per finished chunk -> candidates/s over the
    first and the last tenth of the chunks (at least 2 chunks each)."""
    if len(chunks) < 8:
        return {}
    k = max(4, len(chunks) // 10)
    first = chunks[:k]
    last = chunks[-k:]
    first_rate = sum(c[1] for c in first[1:]) / (first[-1][0] - first[0][0])
    last_rate = sum(c[1] for c in last[1:]) / (last[-1][0] - last[0][0])
    return {
        "candidates_per_s": round(sum(c[1] for c in chunks[1:]) / (chunks[-1][0] - chunks[0][0]), 1),
        "chunks": len(chunks),
        "window_chunks": k,
        "first_candidates_per_s": round(first_rate, 1),
        "last_candidates_per_s": round(last_rate, 1),
        "last/first": round(last_rate / first_rate, 3),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    out: dict[str, Any] = {
        "n": args.n,
        "steps": args.steps,
        "relax_cell": args.relax_cell,
        "chunk": args.chunk,
        "seed": args.seed,
        "command": "benchmarks/screen_scale.py " + " ".join(sys.argv[1:]),
    }
    tmp = Path(tempfile.mkdtemp(prefix="screen-scale-", dir=args.tmp))
    try:
        log(f"generating {args.n} candidates ...")
        out["generation"] = write_inputs(args.n, tmp / "structures", args.seed)
        log("checks ...")
        out["checks"] = measure_checks(args.n, args.seed)
        stop_at = int(args.n * args.resume_at) if args.resume_at else None
        log(f"screen (stop at {stop_at} stored)" if stop_at else "screen ...")
        runs = [run_child(args, tmp, resume=False, stop_at=stop_at)]
        if stop_at:
            log(f"stopped with {runs[0]['stored_after']} stored; resuming ...")
            runs.append(run_child(args, tmp, resume=True, stop_at=None))
        out["runs"] = runs
        final = runs[-1]
        timings = final.get("timings") or {}
        chunks = [c for run in runs for c in ((run.get("timings") or {}).get("chunks") or [])]
        out["resume_ok"] = (
            not stop_at or final.get("n_new_this_run") == args.n - runs[0]["stored_after"]
        ) and final.get("n_items") == args.n
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        n_final = final.get("n_new_this_run") or 0
        phases = {
            "generation (build structures)": out["generation"]["build_candidates_per_s"],
            "generation (write files)": out["generation"]["write_files_candidates_per_s"],
            "checks": out["checks"]["candidates_per_s"],
        }
        if timings:
            steady = chunk_throughput(timings.get("chunks") or [])
            phases["reading inputs (driver)"] = round(n_final / max(timings["read_seconds"], 1e-9), 1)
            if steady:
                phases["relaxation dispatch, steady"] = steady["candidates_per_s"]
            phases["relaxation dispatch, incl. actor start"] = round(n_final / timings["dispatch_seconds"], 1)
            phases["writing (SQLite + CIF files)"] = round(n_final / max(timings["write_seconds"], 1e-9), 1)
            phases["stability"] = round(args.n / max(timings["stability_seconds"], 1e-9), 1)
            csv_only = timings["csv_seconds"] - timings.get("gap_prediction_seconds", 0.0)
            phases["results.csv (writing)"] = round(args.n / max(csv_only, 1e-9), 1)
            phases["results.csv (band-gap model, per distinct formula)"] = round(
                args.n / max(timings.get("gap_prediction_seconds", 0.0), 1e-9), 1
            )
        out["phases_candidates_per_s"] = phases
        out["timings"] = {k: v for k, v in timings.items() if k != "chunks"}
        out["chunk_throughput"] = chunk_throughput(timings.get("chunks") or [])
        out["chunk_throughput_first_run"] = chunk_throughput((runs[0].get("timings") or {}).get("chunks") or [])
        out["chunk_samples"] = chunks[:: max(1, len(chunks) // 50)]
        out["store_throughput"] = store_throughput([s for run in runs for s in run["store_samples"]], args.n)
        for run in runs:
            run["store_samples"] = run["store_samples"][:: max(1, len(run["store_samples"]) // 100)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    return out


def report(out: dict[str, Any]) -> None:
    print(f"\nscreen of {out['n']} generated candidates (EMT, {out['steps']} FIRE steps, chunks of {out['chunk']})")
    for i, run in enumerate(out["runs"]):
        what = "resumed" if run["resume"] else ("stopped" if run.get("interrupted") else "full")
        print(
            f"  run {i + 1} ({what}): {run['seconds']} s, driver peak RSS {run['peak_rss_mb']:.0f} MB "
            f"({run['peak_rss_before_screen_mb']:.0f} MB before the screen), stored after: {run['stored_after']}"
        )
    print(f"  resume relaxed exactly the rest: {out['resume_ok']}")
    print(f"\n{'phase':52s} {'candidates/s':>12s}")
    for name, value in out["phases_candidates_per_s"].items():
        print(f"{name:52s} {value if value is not None else float('nan'):12.1f}")
    ct = out.get("chunk_throughput") or {}
    if ct:
        print(
            f"\nchunk throughput (last run, {ct['chunks']} chunks, windows of {ct['window_chunks']}): first "
            f"{ct['first_candidates_per_s']}/s, last {ct['last_candidates_per_s']}/s (last/first {ct['last/first']})"
        )
    st = out.get("store_throughput") or {}
    if st:
        print(
            f"rows stored per second, whole screen (both runs): first tenth {st['first_tenth_candidates_per_s']}/s, "
            f"last tenth {st['last_tenth_candidates_per_s']}/s (last/first {st['last/first']})"
        )
    print(f"load average after: {out['machine']['load_average_after']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="candidates (default 1000)")
    parser.add_argument("--steps", type=int, default=3, help="FIRE steps per relaxation (default 3)")
    parser.add_argument("--chunk", type=int, default=100, help="structures per Ray chunk (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relax-cell", action="store_true", help="relax cells too (ASE's Frechet filter: ~10x the CPU per EMT step)"
    )
    parser.add_argument("--resume-at", type=float, default=0.5, help="stop at this stored fraction, resume (0: no)")
    parser.add_argument("--tmp", default=None, help="folder for the inputs and the screen (default: system tmp)")
    parser.add_argument("--save", type=Path, default=None, help="write the record as JSON here")
    parser.add_argument("--child-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.child_dir:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            result = screen_child(args)
        print(json.dumps(result))
        return 0
    out = measure(args)
    report(out)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
