"""``semidisc validate``: compare predictions (a CSV, a screen's output folder, or an MLflow run) with a
reference set (Borlido, Zhuo, MP or a lab CSV), write a markdown/HTML report with plots, log it to MLflow."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from materials.composition import case_hint
from materials.datasets.records import canonical_property, finite_float, read_text_file
from materials.datasets.reference_data import load_reference
from materials.datasets.validation import (
    DuplicateConflict,
    Prediction,
    SkippedPrediction,
    match,
    match_metrics,
    write_report,
)
from materials.errors import InputError
from pipelines.config import TrackingSettings

#: Default prediction column for each property, in semidisc's own outputs (screen results.csv, dft_results.csv).
DEFAULT_COLUMNS = {"formation_energy": ("e_form_per_atom",), "band_gap": ("gap_pbe", "band_gap", "gap_expt")}
#: Band-gap prediction columns by the level of theory they estimate (``band_gap`` of dft_results.csv: its
#: ``functional`` column decides).
GAP_COLUMN_FIDELITY = {"gap_expt": "experiment", "gap_expt_nonmetal": "experiment", "gap_pbe": "PBE"}
#: Default band-gap column per reference fidelity, first present wins.
GAP_COLUMNS_FOR = {"experiment": ("gap_expt", "band_gap"), "PBE": ("gap_pbe", "band_gap")}


def reference_fidelity(ref) -> str:
    """``experiment`` when every row of a band-gap reference is a measurement, else its (first) method."""
    methods = {str(r.method).strip() for r in ref.rows}
    if not methods or all(m.lower() in ("experiment", "experimental", "exp", "lab") for m in methods):
        return "experiment"
    return sorted(methods)[0]


def prediction_fidelity(path: Path, column: str) -> str | None:
    """The level of theory of a band-gap prediction column (None when it cannot be told)."""
    if column in GAP_COLUMN_FIDELITY:
        return GAP_COLUMN_FIDELITY[column]
    with io.StringIO(read_text_file(path), newline="") as handle:
        functionals = {(row.get("functional") or "").strip() for row in csv.DictReader(handle)} - {""}
    if len(functionals) == 1:
        functional = functionals.pop()
        return "PBE" if functional.upper() == "PBE" else functional
    return None


class ValidationInputError(InputError):
    """The predictions cannot be read or lack the needed column; the message lists what is there."""


@dataclass
class ValidationSummary:
    """What ``run_validation`` produced: the report, its metrics (coverage over all prediction rows) and counts.
    ``warnings``: lines worth printing (conflicting reference values)."""

    report: Path
    metrics: dict[str, Any]
    n_unmatched: int
    mlflow_run_id: str | None
    n_skipped: int = 0
    warnings: list[str] = field(default_factory=list)


def _resolve_predictions_csv(source: str, tracking: TrackingSettings) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("results.csv", "dft_results.csv", "predictions.csv"):
            if (path / name).is_file():
                return path / name
        raise ValidationInputError(f"{path}: no results.csv / dft_results.csv / predictions.csv in this folder")
    # an MLflow run id: fetch its results.csv artifact
    import mlflow

    from pipelines.tracking import redact_uri

    mlflow.set_tracking_uri(tracking.uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=source, artifact_path="results.csv")
    except Exception as exc:  # MLflow raises several types for an unknown run or artifact
        raise ValidationInputError(
            f"--predictions {source!r} is neither a file, a folder nor an MLflow run with results.csv "
            f"in {redact_uri(tracking.uri)} ({type(exc).__name__})"
        ) from None
    return Path(local)


def read_predictions(
    path: Path, prop: str, column: str | None = None
) -> tuple[list[Prediction], list[SkippedPrediction]]:
    """Predictions from a CSV with ``formula`` and a value column, checked like lab data
    (:func:`materials.datasets.reference_data.load_lab_csv`) where a rule applies to a prediction.

    Rows are skipped, each with its reason, when the value is not a finite number or the row's ``status`` is not
    ``ok`` (a failed calculation), when a band gap is negative (gaps are >= 0 eV, 0 = metal; formation energies
    have no sign rule), or when ``<column>_std`` (the uncertainty, same unit) is given but not a number >= 0.
    Skipped rows count against coverage. Reads relaxed structures from ``structures/<id>.cif`` beside the CSV when
    they exist (so matching can tell polymorphs apart).

    Raises:
        ValidationInputError: no rows, no such column, or formulas that parse only in another letter case
            (``si``, ``GAAS``), every such row named with the formula it probably means.
    """
    with io.StringIO(read_text_file(path), newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [(reader.line_num, row) for row in reader]  # line numbers count the header as line 1
    if not rows:
        raise ValidationInputError(f"{path}: no rows")
    columns = list(rows[0][1])
    if column is None:
        column = next((c for c in DEFAULT_COLUMNS.get(prop, ()) if c in columns), None)
    if column is None or column not in columns:
        raise ValidationInputError(
            f"{path}: no prediction column for {prop} (tried {column or DEFAULT_COLUMNS.get(prop)}); "
            f"pass --column, one of: {', '.join(columns)}"
        )
    if "formula" not in columns:
        raise ValidationInputError(f"{path}: needs a 'formula' column; columns: {', '.join(columns)}")
    structures_dir = path.parent / "structures"
    predictions: list[Prediction] = []
    skipped: list[SkippedPrediction] = []
    case_errors: list[str] = []
    for i, (line, row) in enumerate(rows):
        item_id = row.get("id") or f"row{i}"
        text = row.get(column) or ""
        value = finite_float(text)
        status = row.get("status")
        std_text = (row.get(f"{column}_std") or "").strip()
        std = finite_float(std_text) if std_text else None
        reason = None
        if value is None or status not in (None, "", "ok"):
            reason = f"no {column} value (status {status or 'n/a'})"
        elif prop == "band_gap" and value < 0:
            reason = "negative band gap (band gaps are >= 0 eV, 0 = metal)"
        elif std_text and (std is None or std < 0):
            reason = f"{column}_std {std_text!r} is not a number >= 0"
        if reason is not None:
            skipped.append(SkippedPrediction(item_id, row.get("formula"), text, reason))
            continue
        hint = case_hint(row["formula"] or "")
        if hint:
            case_errors.append(f"line {line} (id {item_id}): formula {row['formula']!r} cannot be parsed{hint}")
            continue
        structure = None
        cif = structures_dir / f"{item_id}.cif"
        if cif.is_file():
            from pymatgen.core import Structure

            structure = Structure.from_file(cif)
        predictions.append(Prediction(item_id, row["formula"], value, std, structure))
    if case_errors:
        lines = "\n".join(f"  - {e}" for e in case_errors)
        raise ValidationInputError(
            f"{path}: {len(case_errors)} formula(s) in the wrong letter case; fix them:\n{lines}"
        )
    return predictions, skipped


def _gap_column(path: Path, ref, column: str | None, allow_mismatch: bool) -> str:
    """The band-gap column to compare with ``ref``: like with like by default (``gap_expt`` against measurements,
    ``gap_pbe`` against PBE); a PBE-vs-experiment comparison only when asked for explicitly.

    Raises:
        ValidationInputError: the fidelities differ and ``allow_mismatch`` is false, or no column fits.
    """
    with io.StringIO(read_text_file(path), newline="") as handle:
        columns = list(csv.DictReader(handle).fieldnames or [])
    wanted = reference_fidelity(ref)
    if column is None:
        candidates = GAP_COLUMNS_FOR.get(wanted, ("band_gap",))
        column = next((c for c in candidates if c in columns), None)
        if column is None:
            raise ValidationInputError(
                f"{path}: no {wanted} band-gap column to compare with {ref.name} (tried {', '.join(candidates)}); "
                f"pass --column, one of: {', '.join(columns)}"
            )
    have = prediction_fidelity(path, column) if column in columns else None
    if have is not None and have.lower() != wanted.lower() and not allow_mismatch:
        raise ValidationInputError(
            f"{path}: column {column!r} holds {have} gaps but {ref.name} holds {wanted} ones: comparing them measures "
            f"the method gap (PBE underestimates gaps by ~1 eV), not the prediction. Use a {wanted} column "
            f"({', '.join(GAP_COLUMNS_FOR.get(wanted, ()))}) or pass --allow-fidelity-mismatch"
        )
    return column


def run_validation(
    predictions: str,
    reference: str,
    prop: str,
    out_dir: str | Path,
    method: str | None = None,
    column: str | None = None,
    by: str = "auto",
    tracking: TrackingSettings | None = None,
    allow_fidelity_mismatch: bool = False,
) -> ValidationSummary:
    """Match, compute metrics, write ``report.md``/``report.html`` + plots in ``out_dir``, log to MLflow."""
    from pipelines.tracking import Tracker, git_commit

    tracking = tracking or TrackingSettings(experiment="semidisc-validate")
    prop = canonical_property(prop)
    path = _resolve_predictions_csv(predictions, tracking)
    ref = load_reference(reference, prop, method=method)
    if prop == "band_gap":
        column = _gap_column(path, ref, column, allow_fidelity_mismatch)
    preds, skipped = read_predictions(path, prop, column)
    result = match(preds, ref, by=by, skipped=skipped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{prop.replace('_', ' ')}: {path.name}" + (f" column {column}" if column else "") + f" vs {ref.name}"
    # a screen's energies: say which convention put them on MP's scale
    with io.StringIO(read_text_file(path), newline="") as handle:
        conventions = sorted({row.get("energy_convention") or "" for row in csv.DictReader(handle)} - {""})
    if conventions and prop == "formation_energy":
        title += f" (energy convention {', '.join(conventions)})"
    report = write_report(result, out, title=title)
    metrics = match_metrics(result)
    if not result.pairs:  # metrics would be NaN: a failed validation, not a result to log
        reasons = Counter(u.reason for u in result.unmatched_predictions) + Counter(s.reason for s in skipped)
        why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        raise ValidationInputError(
            f"no prediction of {path} matched {ref.name} ({result.n_predictions} rows: {why or 'none'}); nothing "
            f"to score, nothing logged to MLflow. The lists are in {report}"
        )
    tracker = Tracker(tracking, run_name=f"validate-{prop}-{ref.name}")
    try:
        tracker.log_params(
            {
                "predictions": str(path),
                "reference": ref.name,
                "property": prop,
                "method": method,
                "by": by,
                "n_predictions": result.n_predictions,
                "n_skipped": len(skipped),
            }
        )
        tracker.set_tags(
            {"git_commit": git_commit()} | ({"energy_convention": ",".join(conventions)} if conventions else {})
        )
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)})
        for file in sorted(out.iterdir()):  # the report's own files only (the folder may hold other things)
            if file.is_file() and file.suffix in (".md", ".html", ".png", ".csv", ".txt"):
                tracker.log_artifact(file, "validation")
    finally:
        tracker.end("FINISHED")
    return ValidationSummary(
        report,
        metrics,
        len(result.unmatched_predictions),
        tracker.run_id,
        len(skipped),
        [_conflict_line(c, ref.unit) for c in result.duplicate_conflicts],
    )


def _conflict_line(conflict: DuplicateConflict, unit: str) -> str:
    """One printable line: the formula, its reference values and how they were combined (``unit``: eV, eV/atom)."""
    return (
        f"reference values of {conflict.formula} conflict: {', '.join(f'{v:.3g}' for v in conflict.values)} {unit} "
        f"(spread {conflict.spread:.3g} > {conflict.tolerance} {unit}; rows {', '.join(conflict.reference_ids[:5])}"
        f"{' …' if len(conflict.reference_ids) > 5 else ''}), "
        f"combined by {conflict.policy}: {conflict.resolution} = {conflict.value:.3f} {unit}"
    )
