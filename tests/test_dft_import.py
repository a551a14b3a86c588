"""Importing existing DFT: real VASP vasprun.xml files (from ASE's test data) and extxyz written by ASE."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from materials.datasets.reference_data import load_reference
from materials.dft import importers as dft_import
from materials.dft.importers import DFTImportError
from pipelines.cli import main

VASP = Path(__file__).parent / "data" / "vasp"


def test_vasprun_values_read_from_the_file():
    c = dft_import.read_vasprun(VASP / "C_diamond" / "vasprun.xml", item_id="C")
    # numbers as VASP wrote them
    assert c.energy == pytest.approx(-20.24010135)
    assert c.band_gap == pytest.approx(5.5504, abs=1e-4) and c.gap_direct is False
    assert c.functional == "LDA"  # no GGA tag and LDA POTCARs ("PAW C", not "PAW_PBE C")
    assert c.settings["encut"] == 400.0 and c.details["kpts"] == [[4, 4, 4]]
    # primitive diamond cell: conventional a = sqrt(2) * 2.524 = 3.570 Å
    assert c.structure.lattice.a * np.sqrt(2) == pytest.approx(3.570, abs=0.001)
    # VASP -166.0 kBar (pressure sign) -> +16.6 GPa in ASE's sign
    assert c.stress[:3] == pytest.approx([16.5996] * 3, abs=1e-3) and c.stress[3:] == pytest.approx([0, 0, 0])
    assert c.forces.shape == (2, 3) and c.converged is True
    nacl = dft_import.read_vasprun(VASP / "NaCl" / "vasprun.xml")
    assert nacl.functional == "PBE" and nacl.formula == "NaCl"
    assert nacl.energy_per_atom == pytest.approx(-6.74587304 / 2)
    assert nacl.band_gap == pytest.approx(5.4988, abs=1e-4) and nacl.gap_direct is True


def test_folder_import_is_a_reference_for_validate(tmp_path, capsys):
    ref = load_reference(VASP, "band_gap")
    values = {row.formula: row.value for row in ref.rows}
    assert values == pytest.approx({"C": 5.5504, "NaCl": 5.4988}, abs=1e-4)
    assert {row.method for row in ref.rows} == {"LDA", "PBE"}
    assert all(row.structure is not None for row in ref.rows)

    predictions = tmp_path / "pred.csv"
    with predictions.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["id", "formula", "band_gap"], ["a", "NaCl", 5.0], ["b", "C", 4.5], ["c", "GaAs", 1.0]])
    out = tmp_path / "report"
    args = ["validate", "--predictions", str(predictions), "--reference", str(VASP), "--property", "band_gap"]
    assert main(args + ["--out", str(out), "--no-mlflow"]) == 0
    report = (out / "report.md").read_text()
    assert "GaAs" in report  # the unmatched row is listed, not dropped
    out_text = capsys.readouterr().out
    assert "matched 2 predictions" in out_text
    assert f"mae                {(0.4988 + 1.0504) / 2:.3f}" in out_text


def _emt_frames() -> list:
    frames = []
    for atoms in (bulk("Cu", "fcc", a=3.61), bulk("Au", "fcc", a=4.08), bulk("CuAu", "rocksalt", a=5.2)):
        atoms.calc = EMT()
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        atoms.info.update({"functional": "EMT", "code": "ase-emt", "cutoff": 0})
        frames.append(atoms)
    return frames


def test_extxyz_formation_energy_against_its_own_elements(tmp_path):
    frames = _emt_frames()
    path = tmp_path / "set.extxyz"
    write(path, frames, format="extxyz")
    result = dft_import.import_dft(path)
    assert [r.id for r in result.records] == ["set:0", "set:1", "set:2"] and result.failures == []
    e = dft_import.formation_energies(result.records)
    e_cu, e_au, e_cuau = (f.get_potential_energy() / len(f) for f in frames)
    assert e["set:2"] == pytest.approx(e_cuau - 0.5 * (e_cu + e_au), abs=1e-9)
    assert e["set:0"] == pytest.approx(0.0) and e["set:1"] == pytest.approx(0.0)
    # forces and stress round-trip (stress in GPa)
    assert np.allclose(result.records[2].forces, frames[2].calc.results["forces"])
    assert result.records[2].stress[0] == pytest.approx(frames[2].calc.results["stress"][0] * 160.21766, rel=1e-6)


def test_frames_without_energy_fail_alone_and_mixed_settings_refuse(tmp_path):
    frames = _emt_frames()
    bare = bulk("Ag", "fcc", a=4.09)
    bare.info["functional"] = "EMT"
    write(tmp_path / "mixed.extxyz", frames + [bare], format="extxyz")
    result = dft_import.import_dft(tmp_path)
    assert len(result.records) == 3
    ((where, why),) = result.failures
    assert where.endswith("mixed.extxyz:3") and "has no energy" in why and "Ag" in why

    frames[1].info["cutoff"] = 500  # Au computed with another cutoff
    write(tmp_path / "mixed.extxyz", frames, format="extxyz")
    records = dft_import.import_dft(tmp_path / "mixed.extxyz").records
    with pytest.raises(DFTImportError, match=r"differ:[\s\S]*mixed:1"):
        dft_import.formation_energies(records)
    with pytest.raises(DFTImportError, match="no elemental reference for Au"):
        dft_import.formation_energies([records[0], records[2]])
    (tmp_path / "junk.extxyz").write_text("not an xyz file\n")
    with pytest.raises(DFTImportError, match="nothing could be imported"):
        dft_import.import_dft(tmp_path / "junk.extxyz")
    with pytest.raises(DFTImportError, match="no such file"):
        dft_import.import_dft(tmp_path / "absent")


def test_import_dft_cli_writes_results_and_training_set(tmp_path, capsys):
    write(tmp_path / "emt.extxyz", _emt_frames(), format="extxyz")
    out = tmp_path / "out"
    assert main(["import-dft", str(tmp_path / "emt.extxyz"), "--out", str(out)]) == 0
    rows = {r["id"]: r for r in csv.DictReader((out / "dft_results.csv").open())}
    assert set(rows) == {"emt:0", "emt:1", "emt:2"}
    e_cu, e_au, e_cuau = (float(rows[f"emt:{i}"]["energy_per_atom"]) for i in range(3))
    assert float(rows["emt:2"]["e_form_per_atom"]) == pytest.approx(e_cuau - (e_cu + e_au) / 2, abs=1e-9)
    assert float(rows["emt:2"]["e_form_per_atom"]) > 0.3  # rock-salt CuAu at 5.2 Å is far from stable in EMT
    assert rows["emt:0"]["functional"] == "EMT" and rows["emt:0"]["task"] == "imported"
    # the written extxyz is itself importable with the same energies (a training set)
    again = dft_import.import_dft(out / "structures.extxyz").records
    assert [r.id for r in again] == ["emt:0", "emt:1", "emt:2"]
    assert again[2].energy == pytest.approx(float(rows["emt:2"]["energy_per_atom"]) * 2)
    assert dft_import.data_hash(again) == dft_import.data_hash(dft_import.import_dft(tmp_path / "emt.extxyz").records)
