"""BO vs random search on the Emery 2017 ABO3 perovskites (4,914 DFT-labelled; formula features only).

A hit: e_hull <= 0.05 eV/atom and 1.0 <= PBE gap <= 2.0 eV (73 hits, 1.5%). Reports, per method, the median
number of evaluations to find K=10 hits (q=5, n_init=10) and the acceleration factor random / method, and saves
the hits-vs-evaluations trace plot. Same code path as ``semidisc bo-benchmark``. Defaults: 50 seeds (a 10-seed
median is too noisy to rank methods), bo-hit with a random-forest surrogate on ``sites`` features (composition
statistics + the element at each written site) plus the oxidation-state features; ``--surrogate gp
--no-oxidation`` is the GP set-up (site elements through a categorical kernel).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bo_perovskites.py [--seeds 50] [--first-seed 0] [--json]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

from materials.bo.optimize import WindowObjective  # noqa: E402
from pipelines.bo_benchmark import format_report, load_labelled_pool, report_json, run_benchmark, trace_plot  # noqa: E402

POOL = Path(__file__).resolve().parents[1] / "materials" / "data" / "emery2017_abo3_perovskites.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="campaigns per method (10 are too few to rank)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--n-init", type=int, default=10)
    parser.add_argument("--methods", default="bo-hit,random")
    parser.add_argument("--budget", type=int, default=600, help="evaluations at most per BO run")
    parser.add_argument("--plot", default="benchmarks/bo_perovskites_trace.png")
    parser.add_argument("--features", default="sites", choices=["composition", "ordered", "both", "sites"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="also write the JSON report to this file")
    parser.add_argument("--gap-model", action="store_true", help="add the band-gap model's predictions as features")
    parser.add_argument(
        "--oxidation", action=argparse.BooleanOptionalAction, default=True, help="add the oxidation-state features"
    )
    parser.add_argument("--surrogate", default="forest", choices=["gp", "forest"], help="bo-hit surrogate")
    args = parser.parse_args()
    objective = WindowObjective(target="gap pbe", low=1.0, high=2.0, stable="e_hull", stable_max=0.05)
    pool = load_labelled_pool(POOL, "formula", ["gap pbe", "e_hull"], args.features, args.gap_model, args.oxidation)
    report = run_benchmark(
        pool,
        objective,
        methods=args.methods.split(","),
        hits=args.hits,
        seeds=args.seeds,
        q=args.batch,
        n_init=args.n_init,
        budget=args.budget,
        settings=pool.acquisition_settings(args.surrogate),
        first_seed=args.first_seed,
    )
    trace_plot(report, args.plot)
    print(report_json(report) if args.json else format_report(report))
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(report_json(report) + "\n")
        print(f"JSON report: {args.save}")
    print(f"trace plot: {args.plot}")


if __name__ == "__main__":
    main()
