"""`make demo` measured: the quickstart screen (CHGNet, 2 local Ray workers) from a fresh output folder, timed
end to end as a user runs it (one CLI process: Ray start, potential load, relaxations, stability, results.csv,
MLflow log), then what it found on the signed MP2020-scale hull, read back from its results.csv.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quickstart_demo.py --out /tmp/demo_run \
        --save benchmarks/results/quickstart_demo.json [--keep-csv benchmarks/results/quickstart_results.csv]

``--save`` writes the summary (wall time, status counts, hull counts, the rows below the known hull, the command,
the commit and the machine's load); ``--keep-csv`` copies the screen's results.csv beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pipelines.tracking import git_commit, git_modified_files

REPO = Path(__file__).resolve().parents[1]


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def summarise(results_csv: Path, thresholds=(0.1, 0.05)) -> dict:
    """Counts a scientist reads off a screen: status, candidates within each threshold of the hull (signed
    E_hull <= t), and those below every known phase (E_hull < 0), sorted from the lowest."""
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    status = Counter(r["status"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok" and not math.isnan(_float(r.get("e_above_hull")))]
    hull = {r["id"]: _float(r["e_above_hull"]) for r in ok}
    below = sorted(
        (
            {"id": r["id"], "formula": r["formula"], "e_above_hull": round(hull[r["id"]], 4)}
            for r in ok
            if hull[r["id"]] < 0
        ),
        key=lambda d: d["e_above_hull"],
    )
    return {
        "candidates": len(rows),
        "status": dict(status),
        "with_e_above_hull": len(ok),
        "within": {str(t): sum(1 for v in hull.values() if v <= t) for t in thresholds},
        "below_known_hull": below,
        "lowest_e_above_hull": min(hull.values()) if hull else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="/tmp/demo_run", help="output folder (removed first: the run starts fresh)")
    ap.add_argument("--save", help="write the summary JSON here")
    ap.add_argument("--keep-csv", help="copy the screen's results.csv here")
    args = ap.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cli = Path(sys.executable).with_name("semidisc")
    cmd = [str(cli), "screen", args.config, "--out", str(out), "--no-progress"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the screen failed (exit {proc.returncode}); its output is above")
    summary = summarise(out / "results.csv")
    record = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), *sys.argv]),
        "screen_command": " ".join(cmd[1:]),
        "commit": git_commit(),
        "worktree_modified": git_modified_files(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall_seconds": round(wall, 1),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **summary,
    }
    print(f"{summary['candidates']} candidates in {wall:.0f} s; status {summary['status']}")
    print(
        f"within 0.1 / 0.05 eV/atom of the hull: {summary['within']['0.1']} / {summary['within']['0.05']}; "
        f"below every known phase: {len(summary['below_known_hull'])}"
    )
    for row in summary["below_known_hull"]:
        print(f"  {row['formula']:<10} {row['id']:<28} {row['e_above_hull']:+.4f} eV/atom")
    if args.save:
        Path(args.save).write_text(json.dumps(record, indent=2) + "\n")
    if args.keep_csv:
        shutil.copyfile(out / "results.csv", args.keep_csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
