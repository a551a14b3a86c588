from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
from ase.build import bulk
from pymatgen.io.ase import AseAtomsAdaptor

from materials.datasets.records import ReferenceRow, ReferenceSet
from materials.datasets.reference_data import load_reference
from materials.datasets.validation import (
    BAD_FORMULA,
    NO_STRUCTURE,
    NOT_FINITE,
    NOT_IN_REFERENCE,
    OTHER_POLYMORPH,
    Prediction,
    classification_metrics,
    match,
    match_metrics,
    regression_metrics,
    write_report,
)


def structure(name: str, kind: str, **lattice):
    return AseAtomsAdaptor.get_structure(bulk(name, kind, **lattice))


def row(id_, formula, value, uncertainty=None, e_form=None, structure=None):
    return ReferenceRow(id_, formula, value, uncertainty, "experiment", "test", None, structure, e_form)


# --- metrics: exact numbers -----------------------------------------------------------------------------------


def test_regression_metrics_by_hand():
    # errors (pred - ref): -0.5, 0, 1, 2
    m = regression_metrics([1.0, 2.0, 3.0, 5.0], [1.5, 2.0, 2.0, 3.0], ids=["a", "b", "c", "d"], n_predictions=5)
    assert m["n"] == 4 and m["n_predictions"] == 5
    assert m["coverage"] == pytest.approx(0.8)
    assert m["mae"] == pytest.approx(3.5 / 4)
    assert m["rmse"] == pytest.approx(math.sqrt(5.25 / 4))
    assert m["mean_signed_error"] == pytest.approx(2.5 / 4)
    assert m["max_error"] == pytest.approx(2.0) and m["max_error_id"] == "d"
    # reference mean 2.125: SS_tot = 0.625^2 + 2 * 0.125^2 + 0.875^2 = 1.1875; SS_res = 5.25
    assert m["r2"] == pytest.approx(1 - 5.25 / 1.1875)
    perfect = regression_metrics([1.0, 2.0], [1.0, 2.0])
    assert perfect["r2"] == 1.0 and perfect["coverage"] == 1.0 and perfect["max_error_id"] == 0
    empty = regression_metrics([], [], n_predictions=3)
    assert empty["n"] == 0 and empty["coverage"] == 0.0 and math.isnan(empty["mae"])
    assert math.isnan(regression_metrics([1.0], [2.0])["r2"])  # one point: R² undefined
    with pytest.raises(ValueError, match="must be equal"):
        regression_metrics([1.0], [1.0, 2.0])


def test_classification_metrics_by_hand():
    pred = [-0.1, 0.0, 0.05, 0.2, 0.1, 0.3, 0.4, 0.5]
    ref = [-0.05, 0.1, 0.0, 0.3, 0.2, 0.25, 0.1, 0.6]
    # threshold 0 (inclusive): predicted stable {0, 1}, truly stable {0, 2}
    m = classification_metrics(pred, ref, threshold=0.0)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (1, 1, 1, 5, 8)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == pytest.approx(0.5)
    assert m["accuracy"] == 0.75 and m["prevalence"] == 0.25
    assert m["daf"] == pytest.approx(2.0)
    # threshold 0.1: predicted stable {0, 1, 2, 4}, truly stable {0, 1, 2, 6}
    m = classification_metrics(pred, ref, threshold=0.1)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["prevalence"] == 0.5
    assert m["daf"] == pytest.approx(1.5) and m["threshold"] == 0.1
    none_predicted = classification_metrics([0.2, 0.3], [0.0, 0.3])
    assert math.isnan(none_predicted["precision"]) and math.isnan(none_predicted["daf"])
    assert none_predicted["recall"] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        classification_metrics([math.nan], [0.0])


# --- matching -------------------------------------------------------------------------------------------------


def test_formula_matching_normalises_and_lists_unmatched():
    ref = ReferenceSet("lab", "band_gap", [row("r1", "InCuSe2", 1.04), row("r2", "GaAs", 1.52), row("r3", "Si", 1.12)])
    preds = [
        Prediction("p1", "CuInSe2", 0.9),
        Prediction("p2", "Ga2As2", 1.3),
        Prediction("p3", "ZnO", 3.3),
        Prediction("p4", "GaAs", math.nan),
        Prediction("p5", "Ga(As", 1.0),
    ]
    result = match(preds, ref, by="formula")
    assert [(p.prediction.id, p.reference_ids, p.formula) for p in result.pairs] == [
        ("p1", ["r1"], "InCuSe2"),
        ("p2", ["r2"], "GaAs"),
    ]
    assert result.pairs[0].error == pytest.approx(-0.14) and result.pairs[0].resolution == "unique"
    assert {u.prediction.id: u.reason for u in result.unmatched_predictions} == {
        "p3": NOT_IN_REFERENCE,
        "p4": NOT_FINITE,
        "p5": BAD_FORMULA,
    }
    assert [r.id for r in result.unmatched_reference] == ["r3"]
    assert result.n_predictions == 5
    assert match_metrics(result)["coverage"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="repeated"):
        match([Prediction("p", "Si", 1.0), Prediction("p", "Si", 1.1)], ref)


def test_duplicate_policies():
    rows = [row("a", "GaAs", 1.0, e_form=-0.30), row("b", "GaAs", 1.2, e_form=-0.35), row("c", "GaAs", 1.7)]
    ref = ReferenceSet("lab", "band_gap", rows)
    pred = [Prediction("p", "GaAs", 1.6)]

    mean = match(pred, ref).pairs[0]
    assert mean.reference_value == pytest.approx(1.3) and mean.resolution == "mean of 3"
    assert mean.reference_uncertainty == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert mean.reference_ids == ["a", "b", "c"]

    ground = match(pred, ref, duplicates="ground_state")
    assert ground.pairs[0].reference_ids == ["b"] and ground.pairs[0].reference_value == 1.2
    assert ground.pairs[0].resolution == "ground state b of 3, 1 without energy"
    assert {r.id for r in ground.unmatched_reference} == {"a", "c"}  # other polymorphs: listed, not dropped

    closest = match(pred, ref, duplicates="closest").pairs[0]
    assert closest.reference_ids == ["c"] and closest.resolution == "closest c of 3"

    # stated uncertainties larger than the spread win
    ref = ReferenceSet("lab", "band_gap", [row("a", "Si", 1.10, 0.05), row("b", "Si", 1.12, 0.05)])
    assert match([Prediction("p", "Si", 1.0)], ref).pairs[0].reference_uncertainty == pytest.approx(0.05)


def test_structure_matching_tells_polymorphs_apart():
    zb = structure("GaAs", "zincblende", a=5.65)
    ref = ReferenceSet("lab", "band_gap", [row("zb", "GaAs", 1.52, structure=zb)])
    preds = [
        Prediction("zb-strained", None, 1.4, structure=structure("GaAs", "zincblende", a=5.85)),
        Prediction("wz", "GaAs", 1.6, structure=structure("GaAs", "wurtzite", a=4.0, c=6.53)),
        Prediction("no-structure", "GaAs", 1.3),
    ]
    by_structure = match(preds, ref, by="structure")
    assert [(p.prediction.id, p.matched_by) for p in by_structure.pairs] == [("zb-strained", "structure")]
    assert {u.prediction.id: u.reason for u in by_structure.unmatched_predictions} == {
        "wz": OTHER_POLYMORPH,
        "no-structure": NO_STRUCTURE,
    }

    # auto: the structure decides where both sides have one; a formula-only row takes the rest
    ref.rows.append(row("formula-only", "GaAs", 1.45))
    auto = match(preds, ref, by="auto")
    got = {p.prediction.id: (p.matched_by, p.reference_ids) for p in auto.pairs}
    assert got == {
        "zb-strained": ("structure", ["zb"]),
        "wz": ("formula", ["formula-only"]),  # never paired with the known zincblende row
        "no-structure": ("formula", ["zb", "formula-only"]),
    }
    assert auto.unmatched_predictions == [] and auto.unmatched_reference == []


def test_shipped_borlido_resolves_polymorphs_by_ground_state():
    ref = load_reference("borlido", "band_gap")
    result = match([Prediction("zns", "ZnS", 3.5), Prediction("gaas", "GaAs", 1.4)], ref)
    zns, gaas = result.pairs
    # ZnS: zincblende mp-10695 (E_form -1.140) lies below wurtzite mp-560588 (-1.137 eV/atom)
    assert zns.reference_ids == ["borlido:mp-10695"] and zns.reference_value == pytest.approx(3.72)
    assert zns.resolution == "ground state borlido:mp-10695 of 2"
    assert gaas.reference_value == pytest.approx(1.52)
    assert len(result.unmatched_reference) == 464 - 2


# --- report ---------------------------------------------------------------------------------------------------


def test_report_files(tmp_path):
    rows = [row(f"r{i}", f, v, 0.05) for i, (f, v) in enumerate([("Si", 1.12), ("GaAs", 1.52), ("ZnO", 3.4)])]
    rows.append(row("r-unused", "CdTe", 1.5))
    ref = ReferenceSet("lab|data", "band_gap", rows, source="test data")
    preds = [Prediction("si", "Si", 0.6, 0.1), Prediction("gaas", "GaAs", 0.5), Prediction("zno", "ZnO", 0.9)]
    preds.append(Prediction("un|known", "InSb", 0.2))
    result = match(preds, ref)
    md = write_report(result, tmp_path / "report", title="PBE vs lab", classification=None)
    out = md.parent
    assert md.name == "report.md"
    for name in ["report.html", "parity.png", "residuals.png", "matches.csv", "unmatched_predictions.csv"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = md.read_text()
    assert "| MAE (eV) | 1.347 |" in text  # (0.52 + 1.02 + 2.5) / 3
    assert "| max error item | zno |" in text
    assert "Reference: lab|data (test data)" in text
    assert "| un\\|known | InSb | 0.200 | formula not in the reference set |" in text  # table cells escaped
    assert "| r-unused | CdTe | 1.500 | experiment |" in text
    html = (out / "report.html").read_text()
    assert '<img src="parity.png"' in html and "<td>zno</td>" in html
    with (out / "matches.csv").open() as fh:
        matches = list(csv.DictReader(fh))
    assert [m["prediction_id"] for m in matches] == ["si", "gaas", "zno"]
    assert float(matches[0]["error"]) == pytest.approx(-0.52)

    ehull = classification_metrics([0.0, 0.1], [0.0, 0.0])
    empty = match([Prediction("x", "InSb", 0.1)], ref)
    md = write_report(empty, tmp_path / "empty", classification=ehull)
    assert "No matched pairs" in md.read_text() and "Stability classification" in md.read_text()
    assert not (md.parent / "parity.png").exists()


def test_library_stays_free_of_pyplot_ray_and_mlflow(tmp_path):
    code = (
        "import sys; from materials.datasets.validation import parity_plot, residual_histogram\n"
        f"parity_plot([1, 2], [1.1, 1.9], r'{tmp_path / 'p.png'}', [0.1, None], None)\n"
        f"residual_histogram([0.1, -0.1], r'{tmp_path / 'r.png'}')\n"
        "bad = [m for m in ('matplotlib.pyplot', 'ray', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "p.png").is_file() and (tmp_path / "r.png").is_file()


def test_borlido_methods_against_experiment_reproduce_the_paper():
    # Borlido et al. 2019: PBE underestimates gaps by ~1 eV on average; HSE06 and MBJ halve the error
    experiment = load_reference("borlido", "band_gap")
    mae = {}
    for method in ("PBE", "HSE06"):
        computed = load_reference("borlido", "band_gap", method=method)
        result = match([Prediction(r.id, r.formula, r.value) for r in computed.rows], experiment, by="formula")
        assert result.unmatched_predictions == []
        mae[method] = match_metrics(result)["mae"]
    assert 0.95 < mae["PBE"] < 1.15
    assert 0.45 < mae["HSE06"] < 0.6


def test_prediction_round_trip():
    pred = Prediction("p", "GaAs", 1.4, 0.1, structure("GaAs", "zincblende", a=5.65))
    back = Prediction.from_dict(pred.as_dict())
    assert back.structure == pred.structure and back.as_dict() == pred.as_dict()
    assert Prediction.from_dict(Prediction("q", "Si", 1.1).as_dict()) == Prediction("q", "Si", 1.1)


# --- issue 16: what a validation run must not hide ---------------------------------------------------------------

LAB_GAPS = "formula,property,value,unit,source\nSi,band_gap,1.12,eV,a\nSi,band_gap,1.12,eV,b\nSi,band_gap,2.50,eV,c\n"


def validate(tmp_path, predictions: str, *extra: str, reference: str = LAB_GAPS) -> tuple[list[str], object]:
    """`semidisc validate` arguments for a predictions CSV and a lab CSV written into ``tmp_path``."""
    (tmp_path / "pred.csv").write_text(predictions)
    (tmp_path / "lab.csv").write_text(reference)
    args = ["validate", "--predictions", str(tmp_path / "pred.csv"), "--reference", str(tmp_path / "lab.csv")]
    return [*args, "--property", "band_gap", "--out", str(tmp_path / "report"), *extra], tmp_path / "report"


def test_validate_coverage_counts_skipped_rows_and_report_lists_them(tmp_path, capsys):
    from pipelines.cli import main

    # 1 usable row, 9 without a usable value: a failed calculation, empty, text, nan, inf, negative gaps, bad std
    rows = ["id,formula,gap_expt,gap_expt_std,status", "a,Si,1.0,0.1,ok", "b,Si,,,failed", "c,Si,,,ok"]
    rows += ["d,Si,n/a,,ok", "e,Si,nan,,ok", "f,Si,inf,,ok", "g,Si,-0.3,,ok", "h,Si,-1e-3,,ok", "i,Si,1.1,-0.2,ok"]
    rows += ["j,Si,1.1,x,ok"]
    args, out = validate(tmp_path, "\n".join(rows) + "\n", "--no-mlflow")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "matched 1 predictions of 10 rows (coverage 10%), 0 unmatched, 9 skipped" in text
    report = (out / "report.md").read_text()
    assert "| coverage (matched / all prediction rows) | 0.100 |" in report
    assert "10 prediction rows: 1 matched, 0 unmatched, 9 skipped" in report
    assert "## Skipped predictions (9; all in skipped_predictions.csv)" in report
    skipped = {r["prediction_id"]: r for r in csv.DictReader((out / "skipped_predictions.csv").open())}
    assert sorted(skipped) == list("bcdefghij")
    assert skipped["b"]["reason"] == "no gap_expt value (status failed)"
    assert skipped["g"]["reason"].startswith("negative band gap") and skipped["g"]["value"] == "-0.3"
    assert skipped["i"]["reason"] == "gap_expt_std '-0.2' is not a number >= 0"
    for item, row in skipped.items():  # every skipped row named in the report with its reason
        assert f"| {item} | Si | {row['value']} | {row['reason']} |" in report
    # the negative gaps never reach the metrics: one pair, error 1.0 - mean(1.12, 1.12, 2.5)
    matches = list(csv.DictReader((out / "matches.csv").open()))
    assert [m["prediction_id"] for m in matches] == ["a"]
    assert float(matches[0]["error"]) == pytest.approx(1.0 - 4.74 / 3)


def test_validate_case_typos_fail_naming_each_row_and_the_intended_formula(tmp_path, capsys):
    from pipelines.cli import main

    args, out = validate(tmp_path, "id,formula,gap_expt\na,si,1.0\nb,GAAS,1.3\nc,Si,1.1\n", "--no-mlflow")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 formula(s) in the wrong letter case" in err
    hint = "formulas are case-sensitive: did you mean"
    assert f"line 2 (id a): formula 'si' cannot be parsed; {hint} 'Si' (or 'SI')?" in err
    assert f"line 3 (id b): formula 'GAAS' cannot be parsed; {hint} 'GaAs'?" in err
    assert not out.exists()  # refused before any report


def test_validate_with_no_match_fails_instead_of_nan_metrics(tmp_path, capsys):
    from pipelines.cli import main

    tracking = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    args, out = validate(tmp_path, "id,formula,gap_expt\na,ZnO,3.0\nb,Xx2,1.0\nc,GaN,\n", *tracking)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no prediction of" in err and "matched lab.csv (3 rows:" in err
    assert "1 formula not in the reference set" in err and "1 formula cannot be parsed" in err
    assert "1 no gap_expt value (status n/a)" in err and "nothing logged to MLflow" in err
    report = (out / "report.md").read_text()  # the report with the lists stays for the user to read
    assert "| a | ZnO | 3.000 | formula not in the reference set |" in report and "| c | GaN |  |" in report
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run with NaN metrics


def test_conflicting_reference_duplicates_are_reported_with_values_and_policy(tmp_path, capsys):
    from pipelines.cli import main

    reference = LAB_GAPS + "GaAs,band_gap,1.42,eV,d\nGaAs,band_gap,1.45,eV,e\n"  # GaAs within tolerance
    args, out = validate(tmp_path, "id,formula,gap_expt\na,Si,1.1\nb,GaAs,1.4\n", "--no-mlflow", reference=reference)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert (
        "warning: reference values of Si conflict: 1.12, 1.12, 2.5 eV (spread 1.38 > 0.1 eV; rows lab.csv:2, "
        "lab.csv:3, lab.csv:4), combined by mean: mean of 3 = 1.580 eV" in text
    )
    assert "GaAs conflict" not in text
    report = (out / "report.md").read_text()
    assert "Warning: 1 reference formula(s) hold values further apart than 0.1 eV and were combined by 'mean'" in report
    assert "| Si | 1.12, 1.12, 2.5 | lab.csv:2, lab.csv:3, lab.csv:4 | 1.380 | mean of 3 | 1.580 |" in report
    [conflict] = list(csv.DictReader((out / "duplicate_conflicts.csv").open()))
    assert conflict["formula"] == "Si" and conflict["values"] == "1.12;1.12;2.5" and conflict["policy"] == "mean"


def test_duplicate_conflicts_follow_the_policy():
    from materials.datasets.validation import DUPLICATE_SPREAD_TOLERANCE

    assert DUPLICATE_SPREAD_TOLERANCE == {"band_gap": 0.1, "formation_energy": 0.05}
    rows = [row("a", "GaAs", 1.0, e_form=-0.30), row("b", "GaAs", 1.5, e_form=-0.35), row("c", "Si", 1.1)]
    ref = ReferenceSet("lab", "band_gap", rows)
    preds = [Prediction("p", "GaAs", 1.6), Prediction("q", "GaAs", 1.2), Prediction("r", "Si", 1.0)]
    [mean] = match(preds, ref).duplicate_conflicts  # two predictions of GaAs: one conflict
    assert (mean.formula, mean.values, mean.resolution, mean.value) == ("GaAs", [1.0, 1.5], "mean of 2", 1.25)
    assert mean.spread == pytest.approx(0.5) and mean.tolerance == 0.1
    [closest] = match(preds, ref, duplicates="closest").duplicate_conflicts  # optimistic pick among conflicts
    assert closest.resolution == "closest b of 2" and closest.value == 1.5
    assert match(preds, ref, duplicates="ground_state").duplicate_conflicts == []  # polymorphs: distinct materials
    close = ReferenceSet("lab", "band_gap", [row("a", "Si", 1.10), row("b", "Si", 1.20)])
    assert match([Prediction("p", "Si", 1.0)], close).duplicate_conflicts == []  # spread 0.1 is not above 0.1
