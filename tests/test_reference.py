from __future__ import annotations

import re

import pytest
from ase.build import bulk
from pymatgen.io.ase import AseAtomsAdaptor

from materials.composition import recapitalised_formulas, reduced_formula
from materials.datasets.records import ReferenceRow, ReferenceSet
from materials.datasets.reference_data import (
    EV_IN_KJ_PER_MOL,
    LabDataError,
    borlido_methods,
    load_lab_csv,
    load_reference,
)

HEADER = "formula,property,value,unit,uncertainty,source"


def write_csv(tmp_path, *lines: str, name: str = "lab.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


# --- shipped sets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prop", "method", "n_rows", "policy"),
    [
        ("borlido", "band_gap", None, 464, "ground_state"),
        ("borlido", "band_gap", "PBE", 464, "ground_state"),
        ("borlido", "band_gap", "QSGW", 146, "ground_state"),
        ("zhuo", "band_gap", None, 6354, "mean"),
        ("mp", "band_gap", None, 119935, "ground_state"),
        ("mp", "formation_energy", None, 106069, "ground_state"),
    ],
)
def test_shipped_reference_sets_load_offline(name, prop, method, n_rows, policy):
    ref = load_reference(name, prop, method=method)
    assert len(ref) == n_rows
    assert ref.duplicate_policy == policy
    assert len({r.id for r in ref.rows}) == n_rows  # ids unique
    assert ref.unit == {"band_gap": "eV", "formation_energy": "eV/atom"}[prop]


def test_borlido_columns_and_values():
    exp = {r.mp_id: r for r in load_reference("borlido", "band_gap").rows}
    pbe = {r.mp_id: r for r in load_reference("borlido", "band gap", method="pbe").rows}
    # GaAs, mp-2534: experiment 1.52 eV; PBE 0.57 eV (Borlido's own PBE calculation, not MP's 0.19 eV)
    assert exp["mp-2534"].formula == "GaAs"
    assert exp["mp-2534"].value == pytest.approx(1.52)
    assert exp["mp-2534"].method == "experiment" and exp["mp-2534"].source.startswith("doi:10.")
    assert pbe["mp-2534"].method == "PBE" and pbe["mp-2534"].value == pytest.approx(0.57)
    assert exp["mp-2534"].e_form_per_atom == pytest.approx(-0.347249)
    assert "HSE06" in borlido_methods() and "Experimental" in borlido_methods()
    with pytest.raises(ValueError, match="no method 'B3LYP'.*HSE06"):
        load_reference("borlido", "band_gap", method="B3LYP")
    with pytest.raises(ValueError, match="band gaps only"):
        load_reference("zhuo", "formation_energy")


def test_formulas_are_pymatgen_reduced():
    assert reduced_formula("CuInSe2") == reduced_formula("InCuSe2") == "InCuSe2"
    assert reduced_formula("Ga2As2") == "GaAs"
    zhuo = load_reference("zhuo", "band_gap")
    assert all(r.formula == reduced_formula(r.formula) for r in zhuo.rows[:200])
    for bad in ["", "GaAs)", "Xy2", "gaas"]:
        with pytest.raises(ValueError):
            reduced_formula(bad)


def test_row_and_set_round_trip():
    gaas = AseAtomsAdaptor.get_structure(bulk("GaAs", "zincblende", a=5.65))
    row = ReferenceRow("x1", "GaAs", 1.52, 0.01, "experiment", "doi:x", "mp-2534", gaas, -0.35)
    back = ReferenceRow.from_dict(row.as_dict())
    assert back.structure == gaas
    assert back.as_dict() == row.as_dict()
    ref = ReferenceSet("lab", "band_gap", [row], "mean", "lab data", ["a note"])
    assert ReferenceSet.from_dict(ref.as_dict()).as_dict() == ref.as_dict()
    with pytest.raises(ValueError, match="property"):
        ReferenceSet("lab", "mobility", [])


# --- lab CSV --------------------------------------------------------------------------------------------------


def test_lab_csv_converts_units(tmp_path):
    path = write_csv(
        tmp_path,
        "Formula, Property ,value,unit,uncertainty,source,id",
        "CuInSe2,band_gap,1040,meV,20,doi:10.1/abc,cis",
        "GaAs,band gap,1.52,eV,,handbook,gaas",
    )
    ref = load_lab_csv(path)
    assert ref.property == "band_gap" and ref.name == "lab.csv" and ref.duplicate_policy == "mean"
    cis, gaas = ref.rows
    assert (cis.id, cis.formula, cis.method) == ("cis", "InCuSe2", "experiment")
    assert cis.value == pytest.approx(1.04) and cis.uncertainty == pytest.approx(0.02)
    assert gaas.uncertainty is None and gaas.value == 1.52

    path = write_csv(
        tmp_path,
        HEADER,
        "GaAs,formation_energy,-371,meV/atom,5,x",
        "GaAs,formation_energy,-96.48533212,kJ/mol-atom,,x",
        "GaAs,formation_energy,-100,kJ/mol-fu,,x",  # per formula unit GaAs = 2 atoms
        name="eform.csv",
    )
    rows = load_lab_csv(path).rows
    assert rows[0].value == pytest.approx(-0.371) and rows[0].uncertainty == pytest.approx(0.005)
    assert rows[1].value == pytest.approx(-1.0)
    assert rows[2].value == pytest.approx(-100 / EV_IN_KJ_PER_MOL / 2)
    assert rows[0].id == "eform.csv:2"  # default id: file name and line


def test_lab_csv_structure_file(tmp_path):
    gaas = AseAtomsAdaptor.get_structure(bulk("GaAs", "zincblende", a=5.65))
    (tmp_path / "structs").mkdir()
    gaas.to(filename=str(tmp_path / "structs" / "GaAs.cif"))
    path = write_csv(
        tmp_path,
        "structure_file,formula,property,value,unit,source",
        "structs/GaAs.cif,,band_gap,1.52,eV,x",
        "structs/GaAs.cif,GaAs,band_gap,1.50,eV,y",
    )
    rows = load_lab_csv(path).rows
    assert rows[0].formula == "GaAs" and len(rows[0].structure) == 2
    assert rows[1].structure is not None


BAD_INPUTS = [
    # (data lines after the header or None to replace the header, line named, fragment of the message)
    (["GaAs,band_gap,1.5,eV"], None, 1, r"missing column\(s\) source"),
    (["GaAs,band_gap,1.5,MeV,,x"], HEADER, 2, r"unknown unit 'MeV' for band_gap; use one of eV, meV"),
    (["GaAs,formation_energy,-30,kJ/mol,,x"], HEADER, 2, r"unknown unit 'kJ/mol'.*per mole of atoms or"),
    (["GaAs,formation_energy,-0.3,eV,,x"], HEADER, 2, r"unknown unit 'eV' for formation_energy"),
    (["GaAs,mobility,1.5,eV,,x"], HEADER, 2, r"unknown property 'mobility'"),
    (["GaAs,band_gap,1.5 eV,eV,,x"], HEADER, 2, r"value '1.5 eV' is not a finite number"),
    (["GaAs,band_gap,nan,eV,,x"], HEADER, 2, r"value 'nan' is not a finite number"),
    (["GaAs,band_gap,-0.2,eV,,x"], HEADER, 2, r"negative band gap -0.2"),
    (["Ga(As,band_gap,1.5,eV,,x"], HEADER, 2, r"formula 'Ga\(As' cannot be parsed"),
    (["Xy2,band_gap,1.5,eV,,x"], HEADER, 2, r"formula 'Xy2' cannot be parsed"),
    (["gaas,band_gap,1.5,eV,,x"], HEADER, 2, r"formula 'gaas' cannot be parsed.*did you mean 'GaAs'\?"),
    (["GaAs,band_gap,1.5,eV,-0.1,x"], HEADER, 2, r"uncertainty '-0.1' is not a number >= 0"),
    (["GaAs,band_gap,1.5,eV,,"], HEADER, 2, r"empty source"),
    ([",band_gap,1.5,eV,,x"], HEADER, 2, r"neither formula nor structure_file"),
    (["GaAs,band_gap,1.5,eV,x"], HEADER, 2, r"5 fields, header has 6"),
    (["GaAs,band_gap,1.5,eV,,x", "GaAs,formation_energy,-0.3,eV/atom,,x"], HEADER, None, r"several properties"),
    ([], HEADER, None, r"no data rows"),
    (["GaAs,band_gap,1.5,eV,,x"], HEADER + ",comment", 1, r"unknown column\(s\) 'comment'"),
]


@pytest.mark.parametrize(("rows", "header", "line", "fragment"), BAD_INPUTS)
def test_lab_csv_bad_input_names_the_line(tmp_path, rows, header, line, fragment):
    header = header or "formula,property,value,unit"
    path = write_csv(tmp_path, header, *rows)
    with pytest.raises(LabDataError) as info:
        load_lab_csv(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert re.search(fragment, message), message
    assert "header as line 1" in message
    if line is not None:
        assert any(e.startswith(f"line {line}") for e in info.value.errors), info.value.errors


def test_lab_csv_missing_structure_file_and_every_bad_line_listed(tmp_path):
    path = write_csv(
        tmp_path,
        "structure_file,property,value,unit,source",
        "missing.cif,band_gap,1.0,eV,x",
        "",  # blank lines are skipped but still counted
        "missing.cif,band_gap,-1.0,eV,x",
    )
    with pytest.raises(LabDataError) as info:
        load_lab_csv(path)
    errors = info.value.errors
    assert errors[0].startswith("line 2: structure_file 'missing.cif' not found")
    assert "relative to the CSV's folder" in errors[0]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 4", "line 4"]  # missing file, negative gap


def test_lab_csv_formula_must_agree_with_structure(tmp_path):
    AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.43)).to(filename=str(tmp_path / "Si.cif"))
    path = write_csv(tmp_path, "structure_file,formula,property,value,unit,source", "Si.cif,GaAs,band_gap,1,eV,x")
    with pytest.raises(LabDataError, match=r"line 2: formula 'GaAs' \(GaAs\) disagrees with structure_file"):
        load_lab_csv(path)


def test_lab_csv_property_selection_and_load_reference(tmp_path):
    path = write_csv(
        tmp_path, HEADER, "GaAs,band_gap,1.52,eV,,x", "GaAs,formation_energy,-0.35,eV/atom,,x", "Si,gap,1.12,eV,,y"
    )
    gaps = load_reference(path, "band_gap")
    assert [r.formula for r in gaps.rows] == ["GaAs", "Si"]
    assert gaps.notes == ["1 rows of other properties left out"]
    assert len(load_lab_csv(path, property="formation_energy")) == 1
    with pytest.raises(LabDataError, match="file not found"):
        load_lab_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="method"):
        load_reference(path, "band_gap", method="PBE")


def test_recapitalised_formulas_read_case_typos_only():
    assert recapitalised_formulas("si") == ["Si", "SI"]  # fewest element symbols first
    assert recapitalised_formulas("GAAS") == ["GaAs"]
    assert recapitalised_formulas("li0.5coo2") == ["Li0.5CoO2", "Li0.5COO2"]
    assert recapitalised_formulas("BA(NO3)2")[0] == "Ba(NO3)2"  # not nobelium
    assert recapitalised_formulas("CUINSE2", limit=1) == ["CuInSe2"]
    for fine_or_hopeless in ("Si", "SI", "GaAs", "Xx2", "", "123"):
        assert recapitalised_formulas(fine_or_hopeless) == [], fine_or_hopeless
