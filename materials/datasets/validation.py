"""Compare predictions with reference data: matching, metrics, plots and a report.

``match`` pairs each :class:`Prediction` with a :class:`~materials.datasets.records.ReferenceSet` by pymatgen
reduced formula, or by structure (pymatgen ``StructureMatcher``) when both sides have one. Nothing is dropped silently:
predictions without a partner are listed with the reason, and reference rows no prediction used are listed too.
Several reference rows for one formula (polymorphs, repeated measurements) become one value by a duplicate
policy, recorded on each pair:

* ``mean``: mean of the rows; its uncertainty is the larger of their sample standard deviation and the rms of
  their stated uncertainties (repeated measurements of one compound: Zhuo, lab data).
* ``ground_state``: the row of the lowest MP formation energy (polymorphs: Borlido, MP); the mean when no row
  has an energy.
* ``closest``: the row nearest the prediction. Optimistic by construction: only for checking whether *some*
  polymorph agrees.

Every prediction is matched on its own, so several predicted polymorphs of one formula share one reference
value; the report counts those. Reference rows of one formula that are treated as the same material (``mean``,
``closest``) but lie further apart than :data:`DUPLICATE_SPREAD_TOLERANCE` are listed as conflicts, with the
values and how they were combined.

Prediction rows that never reached matching (no value, a failed calculation, a negative band gap: the caller
decides and passes them as :class:`SkippedPrediction`) count in the coverage denominator and are listed too.

Plots draw on ``matplotlib.figure.Figure`` (never pyplot), so a notebook's backend is left alone.
"""

from __future__ import annotations

import csv
import html
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from materials.composition import reduced_formula
from materials.datasets.records import DUPLICATE_POLICIES, ReferenceRow, ReferenceSet
from materials.errors import InputError
from materials.serialise import Record

MATCH_MODES = ("formula", "structure", "auto")

#: Reasons a prediction stays unmatched (the report groups by them).
NOT_FINITE = "predicted value is not a finite number (failed calculation?)"
BAD_FORMULA = "formula cannot be parsed"
FORMULA_DISAGREES = "formula disagrees with the structure's composition"
NOT_IN_REFERENCE = "formula not in the reference set"
NO_STRUCTURE = "prediction has no structure (matching by structure)"
REFERENCE_WITHOUT_STRUCTURE = "reference has this formula but no structure for it (matching by structure)"
OTHER_POLYMORPH = "reference has this formula only as other polymorphs (structures do not match)"

_QUANTITY = {"band_gap": "band gap", "formation_energy": "formation energy"}

#: Largest spread (max - min, in the property's unit) of reference rows combined as one material before the
#: report warns that they conflict: 0.1 eV for band gaps (about the scatter of repeated optical measurements of one
#: compound, e.g. GaAs 1.42-1.52 eV), 0.05 eV/atom for formation energies (about calorimetry's stated errors).
DUPLICATE_SPREAD_TOLERANCE = {"band_gap": 0.1, "formation_energy": 0.05}


@dataclass
class Prediction(Record):
    """One predicted value.

    Attributes:
        id: unique among the predictions.
        formula: any formula spelling (normalised when matching); None to take it from ``structure``.
        value: in the reference set's unit (eV for band_gap, eV/atom for formation_energy).
        uncertainty: one standard uncertainty (same unit), e.g. an ensemble spread; None when not given.
        structure: the predicted (relaxed) structure, when structure matching should tell polymorphs apart.
    """

    id: str
    formula: str | None
    value: float
    uncertainty: float | None = None
    structure: Structure | None = None


@dataclass
class MatchedPair:
    """A prediction and the reference value it is compared with.

    Attributes:
        formula: pymatgen reduced formula.
        reference_ids: the reference rows behind ``reference_value`` (several for ``mean``).
        matched_by: ``formula`` or ``structure``.
        resolution: how the rows became one value: ``unique``, ``mean of 3``, ``ground state mp-2534 of 2``, ...
    """

    prediction: Prediction
    formula: str
    reference_value: float
    reference_uncertainty: float | None
    reference_ids: list[str]
    matched_by: str
    resolution: str

    @property
    def error(self) -> float:
        """Predicted minus reference value (reference unit)."""
        return self.prediction.value - self.reference_value


@dataclass
class UnmatchedPrediction:
    prediction: Prediction
    reason: str


@dataclass
class SkippedPrediction:
    """A prediction row left out before matching, and why (it still counts in the coverage denominator).

    Attributes:
        id: the row's id.
        formula: as written (None when the row has none).
        value: the prediction cell as written (may be empty or not a number).
        reason: why the row has no usable value.
    """

    id: str
    formula: str | None
    value: str
    reason: str


@dataclass
class DuplicateConflict:
    """Reference rows of one formula, treated as one material, whose values spread beyond the tolerance.

    Attributes:
        formula: pymatgen reduced formula.
        reference_ids: the rows, in reference order.
        values: their values (reference unit), same order.
        policy: the duplicate policy in force (``mean``, ``closest``, ``ground_state``).
        resolution: what it did for the (first) prediction of this formula: ``mean of 3``, ``closest b of 2``, ...
        value: the reference value that prediction was compared with.
        tolerance: the spread allowed (:data:`DUPLICATE_SPREAD_TOLERANCE`).
    """

    formula: str
    reference_ids: list[str]
    values: list[float]
    policy: str
    resolution: str
    value: float
    tolerance: float

    @property
    def spread(self) -> float:
        """max - min of ``values`` (reference unit)."""
        return max(self.values) - min(self.values)


@dataclass
class MatchResult:
    """Output of :func:`match`: the pairs, and everything that was not paired."""

    reference_name: str
    property: str
    unit: str
    by: str
    duplicate_policy: str
    pairs: list[MatchedPair]
    unmatched_predictions: list[UnmatchedPrediction]
    unmatched_reference: list[ReferenceRow]
    reference_source: str = ""
    reference_notes: list[str] = field(default_factory=list)
    skipped: list[SkippedPrediction] = field(default_factory=list)
    duplicate_conflicts: list[DuplicateConflict] = field(default_factory=list)

    @property
    def n_predictions(self) -> int:
        """Every prediction row: matched, unmatched and skipped (the coverage denominator)."""
        return len(self.pairs) + len(self.unmatched_predictions) + len(self.skipped)


def _resolve(rows: Sequence[ReferenceRow], policy: str, predicted: float) -> tuple[list[ReferenceRow], str]:
    """The rows a reference value is made of, and how they were chosen."""
    if len(rows) == 1:
        return list(rows), "unique"
    n = len(rows)
    if policy == "closest":
        best = min(rows, key=lambda r: (abs(r.value - predicted), r.id))
        return [best], f"closest {best.id} of {n}"
    if policy == "ground_state":
        ranked = [r for r in rows if r.e_form_per_atom is not None and math.isfinite(r.e_form_per_atom)]
        if ranked:
            best = min(ranked, key=lambda r: (r.e_form_per_atom, r.id))
            unranked = f", {n - len(ranked)} without energy" if len(ranked) < n else ""
            return [best], f"ground state {best.id} of {n}{unranked}"
        return list(rows), f"mean of {n} (no energies to rank polymorphs)"
    return list(rows), f"mean of {n}"


def _combine(rows: Sequence[ReferenceRow]) -> tuple[float, float | None]:
    """Value and uncertainty of one or several rows (see the module docstring for ``mean``)."""
    values = np.array([r.value for r in rows], dtype=float)
    stated = [r.uncertainty for r in rows if r.uncertainty is not None]
    if len(rows) == 1:
        return float(values[0]), rows[0].uncertainty
    spread = float(np.std(values, ddof=1))
    rms = float(np.sqrt(np.mean(np.square(stated)))) if stated else 0.0
    return float(values.mean()), max(spread, rms)


def match(
    predictions: Sequence[Prediction],
    reference: ReferenceSet,
    by: str = "auto",
    duplicates: str | None = None,
    matcher: StructureMatcher | None = None,
    skipped: Sequence[SkippedPrediction] = (),
) -> MatchResult:
    """Pair predictions with reference values.

    Args:
        predictions: values in the reference's unit (``reference.unit``).
        reference: any loaded :class:`ReferenceSet`.
        by: ``formula``: reduced formula only. ``structure``: only reference rows whose structure
            ``matcher`` finds equivalent to the prediction's. ``auto``: structure where the prediction and some
            reference rows of its formula both have one; if none of those is equivalent, the rows of that
            formula without a structure (a formula match); rows known to be other polymorphs are never used.
        duplicates: override ``reference.duplicate_policy`` (``mean``, ``ground_state``, ``closest``).
        matcher: pymatgen StructureMatcher; default tolerances, volumes scaled (so a strained or differently
            relaxed cell of the same polymorph still matches).
        skipped: prediction rows the caller left out (no usable value); kept in the result, counted in coverage.

    Returns:
        A :class:`MatchResult`; every prediction is either in ``pairs`` or in ``unmatched_predictions`` with a
        reason, and every reference row not behind any pair is in ``unmatched_reference``. Formulas whose candidate
        rows were combined as one material (any resolution but ``unique`` and ``ground state``) while spreading
        beyond :data:`DUPLICATE_SPREAD_TOLERANCE` are in ``duplicate_conflicts``, once per set of rows.
    """
    if by not in MATCH_MODES:
        raise InputError(f"{by=} is not one of {MATCH_MODES}")
    policy = duplicates or reference.duplicate_policy
    if policy not in DUPLICATE_POLICIES:
        raise InputError(f"duplicates={policy!r} is not one of {DUPLICATE_POLICIES}")
    repeated = sorted(i for i, c in Counter(p.id for p in predictions).items() if c > 1)
    if repeated:
        raise InputError(f"prediction ids must be unique; repeated: {repeated[:10]}")
    matcher = matcher or StructureMatcher()
    by_formula: dict[str, list[ReferenceRow]] = defaultdict(list)
    for row in reference.rows:
        by_formula[row.formula].append(row)

    pairs: list[MatchedPair] = []
    unmatched: list[UnmatchedPrediction] = []
    used: set[str] = set()
    tolerance = DUPLICATE_SPREAD_TOLERANCE[reference.property]
    conflicts: dict[tuple[str, ...], DuplicateConflict] = {}
    for pred in predictions:
        formula, reason = _prediction_formula(pred)
        if reason is None and not math.isfinite(pred.value):
            reason = NOT_FINITE
        if reason is None and formula not in by_formula:
            reason = NOT_IN_REFERENCE
        if reason is not None:
            unmatched.append(UnmatchedPrediction(pred, reason))
            continue
        candidates = by_formula[formula]
        rows, matched_by, reason = _candidates(pred, candidates, by, matcher)
        if reason is not None:
            unmatched.append(UnmatchedPrediction(pred, reason))
            continue
        chosen, resolution = _resolve(rows, policy, pred.value)
        value, uncertainty = _combine(chosen)
        used.update(r.id for r in chosen)
        values = [r.value for r in rows]
        # ground state picks one polymorph among distinct materials: their values may differ, nothing conflicts
        same_material = not resolution.startswith(("unique", "ground state"))
        key = tuple(r.id for r in rows)
        if same_material and max(values) - min(values) > tolerance and key not in conflicts:
            conflicts[key] = DuplicateConflict(formula, list(key), values, policy, resolution, value, tolerance)
        pairs.append(MatchedPair(pred, formula, value, uncertainty, [r.id for r in chosen], matched_by, resolution))
    return MatchResult(
        reference_name=reference.name,
        property=reference.property,
        unit=reference.unit,
        by=by,
        duplicate_policy=policy,
        pairs=pairs,
        unmatched_predictions=unmatched,
        unmatched_reference=[r for r in reference.rows if r.id not in used],
        reference_source=reference.source,
        reference_notes=list(reference.notes),
        skipped=list(skipped),
        duplicate_conflicts=list(conflicts.values()),
    )


def _prediction_formula(pred: Prediction) -> tuple[str | None, str | None]:
    """Reduced formula of a prediction, or the reason it has none."""
    from_structure = pred.structure.composition.reduced_formula if pred.structure is not None else None
    if not pred.formula:
        return (from_structure, None) if from_structure else (None, BAD_FORMULA)
    try:
        formula = reduced_formula(pred.formula)
    except ValueError:
        return None, BAD_FORMULA
    if from_structure is not None and from_structure != formula:
        return None, FORMULA_DISAGREES
    return formula, None


def _candidates(
    pred: Prediction, rows: list[ReferenceRow], by: str, matcher: StructureMatcher
) -> tuple[list[ReferenceRow], str, str | None]:
    """Reference rows of the prediction's formula it may be compared with, how, or why none."""
    if by == "formula":
        return rows, "formula", None
    with_structure = [r for r in rows if r.structure is not None]
    if by == "structure":
        if pred.structure is None:
            return [], "structure", NO_STRUCTURE
        if not with_structure:
            return [], "structure", REFERENCE_WITHOUT_STRUCTURE
    if pred.structure is None or not with_structure:
        return rows, "formula", None
    same = [r for r in with_structure if matcher.fit(pred.structure, r.structure)]
    if same:
        return same, "structure", None
    without_structure = [r for r in rows if r.structure is None]
    if by == "auto" and without_structure:
        return without_structure, "formula", None
    return [], "structure", OTHER_POLYMORPH


def regression_metrics(
    predicted: Sequence[float],
    reference: Sequence[float],
    ids: Sequence[str] | None = None,
    n_predictions: int | None = None,
) -> dict[str, Any]:
    """Errors of ``predicted`` against ``reference`` (same unit; errors are predicted - reference).

    Returns:
        ``n``; ``n_predictions`` (matched + unmatched, default ``n``); ``coverage`` = n / n_predictions;
        ``mae``, ``rmse``, ``max_error`` (largest absolute error) and ``max_error_id`` (its id, or its index when
        ``ids`` is None); ``mean_signed_error``; ``r2`` = 1 - SS_res / SS_tot about the reference mean. Values
        that cannot be computed (no pairs; R² of fewer than two or constant reference values) are NaN.
    """
    pred = np.asarray(predicted, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if pred.shape != ref.shape or pred.ndim != 1:
        raise ValueError(f"{pred.shape=} and {ref.shape=} must be equal and 1-D")
    if ids is not None and len(ids) != len(pred):
        raise ValueError(f"{len(ids)=} != {len(pred)=}")
    n = len(pred)
    total = n if n_predictions is None else n_predictions
    out: dict[str, Any] = {"n": n, "n_predictions": total, "coverage": n / total if total else math.nan}
    if n == 0:
        nan = math.nan
        return out | {
            "mae": nan,
            "rmse": nan,
            "r2": nan,
            "max_error": nan,
            "max_error_id": None,
            "mean_signed_error": nan,
        }
    err = pred - ref
    worst = int(np.argmax(np.abs(err)))
    ss_tot = float(np.sum((ref - ref.mean()) ** 2))
    out |= {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if n > 1 and ss_tot > 0 else math.nan,
        "max_error": float(abs(err[worst])),
        "max_error_id": ids[worst] if ids is not None else worst,
        "mean_signed_error": float(np.mean(err)),
    }
    return out


def match_metrics(result: MatchResult) -> dict[str, Any]:
    """:func:`regression_metrics` of a match, coverage counted over all its prediction rows (skipped ones too)."""
    return regression_metrics(
        [p.prediction.value for p in result.pairs],
        [p.reference_value for p in result.pairs],
        ids=[p.prediction.id for p in result.pairs],
        n_predictions=result.n_predictions,
    )


def classification_metrics(
    predicted_e_hull: Sequence[float], reference_e_hull: Sequence[float], threshold: float = 0.0
) -> dict[str, Any]:
    """Stability classification: a material counts as stable when its E_hull <= ``threshold`` (eV/atom).

    Returns:
        counts ``tp``, ``fp``, ``fn``, ``tn`` and ``n``; ``precision``, ``recall``, ``f1``, ``accuracy``;
        ``prevalence`` (fraction stable in the reference) and the discovery acceleration factor
        ``daf`` = precision / prevalence (how much likelier a predicted-stable material is to be stable than a
        random pick). Ratios with a zero denominator are NaN; ``threshold`` is echoed back.

    Raises:
        ValueError: different lengths, or NaN values (filter failed items first and report them).
    """
    pred = np.asarray(predicted_e_hull, dtype=float)
    ref = np.asarray(reference_e_hull, dtype=float)
    if pred.shape != ref.shape or pred.ndim != 1:
        raise ValueError(f"{pred.shape=} and {ref.shape=} must be equal and 1-D")
    bad = int(np.sum(~np.isfinite(pred)) + np.sum(~np.isfinite(ref)))
    if bad:
        raise ValueError(f"{bad} non-finite E_hull values; leave failed items out (and list them) first")
    pred_stable, ref_stable = pred <= threshold, ref <= threshold
    tp = int(np.sum(pred_stable & ref_stable))
    fp = int(np.sum(pred_stable & ~ref_stable))
    fn = int(np.sum(~pred_stable & ref_stable))
    tn = int(np.sum(~pred_stable & ~ref_stable))
    n = len(pred)

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    prevalence = ratio(tp + fn, n)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = ratio(2 * precision * recall, precision + recall) if tp else 0.0
    return {
        "threshold": threshold,
        "n": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": ratio(tp + tn, n),
        "prevalence": prevalence,
        "daf": ratio(precision, prevalence),
    }


def _error_array(values: Sequence[float | None] | None) -> np.ndarray | None:
    if values is None or all(v is None for v in values):
        return None
    return np.array([0.0 if v is None else v for v in values], dtype=float)


def parity_plot(
    reference: Sequence[float],
    predicted: Sequence[float],
    path: str | Path,
    reference_uncertainty: Sequence[float | None] | None = None,
    prediction_uncertainty: Sequence[float | None] | None = None,
    quantity: str = "band gap",
    unit: str = "eV",
    title: str | None = None,
) -> Path:
    """Parity plot (x = reference, y = prediction, error bars where uncertainties are given, y = x line, MAE in
    the legend) saved as an image at ``path``; returns the path."""
    from matplotlib.figure import Figure

    x = np.asarray(reference, dtype=float)
    y = np.asarray(predicted, dtype=float)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    mae = float(np.mean(np.abs(y - x))) if len(x) else math.nan
    ax.errorbar(
        x,
        y,
        xerr=_error_array(reference_uncertainty),
        yerr=_error_array(prediction_uncertainty),
        fmt="o",
        ms=4,
        alpha=0.7,
        elinewidth=0.8,
        label=f"n = {len(x)}, MAE = {mae:.3f} {unit}",
    )
    both = np.concatenate([x, y]) if len(x) else np.array([0.0, 1.0])
    low, high = float(both.min()), float(both.max())
    pad = 0.05 * (high - low) or 0.5
    lims = (low - pad, high + pad)
    ax.plot(lims, lims, "k--", lw=1, label="y = x")
    ax.set(xlim=lims, ylim=lims, aspect="equal")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left")
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path


def residual_histogram(
    residuals: Sequence[float],
    path: str | Path,
    quantity: str = "band gap",
    unit: str = "eV",
    bins: int = 30,
    title: str | None = None,
) -> Path:
    """Histogram of residuals (predicted - reference) with their mean and standard deviation; returns ``path``."""
    from matplotlib.figure import Figure

    r = np.asarray(residuals, dtype=float)
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    if len(r):
        ax.hist(r, bins=bins, color="tab:blue", alpha=0.8, label=f"mean = {r.mean():.3f}, std = {r.std():.3f} {unit}")
    ax.axvline(0.0, color="k", ls="--", lw=1)
    ax.set_xlabel(f"predicted - reference {quantity} ({unit})")
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    if len(r):
        ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path


# The report is built once as blocks, then rendered as markdown and as HTML, so both always say the same.
_Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows) | ("img", alt, src)
_RESOLUTION_KINDS = ("unique", "mean", "ground state", "closest")

#: Rows shown in the report's lists; the CSV files next to it hold all of them.
WORST_SHOWN = 10
UNMATCHED_SHOWN = 50


def _ids(ids: Sequence[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (" …" if len(ids) > shown else "")


def _values(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def write_report(
    result: MatchResult,
    out_dir: str | Path,
    title: str = "Validation report",
    classification: Mapping[str, Any] | None = None,
) -> Path:
    """Write the validation report of a match into ``out_dir`` and return the path of ``report.md``.

    Files: ``report.md`` and ``report.html`` (same content: summary, metrics, optional stability
    classification from :func:`classification_metrics`, plots, worst items, duplicate resolution and conflicting
    reference values, skipped and unmatched lists), ``parity.png`` and ``residuals.png`` (when anything matched),
    ``matches.csv``, ``skipped_predictions.csv``, ``unmatched_predictions.csv``, ``unmatched_reference.csv`` and
    ``duplicate_conflicts.csv`` (every row; the report shows the first ones).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = match_metrics(result)
    _write_matches_csv(result, out / "matches.csv")
    _write_unmatched_csvs(result, out)
    quantity = _QUANTITY.get(result.property, result.property)
    plots = []
    if result.pairs:
        pred = [p.prediction.value for p in result.pairs]
        ref = [p.reference_value for p in result.pairs]
        parity_plot(
            ref,
            pred,
            out / "parity.png",
            [p.reference_uncertainty for p in result.pairs],
            [p.prediction.uncertainty for p in result.pairs],
            quantity,
            result.unit,
            title,
        )
        residual_histogram([p.error for p in result.pairs], out / "residuals.png", quantity, result.unit)
        plots = [("img", "parity plot", "parity.png"), ("img", "residual histogram", "residuals.png")]

    blocks = _report_blocks(result, title, metrics, classification, plots)
    (out / "report.html").write_text(_render_html(blocks, title))
    md = out / "report.md"
    md.write_text(_render_markdown(blocks))
    return md


def _report_blocks(
    result: MatchResult,
    title: str,
    metrics: Mapping[str, Any],
    classification: Mapping[str, Any] | None,
    plots: list[_Block],
) -> list[_Block]:
    unit = result.unit
    shared = Counter(tuple(p.reference_ids) for p in result.pairs)
    n_shared = sum(c for c in shared.values() if c > 1)
    summary = (
        f"Reference: {result.reference_name} ({result.reference_source or 'no source given'}); property "
        f"{result.property} in {unit}. Matched by {result.by}; several reference rows per formula resolved by "
        f"'{result.duplicate_policy}'. {result.n_predictions} prediction rows: {len(result.pairs)} matched, "
        f"{len(result.unmatched_predictions)} unmatched, {len(result.skipped)} skipped (no usable value); "
        f"{len(result.unmatched_reference)} reference rows unused."
    )
    blocks: list[_Block] = [("h1", title), ("p", summary)]
    blocks += [("p", f"Note: {note}") for note in result.reference_notes]
    if result.duplicate_conflicts:
        first = result.duplicate_conflicts[0]
        blocks.append(
            (
                "p",
                f"Warning: {len(result.duplicate_conflicts)} reference formula(s) hold values further apart than "
                f"{first.tolerance} {unit} and were combined by '{result.duplicate_policy}' (see Conflicting "
                f"reference values), e.g. {first.formula}: {_values(first.values)} {unit} -> {first.resolution} "
                f"= {first.value:.3f} {unit}.",
            )
        )

    labels = {
        "n": "matched pairs",
        "n_predictions": "prediction rows (matched, unmatched and skipped)",
        "coverage": "coverage (matched / all prediction rows)",
        "mae": f"MAE ({unit})",
        "rmse": f"RMSE ({unit})",
        "r2": "R²",
        "max_error": f"max |error| ({unit})",
        "max_error_id": "max error item",
        "mean_signed_error": f"mean signed error, predicted - reference ({unit})",
    }
    blocks += [("h2", "Metrics"), ("table", ["metric", "value"], [[labels[k], _fmt(metrics[k])] for k in labels])]
    if classification is not None:
        rows = [[k, _fmt(v)] for k, v in classification.items()]
        blocks += [
            ("h2", "Stability classification"),
            (
                "p",
                f"Stable means E_hull <= {classification.get('threshold', 0.0)} eV/atom; DAF = precision / prevalence.",
            ),
            ("table", ["metric", "value"], rows),
        ]
    blocks += [("h2", "Plots")] + plots if plots else [("h2", "Plots"), ("p", "No matched pairs: no plots.")]

    worst = sorted(result.pairs, key=lambda p: -abs(p.error))[:WORST_SHOWN]
    blocks += [
        ("h2", f"Largest errors (top {len(worst)}; all in matches.csv)"),
        (
            "table",
            [
                "id",
                "formula",
                f"predicted ({unit})",
                f"reference ({unit})",
                f"error ({unit})",
                "matched by",
                "reference rows",
                "resolution",
            ],
            [
                [
                    p.prediction.id,
                    p.formula,
                    _fmt(p.prediction.value),
                    _fmt(p.reference_value),
                    _fmt(p.error),
                    p.matched_by,
                    _ids(p.reference_ids),
                    p.resolution,
                ]
                for p in worst
            ],
        ),
    ]

    kinds = Counter(next(k for k in _RESOLUTION_KINDS if p.resolution.startswith(k)) for p in result.pairs)
    blocks += [
        ("h2", "Duplicate resolution"),
        (
            "p",
            f"{n_shared} matched predictions share their reference value with another prediction (polymorphs "
            "of one formula, each compared with the same reference).",
        ),
        ("table", ["resolution", "pairs"], [[k, str(v)] for k, v in sorted(kinds.items())]),
    ]
    conflicts = result.duplicate_conflicts[:UNMATCHED_SHOWN]
    tolerance = DUPLICATE_SPREAD_TOLERANCE.get(result.property)
    blocks += [
        (
            "h2",
            f"Conflicting reference values ({len(result.duplicate_conflicts)}; all in duplicate_conflicts.csv)",
        ),
        (
            "p",
            f"Reference rows of one formula treated as one material whose values spread (max - min) more than "
            f"{tolerance} {unit}; check them before trusting the comparison.",
        ),
        (
            "table",
            ["formula", f"values ({unit})", "reference rows", f"spread ({unit})", "combined by", f"used ({unit})"],
            [
                [c.formula, _values(c.values), _ids(c.reference_ids), _fmt(c.spread), c.resolution, _fmt(c.value)]
                for c in conflicts
            ],
        ),
    ]

    skipped_reasons = Counter(s.reason for s in result.skipped)
    skipped_shown = result.skipped[:UNMATCHED_SHOWN]
    blocks += [
        ("h2", f"Skipped predictions ({len(result.skipped)}; all in skipped_predictions.csv)"),
        ("p", "Rows without a usable value: never matched, counted in the coverage denominator."),
        ("table", ["reason", "count"], [[r, str(c)] for r, c in skipped_reasons.most_common()]),
        (
            "table",
            ["id", "formula", "value as written", "reason"],
            [[s.id, s.formula or "", s.value, s.reason] for s in skipped_shown],
        ),
    ]

    reasons = Counter(u.reason for u in result.unmatched_predictions)
    shown = result.unmatched_predictions[:UNMATCHED_SHOWN]
    blocks += [
        ("h2", f"Unmatched predictions ({len(result.unmatched_predictions)}; all in unmatched_predictions.csv)"),
        ("table", ["reason", "count"], [[r, str(c)] for r, c in reasons.most_common()]),
        (
            "table",
            ["id", "formula", f"predicted ({unit})", "reason"],
            [[u.prediction.id, u.prediction.formula or "", _fmt(u.prediction.value), u.reason] for u in shown],
        ),
    ]
    ref_shown = result.unmatched_reference[:UNMATCHED_SHOWN]
    blocks += [
        (
            "h2",
            f"Reference rows not used ({len(result.unmatched_reference)}; first {len(ref_shown)} shown, all in "
            "unmatched_reference.csv)",
        ),
        (
            "table",
            ["id", "formula", f"value ({unit})", "method"],
            [[r.id, r.formula, _fmt(r.value), r.method] for r in ref_shown],
        ),
    ]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(blocks: list[_Block]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "img":
            parts.append(f"![{block[1]}]({block[2]})")
        elif kind == "table":
            header, rows = block[1], block[2]
            if not rows:
                parts.append("(none)")
                continue
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _render_html(blocks: list[_Block], title: str) -> str:
    e = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "img":
            body.append(f'<img src="{e(block[2])}" alt="{e(block[1])}">')
        elif kind == "table":
            header, rows = block[1], block[2]
            if not rows:
                body.append("<p>(none)</p>")
                continue
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:45%;margin:0.5em}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title><style>{style}</style></head>'
        f"<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _write_matches_csv(result: MatchResult, path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "prediction_id",
                "formula",
                "predicted",
                "prediction_uncertainty",
                "reference",
                "reference_uncertainty",
                "error",
                "abs_error",
                "matched_by",
                "resolution",
                "reference_ids",
            ]
        )
        for p in result.pairs:
            writer.writerow(
                [
                    p.prediction.id,
                    p.formula,
                    _num(p.prediction.value),
                    _num(p.prediction.uncertainty),
                    _num(p.reference_value),
                    _num(p.reference_uncertainty),
                    _num(p.error),
                    _num(abs(p.error)),
                    p.matched_by,
                    p.resolution,
                    ";".join(p.reference_ids),
                ]
            )


def _write_unmatched_csvs(result: MatchResult, out: Path) -> None:
    with (out / "unmatched_predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prediction_id", "formula", "predicted", "reason"])
        for u in result.unmatched_predictions:
            writer.writerow([u.prediction.id, u.prediction.formula or "", _num(u.prediction.value), u.reason])
    with (out / "skipped_predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prediction_id", "formula", "value", "reason"])
        for s in result.skipped:
            writer.writerow([s.id, s.formula or "", s.value, s.reason])
    with (out / "duplicate_conflicts.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["formula", "reference_ids", "values", "spread", "tolerance", "policy", "resolution", "used"])
        for c in result.duplicate_conflicts:
            writer.writerow(
                [
                    c.formula,
                    ";".join(c.reference_ids),
                    ";".join(_num(v) for v in c.values),
                    _num(c.spread),
                    _num(c.tolerance),
                    c.policy,
                    c.resolution,
                    _num(c.value),
                ]
            )
    with (out / "unmatched_reference.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["reference_id", "formula", "value", "uncertainty", "method", "source", "mp_id"])
        for r in result.unmatched_reference:
            writer.writerow([r.id, r.formula, _num(r.value), _num(r.uncertainty), r.method, r.source, r.mp_id or ""])
