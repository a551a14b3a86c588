"""``semidisc`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _print_summary(summary) -> None:
    print(
        f"\n{summary.n_items} items: {summary.n_ok} ok, {summary.n_failed} failed, {summary.n_stable} stable "
        f"({summary.n_new_this_run} relaxed this run, {summary.seconds:.0f} s)"
    )
    refs = summary.references
    loo = refs.get("calibration", {}).get("loo_rmse")
    print(
        f"energy scheme: {refs['scheme']} for {refs['potential']}"
        + (f" (calibration leave-one-out RMSE {loo:.3f} eV/atom)" if loo is not None else "")
    )
    if summary.top:
        print(f"\n{'id':34s} {'formula':12s} {'E_form':>8s} {'E_hull':>8s}   (eV/atom)")
        for r in summary.top:
            print(f"{r['id']:34s} {r['formula']:12s} {r['e_form_per_atom']:8.3f} {r['e_above_hull']:8.3f}")
    print(f"\nresults: {summary.out_dir / 'results.csv'}")
    if summary.mlflow_run_id:
        print(f"MLflow run: {summary.mlflow_run_id}")


def cmd_screen(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.screen import run_screen

    config = load_config(args.config)
    summary = run_screen(
        config,
        structures=args.structures,
        limit=args.limit,
        out_dir=args.out,
        resume=args.resume,
        progress=not args.no_progress,
    )
    _print_summary(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semidisc", description="Discover semiconductor materials.")
    sub = parser.add_subparsers(dest="command", required=True)
    screen = sub.add_parser("screen", help="enumerate/read structures, relax with an MLIP on Ray, rank by E_hull")
    screen.add_argument("config", help="YAML config (see configs/quickstart.yaml)")
    screen.add_argument("--structures", help="folder of CIF/POSCAR/extxyz files to screen instead of candidates")
    screen.add_argument("--limit", type=int, help="screen only the first N items")
    screen.add_argument("--out", help="output folder (default: output_dir from the config)")
    screen.add_argument("--resume", action="store_true", help="continue a screen in --out, skipping finished items")
    screen.add_argument("--no-progress", action="store_true", help="no progress bar")
    screen.set_defaults(func=cmd_screen)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    from materials.potentials import PotentialError
    from materials.structures import StructureCheckError
    from pipelines.config import ConfigError
    from pipelines.screen import ResumeError

    try:
        return args.func(args)
    except (
        ConfigError,
        ResumeError,
        PotentialError,
        StructureCheckError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"semidisc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
