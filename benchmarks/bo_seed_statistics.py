"""Statistics over the campaigns of saved ``bo_perovskites.py --save`` reports (one method's runs pooled).

Prints the median evaluations to K hits over all runs, its bootstrap 90 % interval, the acceleration factor
against the reports' analytic random-search expectation, the spread of 10-run medians drawn from the runs, and,
with ``--versus``, paired wins and losses against another set of reports over the seeds both hold.

    .venv/bin/python benchmarks/bo_seed_statistics.py benchmarks/results/bo_perovskites_forest_oxidation_50seeds.json \
        benchmarks/results/bo_perovskites_forest_oxidation_seeds100-149.json \
        --versus benchmarks/results/bo_perovskites_gp_sites_50seeds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def runs_by_seed(paths: list[str], method: str) -> tuple[dict[int, float], float]:
    """Evaluations to target per seed (a run that never reached it counts as infinite) and random's expectation."""
    out: dict[int, float] = {}
    random_expected = 0.0
    for path in paths:
        report = json.loads(Path(path).read_text())
        first = int(report.get("first_seed", 0))
        evals = report["methods"][method]["evaluations_to_target"]
        out.update({first + i: (np.inf if e is None else float(e)) for i, e in enumerate(evals)})
        random_expected = float(report["random_expected"])
    return out, random_expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--versus", nargs="*", default=[], help="reports of the set-up to compare with, seed by seed")
    parser.add_argument("--method", default="bo-hit")
    parser.add_argument("--resamples", type=int, default=5000)
    args = parser.parse_args()
    runs, random_expected = runs_by_seed(args.reports, args.method)
    evals = np.array(list(runs.values()))
    rng = np.random.default_rng(0)
    boot = np.median(rng.choice(evals, size=(args.resamples, len(evals))), axis=1)
    low, high = np.percentile(boot, [5, 95])
    median = float(np.median(evals))
    print(
        f"{len(evals)} campaigns (seeds {min(runs)}..{max(runs)}): median {median:g} evaluations, "
        f"{random_expected / median:.1f}x random ({random_expected:.0f})"
    )
    print(
        f"bootstrap 90% interval of the median: {low:g}-{high:g} "
        f"({random_expected / high:.1f}-{random_expected / low:.1f}x)"
    )
    if len(evals) >= 10:
        tens = [np.median(rng.choice(evals, size=10, replace=False)) for _ in range(args.resamples)]
        p5, p50, p95 = np.percentile(tens, [5, 50, 95])
        print(f"median of 10 runs drawn from these: {p5:g} / {p50:g} / {p95:g} (5th / 50th / 95th percentile)")
    if args.versus:
        other, _ = runs_by_seed(args.versus, args.method)
        shared = sorted(set(runs) & set(other))
        wins = sum(runs[s] < other[s] for s in shared)
        losses = sum(runs[s] > other[s] for s in shared)
        print(
            f"versus {', '.join(args.versus)} on {len(shared)} shared seeds: fewer evaluations in {wins}, more in "
            f"{losses}, equal in {len(shared) - wins - losses}; their median {np.median([other[s] for s in shared]):g}"
        )


if __name__ == "__main__":
    main()
