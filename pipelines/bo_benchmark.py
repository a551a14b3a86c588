"""``semidisc bo-benchmark``: BO vs random search on any labelled pool, features from the formula only.

Each (method, seed) replay is a Ray task (``materials.bo.optimize.simulate_campaign``); the report gives, per
method, the median number of evaluations to find K hits and the acceleration factor random / method.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from materials.bo.optimize import AcquisitionSettings, WindowObjective, expected_random_evaluations, simulate_campaign
from materials.datasets.records import finite_float
from materials.errors import InputError
from materials.ml.features import featurize_formulas, site_element_columns


class BenchmarkError(InputError):
    """Bad benchmark input (missing column, no usable rows, too few hits)."""


#: Skipped rows listed by ``format_report`` (``report_json`` lists all).
SKIPPED_SHOWN = 20


@dataclass
class LabelledPool:
    """A featurised pool. ``skipped``: one dict per row left out, ``{"row", "id", "formula", "reason"}`` (``row``
    counts data rows from 0; ``id`` is the id column's value, else ``row<N>`` as in a campaign's pool)."""

    formulas: list[str]
    features: np.ndarray
    labels: dict[str, np.ndarray]
    n_rows: int
    skipped: list[dict[str, Any]]
    feature_names: list[str]

    def acquisition_settings(self, surrogate: str = "gp") -> AcquisitionSettings:
        """Surrogate settings for this pool: site element codes (feature set ``sites``) go to a categorical kernel;
        ``surrogate``: ``"gp"`` or ``"forest"`` (:class:`materials.bo.optimize.AcquisitionSettings`)."""
        return AcquisitionSettings(
            categorical_columns=tuple(site_element_columns(self.feature_names)), surrogate=surrogate
        )


def load_labelled_pool(
    path: str | Path,
    formula_column: str,
    columns: Sequence[str],
    feature_set: str = "both",
    gap_model: bool | str = False,
    oxidation: bool = False,
    id_column: str | None = None,
) -> LabelledPool:
    """Read a CSV pool; rows with an unparseable formula or a non-numeric label are skipped with their id and
    reason. ``feature_set``: ``composition``, ``ordered``, ``both`` or ``sites``; ``gap_model``: add the band-gap
    model's predictions; ``oxidation``: add the oxidation-state features
    (:func:`materials.ml.features.featurize_formulas`); ``id_column``: names skipped rows (default ``row<N>``)."""
    from pipelines.campaign import read_csv_rows

    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--pool {path}: file not found")
    rows = read_csv_rows(path)
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    available = list(rows[0])
    missing = [c for c in [formula_column, *columns, *([id_column] if id_column else [])] if c not in available]
    if missing:
        raise BenchmarkError(
            f"{path}: no column(s) {', '.join(map(repr, missing))}; columns: {', '.join(map(repr, available))}"
        )
    skipped: list[dict[str, Any]] = []

    def skip(i: int, reason: str) -> None:
        item_id = str(rows[i][id_column]) if id_column else f"row{i}"
        skipped.append({"row": i, "id": item_id, "formula": rows[i][formula_column], "reason": reason})

    usable_rows, values = [], {c: [] for c in columns}
    for i, row in enumerate(rows):
        try:
            parsed = {c: float(row[c]) for c in columns}
        except (TypeError, ValueError):
            bad = ", ".join(f"{c}={row[c]!r}" for c in columns if finite_float(row[c]) is None)
            skip(i, f"non-numeric label ({bad})")
            continue
        if not all(math.isfinite(v) for v in parsed.values()):
            bad = ", ".join(f"{c}={row[c]!r}" for c in columns if not math.isfinite(parsed[c]))
            skip(i, f"non-finite label ({bad})")
            continue
        usable_rows.append(i)
        for c in columns:
            values[c].append(parsed[c])
    formulas = [rows[i][formula_column] for i in usable_rows]
    X, names, failures, ok_index = featurize_formulas(formulas, feature_set, gap_model=gap_model, oxidation=oxidation)
    for j, reason in sorted(failures.items()):
        skip(usable_rows[j], reason)
    skipped.sort(key=lambda entry: entry["row"])
    keep = np.asarray(ok_index, dtype=int)
    if keep.size == 0:
        raise BenchmarkError(f"{path}: no usable rows (every formula or label failed)")
    return LabelledPool(
        formulas=[formulas[j] for j in keep],
        features=X,
        labels={c: np.asarray(values[c])[keep] for c in columns},
        n_rows=len(rows),
        skipped=skipped,
        feature_names=names,
    )


def _replay(features, labels, objective, method, q, n_init, seed, hits, budget, settings) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return simulate_campaign(
        features,
        labels,
        objective,
        method,
        q=q,
        n_init=n_init,
        seed=seed,
        max_evaluations=budget,
        target_hits=hits,
        init_method="diverse" if method != "random" else "random",
        settings=settings,
    )


def run_benchmark(
    pool: LabelledPool,
    objective: WindowObjective,
    methods: Sequence[str],
    hits: int,
    seeds: int,
    q: int,
    n_init: int,
    budget: int | None = None,
    num_cpus: int = 2,
    settings: AcquisitionSettings | None = None,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Replay every (method, seed) on Ray; returns per-method medians and acceleration factors.

    Seeds are ``first_seed .. first_seed + seeds - 1`` (another range is a fresh sample of campaigns).
    ``settings``: surrogate/acquisition parameters (default: :meth:`LabelledPool.acquisition_settings`); a
    ``"forest"`` surrogate applies to ``bo-hit``, the other model-based methods keep the GP."""
    import ray

    from pipelines.config import RaySettings
    from pipelines.execution import init_ray

    hit_mask = objective.hit_array(
        pool.labels[objective.target], None if objective.stable is None else pool.labels[objective.stable]
    )
    n_hits = int(hit_mask.sum())
    if n_hits < hits:
        raise BenchmarkError(f"the pool has {n_hits} hits, fewer than --hits {hits}; widen the window or lower K")
    started = init_ray(RaySettings(num_cpus=num_cpus))
    try:
        replay = ray.remote(num_cpus=1)(_replay)
        features_ref, labels_ref = ray.put(pool.features), ray.put(pool.labels)
        settings = settings or pool.acquisition_settings()
        seed_list = list(range(first_seed, first_seed + seeds))
        start = time.perf_counter()
        refs = {
            (m, s): replay.remote(
                features_ref,
                labels_ref,
                objective,
                m,
                q,
                n_init,
                s,
                hits,
                budget,
                settings if m == "bo-hit" else replace(settings, surrogate="gp"),
            )
            for m in methods
            for s in seed_list
        }
        runs = {key: ray.get(ref) for key, ref in refs.items()}
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    report: dict[str, Any] = {
        "n_pool": len(pool.formulas),
        "n_rows": pool.n_rows,
        "n_skipped": len(pool.skipped),
        "skipped": pool.skipped,
        "n_hits_pool": n_hits,
        "hits": hits,
        "seeds": seeds,
        "first_seed": first_seed,
        "q": q,
        "n_init": n_init,
        "n_features": int(pool.features.shape[1]),
        "settings": asdict(settings),
        "seconds": seconds,
        "random_expected": expected_random_evaluations(len(pool.formulas), n_hits, hits),
        "methods": {},
    }
    for m in methods:
        evals = [runs[(m, s)]["evaluations_to_target"] for s in seed_list]
        reached = [e for e in evals if e is not None]
        iteration_seconds = [t for s in seed_list for t in runs[(m, s)]["iteration_seconds"]]
        report["methods"][m] = {
            "evaluations_to_target": evals,
            "median": statistics.median(reached) if len(reached) == seeds else None,
            "min": min(reached) if reached else None,
            "max": max(reached) if reached else None,
            "seconds_per_iteration": statistics.mean(iteration_seconds) if iteration_seconds else 0.0,
            "traces": [runs[(m, s)]["hits"] for s in seed_list],
        }
    random_median = report["methods"].get("random", {}).get("median") or report["random_expected"]
    for entry in report["methods"].values():
        entry["acceleration"] = random_median / entry["median"] if entry["median"] else None
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"pool: {report['n_pool']} usable of {report['n_rows']} rows ({report['n_skipped']} skipped), "
        f"{report['n_hits_pool']} hits ({100 * report['n_hits_pool'] / report['n_pool']:.1f}%)",
        f"K={report['hits']} hits, {report['seeds']} seeds, q={report['q']}, n_init={report['n_init']}; "
        f"random search expected {report['random_expected']:.0f} evaluations (analytic)",
        "",
        f"{'method':10s} {'median':>8s} {'min':>6s} {'max':>6s} {'accel':>7s} {'s/iter':>7s}",
    ]
    for m, e in report["methods"].items():
        median = "n/a" if e["median"] is None else f"{e['median']:.0f}"
        accel = "n/a" if e["acceleration"] is None else f"{e['acceleration']:.1f}x"
        lines.append(
            f"{m:10s} {median:>8s} {e['min'] if e['min'] is not None else '-':>6} "
            f"{e['max'] if e['max'] is not None else '-':>6} {accel:>7s} {e['seconds_per_iteration']:7.2f}"
        )
    lines.append(f"\n(acceleration = random median / method median; {report['seconds']:.0f} s in all)")
    skipped = report.get("skipped", [])
    if skipped:
        lines.append(f"\nskipped rows ({len(skipped)}; --json lists all):")
        for entry in skipped[:SKIPPED_SHOWN]:
            lines.append(f"  {entry['id']:>10s} {entry['formula'] or '(no formula)':14s} {entry['reason']}")
        if len(skipped) > SKIPPED_SHOWN:
            lines.append(f"  ... {len(skipped) - SKIPPED_SHOWN} more")
    return "\n".join(lines)


def trace_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Hits vs evaluations, median over seeds per method, with random's analytic expectation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for m, e in report["methods"].items():
        length = max(len(t) for t in e["traces"])
        padded = np.array([t + [t[-1]] * (length - len(t)) for t in e["traces"]], dtype=float)
        ax.plot(np.arange(1, length + 1), np.median(padded, axis=0), label=f"{m} (median of {len(e['traces'])})")
    n = np.arange(1, int(report["random_expected"] * 1.2))
    ax.plot(n, n * report["n_hits_pool"] / report["n_pool"], "k:", label="random (expected)")
    ax.axhline(report["hits"], color="grey", lw=0.8)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hits found")
    ax.set_ylim(0, report["hits"] * 1.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def report_json(report: dict[str, Any]) -> str:
    slim = json.loads(json.dumps(report))
    for e in slim["methods"].values():
        e.pop("traces", None)
    return json.dumps(slim, indent=1)
