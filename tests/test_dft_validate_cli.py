"""`semidisc dft` (GPAW as Ray tasks, resumable, MLflow) and `semidisc validate` (report + MLflow) end to end."""

from __future__ import annotations

import csv

import pytest
import yaml
from ase.build import bulk
from pymatgen.io.ase import AseAtomsAdaptor

from pipelines.cli import main

pytestmark = pytest.mark.slow


def test_dft_cli_runs_records_failures_and_resumes(tmp_path, capsys, mlflow_uri):
    pytest.importorskip("gpaw")
    inputs = tmp_path / "in"
    inputs.mkdir()
    AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.43)).to(filename=str(inputs / "Si.cif"))
    AseAtomsAdaptor.get_structure(bulk("Tc", "hcp", a=2.74, c=4.4)).to(filename=str(inputs / "Tc.cif"))
    (inputs / "broken.cif").write_text("not a cif")
    config = tmp_path / "dft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dft": {"ecut": 250, "kpts": [3, 3, 3], "relax_max_steps": 10},
                "ray": {"num_cpus": 2},
                "tracking": {"uri": mlflow_uri(tmp_path / "mlflow.db"), "experiment": "dft"},
            }
        )
    )
    out = tmp_path / "out"
    args = ["dft", "--structures", str(inputs), "--relax", "--bandgap", "--config", str(config), "--out", str(out)]
    assert main(args) == 0
    rows = {r["id"]: r for r in csv.DictReader((out / "dft_results.csv").open())}
    assert rows["Si"]["status"] == "ok"
    assert 0.3 < float(rows["Si"]["band_gap"]) < 1.0 and rows["Si"]["gap_direct"] == "False"
    # Si against its own reference: 0 up to the relaxations' convergence
    assert abs(float(rows["Si"]["e_form_per_atom"])) < 1e-3
    assert "no PBE PAW setup" in rows["Tc"]["failure_reason"]
    assert "unreadable structure file" in rows["broken"]["failure_reason"]
    assert (out / "logs" / "Si.txt").is_file()
    # a rerun skips what is done and keeps the results
    capsys.readouterr()
    assert main(args) == 0
    assert "  Si: ok" not in capsys.readouterr().out
    assert {r["id"] for r in csv.DictReader((out / "dft_results.csv").open())} == {"Si", "Tc", "broken"}


def test_validate_cli_writes_report(tmp_path, capsys):
    predictions = tmp_path / "pred.csv"
    with predictions.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "formula", "status", "e_form_per_atom"])
        writer.writerow(["a", "GaAs", "ok", -0.30])  # MP -0.347
        writer.writerow(["b", "AsGa", "ok", -0.40])  # same formula, other spelling
        writer.writerow(["c", "Xx3", "ok", -1.0])  # never matched: listed
        writer.writerow(["d", "GaN", "failed", ""])  # no value: skipped with a note
    out = tmp_path / "report"
    args = [
        "validate",
        "--predictions",
        str(predictions),
        "--reference",
        "mp",
        "--property",
        "formation_energy",
        "--out",
        str(out),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "matched 2 predictions" in text and "1 unmatched" in text
    report = (out / "report.md").read_text()
    assert "Xx3" in report
    assert (out / "parity.png").is_file() and (out / "report.html").is_file()
    assert "d,GaN,,no e_form_per_atom value (status failed)" in (out / "skipped_predictions.csv").read_text()
    matches = list(csv.DictReader((out / "matches.csv").open()))
    errors = sorted(round(float(m["error"]), 3) for m in matches)
    assert errors == pytest.approx([-0.053, 0.047], abs=0.002)


def test_validate_bad_column_is_clear(tmp_path, capsys):
    predictions = tmp_path / "pred.csv"
    predictions.write_text("id,formula,energy\na,GaAs,1.0\n")
    args = [
        "validate",
        "--predictions",
        str(predictions),
        "--reference",
        "mp",
        "--property",
        "formation_energy",
        "--out",
        str(tmp_path / "r"),
        "--no-mlflow",
    ]
    assert main(args) == 2
    assert "pass --column, one of: id, formula, energy" in capsys.readouterr().err


def test_band_gaps_are_compared_like_with_like(tmp_path, capsys):
    predictions = tmp_path / "pred.csv"
    predictions.write_text("id,formula,gap_pbe,gap_expt\na,GaAs,0.5,1.4\nb,ZnO,0.8,3.3\nc,Si,0.6,1.1\n")
    base = ["validate", "--predictions", str(predictions), "--property", "band_gap", "--no-mlflow"]
    # experimental reference: gap_expt by default, named in the report
    assert main([*base, "--reference", "borlido", "--out", str(tmp_path / "expt")]) == 0
    assert "column gap_expt vs borlido" in (tmp_path / "expt" / "report.md").read_text()
    # PBE reference: gap_pbe by default
    assert main([*base, "--reference", "borlido", "--method", "PBE", "--out", str(tmp_path / "pbe")]) == 0
    assert "column gap_pbe vs borlido" in (tmp_path / "pbe" / "report.md").read_text()
    capsys.readouterr()
    # PBE predictions against experiment: refused unless asked for
    mixed = [*base, "--reference", "borlido", "--column", "gap_pbe", "--out", str(tmp_path / "mixed")]
    assert main(mixed) == 2
    assert "holds PBE gaps but borlido holds experiment ones" in capsys.readouterr().err
    assert main([*mixed, "--allow-fidelity-mismatch"]) == 0
