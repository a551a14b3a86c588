"""``semidisc`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from materials.errors import InputError, SemidiscError


def _print_summary(summary) -> None:
    print(
        f"\n{summary.n_items} items: {summary.n_ok} ok, {summary.n_failed} failed, {summary.n_stable} stable "
        f"({summary.n_new_this_run} relaxed this run, {summary.seconds:.0f} s)"
    )
    refs = summary.references
    source = (
        "MP 2023 elemental energies" if refs["source"] == "mp-2023" else "elemental crystals relaxed with the model"
    )
    print(f"energy convention: {refs['convention']} for {refs['potential']} (references: {source})")
    if refs.get("offsets"):
        cal = refs.get("calibration", {})
        print(
            f"fitted element offsets for {len(refs['offsets'])} elements: leave-one-element-out MAE "
            f"{cal.get('mae_leave_one_element_out', float('nan')):.3f} vs plain "
            f"{cal.get('mae_plain_same_compounds', float('nan')):.3f} eV/atom"
        )
    if summary.top:
        print(f"\n{'id':34s} {'formula':12s} {'E_form':>8s} {'E_hull':>8s}   (eV/atom; E_hull signed)")
        for r in summary.top:
            print(f"{r['id']:34s} {r['formula']:12s} {r['e_form_per_atom']:8.3f} {r['e_above_hull']:8.3f}")
    if summary.below_hull:
        print(
            f"\n{len(summary.below_hull)} below the known hull by more than 0.1 eV/atom "
            "(most often a model error, sometimes a discovery; check with DFT):"
        )
        for r in summary.below_hull[:10]:
            print(f"  {r['id']:34s} {r['formula']:12s} {r['e_above_hull']:8.3f}")
    if summary.n_warnings:
        print(f"{summary.n_warnings} rows carry a warning (column 'warning' of results.csv)")
    _print_supply(summary)
    print(f"\nresults: {summary.out_dir / 'results.csv'}")
    if summary.mlflow_run_id:
        print(f"MLflow run: {summary.mlflow_run_id}")


def _print_supply(summary) -> None:
    """The stable candidates with low supply risk beside the rest (supply_risk.json, gap_vs_supply_risk.png)."""
    supply = summary.supply
    if supply is None or not supply.stable or supply.hhi_median is None:
        return
    counts = supply.as_dict()
    print(
        f"\nsupply chain: {counts['n_stable_low_supply_risk']} of {counts['n_stable']} stable candidates have low "
        f"supply risk (production HHI below the screen median {supply.hhi_median:.0f}, no toxic element); "
        f"{counts['n_stable_toxic']} contain a toxic element, {counts['n_stable_hhi_unknown']} have no HHI data"
    )
    for c in supply.low_risk[:10]:
        gap = "" if c.gap is None else f"gap {c.gap:.2f} eV"
        print(f"  {c.id:34s} {c.formula:12s} {c.e_above_hull:8.3f}  HHI {c.hhi_production:5.0f}  {gap}")
    if (summary.out_dir / "gap_vs_supply_risk.png").is_file():
        print(f"plot: {summary.out_dir / 'gap_vs_supply_risk.png'}")


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


def cmd_campaign(args: argparse.Namespace) -> int:
    from pipelines.campaign import run_campaign
    from pipelines.config import load_campaign_config

    config = load_campaign_config(args.config)
    summary = run_campaign(config, out_dir=args.out, resume=args.resume)
    print(
        f"\npool {summary.n_pool} candidates ({summary.n_skipped} skipped), {summary.n_evaluated} evaluated "
        f"in {summary.iterations} iterations, {summary.n_failed} failed, {summary.n_hits} hits "
        f"({summary.seconds:.0f} s)"
    )
    if summary.evaluations_to_target is not None:
        print(
            f"target of {config.optimizer.target_hits} hits reached after {summary.evaluations_to_target} evaluations"
        )
    for hit in summary.hits[:15]:
        values = ", ".join(f"{k}={v:.3g}" for k, v in hit.items() if isinstance(v, float))
        print(f"  hit {hit['id']:>10s} {hit['formula']:12s} {values}")
    for ft in summary.finetunes:
        if ft["status"] == "ok":
            rmse = ((ft["metrics"].get("finetuned") or {}).get("heldout") or {}).get("force_rmse")
            where = f"held-out force RMSE {1000 * rmse:.1f} meV/Å" if rmse is not None else "no held-out frames"
            model = ft["registry_uri"] or ft["model_path"]
            print(f"  fine-tune after iteration {ft['iteration']}: {model} (parent {ft['parent']}; {where})")
        else:
            print(f"  fine-tune after iteration {ft['iteration']} failed: {ft['reason']}")
    print(f"\nresults: {summary.out_dir / 'evaluations.csv'}; trace: {summary.out_dir / 'bo_trace.png'}")
    if summary.mlflow_run_id:
        print(f"MLflow run: {summary.mlflow_run_id}")
    return 0


def cmd_bo_benchmark(args: argparse.Namespace) -> int:
    import math

    from materials.bo.optimize import WindowObjective
    from pipelines.bo_benchmark import format_report, load_labelled_pool, report_json, run_benchmark, trace_plot

    if (args.stable_column is None) != (args.stable_max is None):
        raise InputError("--stable-column and --stable-max go together")
    low, high = (math.inf if v in ("inf", "+inf") else -math.inf if v == "-inf" else float(v) for v in args.window)
    objective = WindowObjective(
        target=args.target, low=low, high=high, stable=args.stable_column, stable_max=args.stable_max
    )
    columns = [args.target] + ([args.stable_column] if args.stable_column else [])
    pool = load_labelled_pool(
        args.pool, args.formula_column, columns, args.features, args.gap_model, args.oxidation, args.id_column
    )
    report = run_benchmark(
        pool,
        objective,
        methods=args.methods.split(","),
        hits=args.hits,
        seeds=args.seeds,
        q=args.batch,
        n_init=args.n_init,
        budget=args.budget,
        num_cpus=args.num_cpus,
        settings=pool.acquisition_settings(args.surrogate),
        first_seed=args.first_seed,
    )
    if args.plot:
        trace_plot(report, args.plot)
    print(report_json(report) if args.json else format_report(report))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.config import TrackingSettings
    from pipelines.validate import run_validation

    tracking = TrackingSettings(uri=args.tracking_uri, experiment="semidisc-validate", enabled=not args.no_mlflow)
    summary = run_validation(
        args.predictions,
        args.reference,
        args.property,
        out_dir=args.out,
        method=args.method,
        column=args.column,
        by=args.by,
        tracking=tracking,
        allow_fidelity_mismatch=args.allow_fidelity_mismatch,
    )
    m = summary.metrics
    print(
        f"matched {m.get('n')} predictions of {m.get('n_predictions')} rows (coverage {m.get('coverage', 0):.0%}), "
        f"{summary.n_unmatched} unmatched, {summary.n_skipped} skipped (no usable value; listed in the report)"
    )
    for line in summary.warnings[:5]:
        print(f"warning: {line}")
    if len(summary.warnings) > 5:
        print(f"warning: {len(summary.warnings) - 5} more conflicting reference formulas in the report")
    for key in ("mae", "rmse", "r2", "max_error", "mean_signed_error"):
        if isinstance(m.get(key), float):
            print(f"  {key:18s} {m[key]:.3f}")
    print(f"report: {summary.report}")
    return 0


def cmd_dft(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipelines.dft_run import load_dft_config, run_dft

    config = load_dft_config(args.config)
    if args.functional is not None:
        if not args.bandgap:
            raise InputError(f"--functional {args.functional} sets the band-gap functional: add --bandgap")
        # pbe: the Kohn-Sham gap of PBE; gllbsc: GLLB-SC (Kohn-Sham gap + discontinuity). Energies stay PBE.
        dft = {"pbe": {"xc": "PBE", "gap_functional": "ks"}, "gllbsc": {"gap_functional": "gllbsc"}}[args.functional]
        config = config.model_copy(update={"dft": replace(config.dft, **dft)})
    summary = run_dft(
        config,
        structures=args.structures,
        from_run=args.from_run,
        top=args.top,
        relax=args.relax,
        bandgap=args.bandgap,
        out_dir=args.out,
    )
    print(f"\n{summary['n_ok']}/{summary['n_items']} ok")
    print(f"{'id':28s} {'E_form':>8s} {'a (Å)':>7s} {'gap':>6s} {'gap_KS':>6s} {'Δxc':>6s} {'gap xc':8s} status")

    def num(rec: dict, key: str, fmt: str) -> str:
        value = rec.get(key)
        return format(value, fmt) if isinstance(value, float) and value == value else "-"

    for r in summary["records"]:
        # a structure whose energy is fine but whose band gap failed is ok, with the reason in its notes
        reason = r.get("failure_reason") or "; ".join(n for n in r.get("notes") or [] if n.startswith("band gap"))
        print(
            f"{r['id']:28s} {num(r, 'e_form_per_atom', '8.3f'):>8s} {num(r, 'a', '7.3f'):>7s} "
            f"{num(r, 'band_gap', '6.2f'):>6s} {num(r, 'gap_ks', '6.2f'):>6s} "
            f"{num(r, 'gap_discontinuity', '6.2f'):>6s} {r.get('gap_functional') or '-':8s} "
            f"{r['status']} {reason}"
        )
    print(f"results: {summary['out_dir'] / 'dft_results.csv'}")
    return 0


def cmd_import_dft(args: argparse.Namespace) -> int:
    from pipelines.dft_run import write_imported

    summary = write_imported(args.paths, args.out, formation=not args.no_formation)
    rows = summary["records"]
    print(f"imported {len(rows)} calculation(s), {len(summary['failures'])} failure(s) (data {summary['data_hash']})")
    print(f"{'id':28s} {'formula':10s} {'functional':10s} {'E/atom':>9s} {'E_form':>8s} {'gap':>6s}")

    def num(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, float) and value == value else "-"

    for r in rows:
        print(
            f"{r['id']:28s} {r['formula']:10s} {r['functional']:10s} {num(r['energy_per_atom'], '9.4f')} "
            f"{num(r['e_form_per_atom'], '8.3f')} {num(r['band_gap'], '6.2f')}"
        )
    for where, why in summary["failures"]:
        print(f"  failed: {where}: {why.splitlines()[0]}")
    if summary["formation_error"]:
        print(f"no formation energies: {summary['formation_error']}")
    print(f"results: {summary['out_dir'] / 'dft_results.csv'}  structures: {summary['out_dir'] / 'structures.extxyz'}")
    return 0


def cmd_train_gap(args: argparse.Namespace) -> int:
    import logging

    from pipelines.train_gap import load_bandgap_config, recalibrate, run_train_gap

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line per epoch
    config = load_bandgap_config(args.config)
    if args.recalibrate:
        m = recalibrate(config)
        print(
            f"recalibrated {config.output}: 90 % interval covers {m['expt_test_coverage90']:.0%} of held-out Zhuo, "
            f"Borlido {m['borlido_expt_coverage90']:.0%}; textbook compounds called metal "
            f"{m['textbook_called_metal']:.0f} of {m['textbook_n']:.0f}"
        )
        return 0
    result = run_train_gap(config, resume=not args.restart, only_members=args.member)
    if result["output"] is None:
        print(f"trained members {args.member} in {result['seconds']:.0f} s (kept in {config.work_dir})")
        return 0
    m = result["metrics"]
    print(f"ensemble of {config.members} written to {result['output']} ({result['seconds']:.0f} s)")
    for key in ("mp_test", "expt_test", "borlido_expt", "borlido_pbe"):
        if f"{key}_mae" in m:
            print(
                f"  {key:13s} n={m[f'{key}_n']:.0f} MAE {m[f'{key}_mae']:.3f} eV, within 1 sigma "
                f"{m[f'{key}_within_1sigma']:.0%}, 2 sigma {m[f'{key}_within_2sigma']:.0%}"
            )
    if result["mlflow_run_id"]:
        print(f"MLflow run: {result['mlflow_run_id']}")
    return 0


def cmd_predict_gap(args: argparse.Namespace) -> int:
    from pipelines.train_gap import predict_gap_csv

    counts = predict_gap_csv(args.input, args.formula_column, args.out, model_path=args.model)
    print(f"{counts['n_ok']}/{counts['n_rows']} rows predicted ({counts['n_failed']} with an error): {args.out}")
    for error in counts["errors"][:10]:
        print(f"  no prediction: {error}")
    if counts["n_failed"] > 10:
        print(f"  ... {counts['n_failed'] - 10} more (column 'error' of {args.out})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipelines.finetune_run import format_table, load_finetune_config, run_finetune

    config = load_finetune_config(args.config)
    summary = run_finetune(config, out_dir=args.out)
    print(f"\n{summary.n_train} training frames, {summary.n_heldout} held-out frames (data hash {summary.data_hash})")
    for failure in summary.failures:
        print(f"  failed: {failure}")
    print("\n" + format_table(summary.metrics, "heldout"))
    print(f"\nmodel: {summary.model_path}")
    if summary.registry_uri:
        print(f'registered: {summary.registry_uri}  (potential: {{name: mace, model: "{summary.registry_uri}"}})')
    if summary.mlflow_run_id:
        print(f"MLflow run: {summary.mlflow_run_id}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ArgumentTypeError into a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1 (leave --limit out to screen every item)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semidisc", description="Discover semiconductor materials.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    screen = sub.add_parser("screen", help="enumerate/read structures, relax with an MLIP on Ray, rank by E_hull")
    screen.add_argument("config", help="YAML config (see configs/quickstart.yaml)")
    screen.add_argument("--structures", help="folder of CIF/POSCAR/extxyz files to screen instead of candidates")
    screen.add_argument("--limit", type=_positive_int, help="screen only the first N items (N >= 1)")
    screen.add_argument("--out", help="output folder (default: output_dir from the config)")
    screen.add_argument("--resume", action="store_true", help="continue a screen in --out, skipping finished items")
    screen.add_argument("--no-progress", action="store_true", help="no progress bar")
    screen.set_defaults(func=cmd_screen)

    campaign = sub.add_parser("campaign", help="Bayesian-optimisation campaign: propose, evaluate on Ray, resume")
    campaign.add_argument("config", help="campaign YAML (see configs/campaign-perovskites.yaml)")
    campaign.add_argument("--out", help="output folder (default: output_dir from the config)")
    campaign.add_argument("--resume", action="store_true", help="continue the campaign in --out")
    campaign.set_defaults(func=cmd_campaign)

    dft = sub.add_parser("dft", help="GPAW DFT (relax, band gap, formation energy) on structures, as Ray tasks")
    dft.add_argument("--structures", help="a structure file or a folder of them")
    dft.add_argument("--from-run", help="a screen's output folder: compute its most stable candidates")
    dft.add_argument("--top", type=int, default=5, help="with --from-run: how many (lowest E_hull first)")
    dft.add_argument("--relax", action="store_true", help="relax positions and cell first")
    dft.add_argument("--bandgap", action="store_true", help="band gap (SCF + band path), PBE unless --functional")
    dft.add_argument(
        "--functional",
        choices=["pbe", "gllbsc"],
        help="band-gap functional (default: the config's dft.gap_functional, PBE): gllbsc = GLLB-SC, Kohn-Sham "
        "gap + derivative discontinuity, much closer to experiment at about PBE cost; energies stay PBE",
    )
    dft.add_argument("--config", help="YAML with a dft: section (DFTSettings), ray:, tracking:")
    dft.add_argument("--out", default="runs/dft", help="output folder (resumes: finished ids are skipped)")
    dft.set_defaults(func=cmd_dft)

    imp = sub.add_parser("import-dft", help="read existing DFT (vasprun.xml, extxyz) into dft_results.csv")
    imp.add_argument("paths", nargs="+", help="vasprun.xml(.gz), .extxyz files, or folders holding them")
    imp.add_argument("--out", default="runs/imported_dft", help="output folder")
    imp.add_argument("--no-formation", action="store_true", help="skip formation energies")
    imp.set_defaults(func=cmd_import_dft)

    val = sub.add_parser("validate", help="compare predictions with DFT/experimental/lab reference data")
    val.add_argument("--predictions", required=True, help="CSV, a screen/dft output folder, or an MLflow run id")
    val.add_argument(
        "--reference", required=True, help="borlido | zhuo | mp | lab-data CSV | vasprun.xml/extxyz/folder"
    )
    val.add_argument("--property", required=True, help="band_gap (eV) | formation_energy (eV/atom)")
    val.add_argument("--method", help="reference column, e.g. PBE or HSE06 for borlido (default: experiment)")
    val.add_argument(
        "--column",
        help="prediction column (default: e_form_per_atom; for band gaps like with like: gap_expt against "
        "experiment, gap_pbe against PBE, else band_gap)",
    )
    val.add_argument(
        "--allow-fidelity-mismatch",
        action="store_true",
        help="compare band gaps of different levels of theory (e.g. PBE predictions with experiment)",
    )
    val.add_argument("--by", default="auto", choices=["auto", "formula", "structure"])
    val.add_argument("--out", default="runs/validation", help="report folder")
    val.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    val.add_argument("--no-mlflow", action="store_true")
    val.set_defaults(func=cmd_validate)

    bench = sub.add_parser("bo-benchmark", help="BO vs random search on a labelled pool (formula features only)")
    bench.add_argument("--pool", required=True, help="labelled CSV")
    bench.add_argument("--formula-column", required=True)
    bench.add_argument("--id-column", help="column naming the rows in the skipped list (default: row<N>, from 0)")
    bench.add_argument("--target", required=True, help="label column of the designed property")
    bench.add_argument("--window", nargs=2, required=True, metavar=("LO", "HI"), help="target window (inf allowed)")
    bench.add_argument("--stable-column", help="stability label column (gate)")
    bench.add_argument("--stable-max", type=float, help="largest stability value that counts as stable")
    bench.add_argument("--hits", type=int, default=10, help="K: hits to find (default 10)")
    bench.add_argument("--seeds", type=int, default=10)
    bench.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    bench.add_argument("--batch", type=int, default=5, help="q: batch size")
    bench.add_argument("--n-init", type=int, default=10)
    bench.add_argument(
        "--features",
        default="sites",
        choices=["composition", "ordered", "both", "sites"],
        help="formula features: composition statistics, site-ordered (k-th written element), both, or sites "
        "(composition statistics + the element at each written site, under a categorical kernel; default)",
    )
    bench.add_argument("--gap-model", action="store_true", help="add the band-gap model's predictions as features")
    bench.add_argument(
        "--oxidation",
        action="store_true",
        help="add oxidation-state features (likely balanced states, their ICSD frequency, valence electrons left)",
    )
    bench.add_argument(
        "--surrogate",
        default="gp",
        choices=["gp", "forest"],
        help="bo-hit surrogate: BoTorch GP (default) or a random forest per margin",
    )
    bench.add_argument("--budget", type=int, help="evaluations at most per run (default: the pool)")
    bench.add_argument("--methods", default="bo,random", help="comma list of bo, bo-hit, greedy, random")
    bench.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (one replay per CPU)")
    bench.add_argument("--plot", help="save the hits-vs-evaluations trace plot here")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(func=cmd_bo_benchmark)

    gap = sub.add_parser("train-gap", help="train the band-gap GNN ensemble (PBE + experiment), log to MLflow")
    gap.add_argument("config", help="YAML (see configs/bandgap.yaml)")
    gap.add_argument("--restart", action="store_true", help="retrain members already finished in work_dir")
    gap.add_argument(
        "--member", type=int, action="append", help="train only this member (repeatable; for parallel processes)"
    )
    gap.add_argument(
        "--recalibrate",
        action="store_true",
        help="only recalibrate the trained ensemble at output (P(metal), sigma, 90 %% interval) and evaluate it",
    )
    gap.set_defaults(func=cmd_train_gap)

    pgap = sub.add_parser("predict-gap", help="predict band gaps (PBE, experiment, p_metal) for a CSV of formulas")
    pgap.add_argument("--input", required=True, help="CSV with a formula column")
    pgap.add_argument("--formula-column", default="formula")
    pgap.add_argument("--out", required=True, help="output CSV: input columns + gap columns + error")
    pgap.add_argument("--model", help="ensemble file (default: the shipped materials/data/bandgap_ensemble.pt)")
    pgap.set_defaults(func=cmd_predict_gap)

    ft = sub.add_parser("finetune", help="GPAW training data -> fine-tune MACE -> evaluate -> MLflow model registry")
    ft.add_argument("config", help="finetune YAML (see configs/finetune.yaml)")
    ft.add_argument("--out", help="output folder (default: output_dir; cached DFT frames are reused)")
    ft.set_defaults(func=cmd_finetune)
    return parser


#: what to tell a user whose run was stopped, per command (every command writes results as they come)
RESUME_HINTS = {
    "screen": "rerun the same command with --resume (same --out) to continue",
    "campaign": "rerun the same command with --resume (same --out) to continue",
    "dft": "rerun the same command (same --out) to continue: finished items are skipped",
    "finetune": "rerun the same command (same --out) to continue: computed DFT frames are reused",
}


def _stopped_message(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    from pipelines.interrupts import was_terminated

    why = "terminated (SIGTERM)" if was_terminated(exc) else "interrupted"
    hint = RESUME_HINTS.get(args.command)
    if hint is None:
        return f"semidisc {args.command}: {why}; nothing was lost that had been written; run it again"
    return f"semidisc {args.command}: {why}; results computed so far are saved; {hint}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Exit codes: 0 done; 2 a user error (the message names the input and the fix);
    1 the run failed; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). ``--debug`` shows tracebacks."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    from pipelines.interrupts import install_sigterm_handler, was_terminated

    install_sigterm_handler()
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(_stopped_message(args, exc), file=sys.stderr)
        return 143 if was_terminated(exc) else 130
    except (SemidiscError, OSError) as exc:
        if args.debug:
            raise
        print(f"semidisc: error: {_one_line(exc)}", file=sys.stderr)
        if isinstance(exc, SemidiscError):
            return exc.exit_code
        return 2 if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) else 1


def _one_line(exc: BaseException) -> str:
    """The error's message; an OSError also names its file (``[Errno 13] Permission denied: 'x'``)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, SemidiscError) and exc.filename is not None:
        text = f"{exc.strerror or type(exc).__name__}: {exc.filename}"
        if isinstance(exc, PermissionError):
            text += " (choose a folder you can write to, e.g. --out)"
    return text


if __name__ == "__main__":
    sys.exit(main())
