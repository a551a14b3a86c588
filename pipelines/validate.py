"""``semidisc validate``: compare predictions (a CSV, a screen's output folder, or an MLflow run) with a
reference set (Borlido, Zhuo, MP or a lab CSV), write a markdown/HTML report with plots, log it to MLflow."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from materials.reference import canonical_property, load_reference
from materials.validation import Prediction, match, match_metrics, write_report
from pipelines.config import TrackingSettings

#: Default prediction column for each property, in semidisc's own outputs (screen results.csv, dft_results.csv).
DEFAULT_COLUMNS = {"formation_energy": ("e_form_per_atom",), "band_gap": ("gap_pbe", "band_gap", "gap_expt")}


class ValidationInputError(ValueError):
    """The predictions cannot be read or lack the needed column; the message lists what is there."""


@dataclass
class ValidationSummary:
    report: Path
    metrics: dict[str, Any]
    n_unmatched: int
    mlflow_run_id: str | None


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

    mlflow.set_tracking_uri(tracking.uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=source, artifact_path="results.csv")
    except Exception as exc:  # MLflow raises several types for an unknown run or artifact
        raise ValidationInputError(
            f"--predictions {source!r} is neither a file, a folder nor an MLflow run with results.csv "
            f"in {tracking.uri} ({type(exc).__name__})"
        ) from None
    return Path(local)


def read_predictions(path: Path, prop: str, column: str | None = None) -> tuple[list[Prediction], list[str]]:
    """Predictions from a CSV with ``formula`` and a value column; rows without a finite value are skipped
    (returned as messages). Uses ``<column>_std`` as the uncertainty when present; reads relaxed structures from
    ``structures/<id>.cif`` beside the CSV when they exist (so matching can tell polymorphs apart)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValidationInputError(f"{path}: no rows")
    columns = list(rows[0])
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
    predictions, skipped = [], []
    for i, row in enumerate(rows):
        item_id = row.get("id") or f"row{i}"
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (row.get("status") not in (None, "", "ok")):
            skipped.append(f"{item_id}: no {column} value (status {row.get('status') or 'n/a'})")
            continue
        std = row.get(f"{column}_std")
        structure = None
        cif = structures_dir / f"{item_id}.cif"
        if cif.is_file():
            from pymatgen.core import Structure

            structure = Structure.from_file(cif)
        predictions.append(
            Prediction(
                id=item_id,
                formula=row["formula"],
                value=value,
                uncertainty=float(std) if std not in (None, "") else None,
                structure=structure,
            )
        )
    return predictions, skipped


def run_validation(
    predictions: str,
    reference: str,
    prop: str,
    out_dir: str | Path,
    method: str | None = None,
    column: str | None = None,
    by: str = "auto",
    tracking: TrackingSettings | None = None,
) -> ValidationSummary:
    """Match, compute metrics, write ``report.md``/``report.html`` + plots in ``out_dir``, log to MLflow."""
    from pipelines.tracking import Tracker, git_commit

    tracking = tracking or TrackingSettings(experiment="semidisc-validate")
    prop = canonical_property(prop)
    path = _resolve_predictions_csv(predictions, tracking)
    preds, skipped = read_predictions(path, prop, column)
    ref = load_reference(reference, prop, method=method)
    result = match(preds, ref, by=by)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{prop.replace('_', ' ')}: {path.name} vs {ref.name}"
    with path.open(newline="") as handle:  # a screen's energies: say which convention put them on MP's scale
        conventions = sorted({row.get("energy_convention") or "" for row in csv.DictReader(handle)} - {""})
    if conventions and prop == "formation_energy":
        title += f" (energy convention {', '.join(conventions)})"
    report = write_report(result, out, title=title)
    if skipped:
        (out / "skipped_predictions.txt").write_text("\n".join(skipped) + "\n")
    metrics = match_metrics(result)
    tracker = Tracker(tracking, run_name=f"validate-{prop}-{ref.name}")
    try:
        tracker.log_params(
            {
                "predictions": str(path),
                "reference": ref.name,
                "property": prop,
                "method": method,
                "by": by,
                "n_predictions": len(preds),
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
    return ValidationSummary(report, metrics, len(result.unmatched_predictions), tracker.run_id)
