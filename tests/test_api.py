"""The notebook API (pipelines.api): a real screen (local Ray, CHGNet, MLflow SQLite in tmp) returned as a DataFrame,
load_results on finished, interrupted and foreign folders, predict_gaps with the shipped ensemble."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ase.build import bulk
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.errors import InputError
from pipelines.api import INPUTS_DIR, NotAScreenError, load_results, predict_gaps, screen
from pipelines.screen import ResumeError
from pipelines.store import RESULT_COLUMNS

SI_START_A = 5.60  # Å, strained from CHGNet's ~5.47 so that the relaxation visibly shrinks the cell
GAAS_START_A = 5.90  # Å, CHGNet relaxes it to ~5.75


def _si() -> Structure:
    return AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=SI_START_A))


def _gaas(a: float = GAAS_START_A) -> Structure:
    conventional = Structure.from_spacegroup("F-43m", Lattice.cubic(a), ["Ga", "As"], [[0, 0, 0], [0.25] * 3])
    return conventional.get_primitive_structure()


def _overlapping() -> Structure:
    return Structure(Lattice.cubic(4.0), ["Ga", "As"], [[0, 0, 0], [0.02, 0, 0]])


def _fcc_lattice_constant(structure: Structure) -> float:
    """Cubic a (Å) of a 2-atom fcc primitive cell (diamond, zincblende): V_primitive = a^3 / 4."""
    return (4 * structure.volume * 2 / len(structure)) ** (1 / 3)


@pytest.fixture(scope="module")
def screened(tmp_path_factory, mlflow_uri) -> tuple[pd.DataFrame, Path]:
    tmp = tmp_path_factory.mktemp("api")
    config_path = tmp / "screen.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "name": "test-api",
                "relax": {"fmax": 0.05, "max_steps": 200},
                "ray": {"num_cpus": 2, "num_workers": 1, "chunk_size": 2},
                "tracking": {"uri": mlflow_uri(tmp / "mlruns" / "mlflow.db"), "experiment": "test"},
            }
        )
    )
    out = tmp / "out"
    frame = screen([_si(), _gaas(), _overlapping()], config_path, out_dir=out)
    return frame, out


@pytest.mark.slow
def test_screen_frame_matches_csv_and_carries_relaxed_structures(screened):
    frame, out = screened
    # default ids: input position + formula, so id order (the CSV's) is input order
    assert list(frame["id"]) == ["000-Si", "001-GaAs", "002-GaAs"]
    assert list(frame["status"]) == ["ok", "ok", "failed"]
    assert "min_distance" in frame.loc[2, "failure_reason"] and frame.loc[2, "structure"] is None
    assert sorted(p.name for p in (out / INPUTS_DIR).iterdir()) == ["000-Si.json", "001-GaAs.json", "002-GaAs.json"]

    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == list(frame["id"])
    assert list(frame.columns) == [*rows[0], "structure"] and list(frame.columns[: len(RESULT_COLUMNS)]) == list(
        RESULT_COLUMNS
    )
    for row, (_, record) in zip(rows, frame.iterrows(), strict=True):
        for column, text in row.items():
            value = record[column]
            if text == "":
                assert pd.isna(value), (row["id"], column, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value == pytest.approx(float(text), rel=1e-12), (row["id"], column)
            else:
                assert str(value) == text, (row["id"], column)

    for i, formula, a_range in ((0, "Si", (5.35, 5.55)), (1, "GaAs", (5.60, 5.85))):
        relaxed = frame.loc[i, "structure"]
        assert isinstance(relaxed, Structure) and relaxed.composition.reduced_formula == formula
        # the attached structure is the relaxed one: its volume is the CSV's, not the starting one
        assert relaxed.volume / len(relaxed) == pytest.approx(frame.loc[i, "volume_per_atom"], rel=1e-6)
        assert frame.loc[i, "volume_per_atom"] < 0.97 * frame.loc[i, "initial_volume_per_atom"]
        assert a_range[0] < _fcc_lattice_constant(relaxed) < a_range[1]
        assert frame.loc[i, "converged"] and frame.loc[i, "max_force"] <= 0.05 + 1e-9
    # an element's hull is the element itself (E_form 0): Si's E_hull is its E_form, CHGNet's error on Si against
    # MP's elemental energy (0.11 eV/atom measured); GaAs, a known ground state, on the MP hull within CHGNet's error
    assert frame.loc[0, "e_above_hull"] == pytest.approx(frame.loc[0, "e_form_per_atom"], abs=1e-9)
    assert abs(frame.loc[0, "e_form_per_atom"]) < 0.15 and abs(frame.loc[1, "e_above_hull"]) <= 0.15
    assert 0.8 < frame.loc[1, "gap_expt"] < 2.2


@pytest.mark.slow
def test_load_results_equals_the_screen_frame(screened):
    frame, out = screened
    loaded = load_results(out)
    assert loaded.attrs == {"out_dir": str(out), "finished": True}
    pd.testing.assert_frame_equal(loaded.drop(columns="structure"), frame.drop(columns="structure"))
    for a, b in zip(loaded["structure"], frame["structure"], strict=True):
        assert (a is None and b is None) or a == b


@pytest.mark.slow
def test_load_results_of_an_interrupted_screen_reads_the_store(screened, tmp_path):
    _, out = screened
    copy = tmp_path / "interrupted"
    shutil.copytree(out, copy)
    (copy / "results.csv").unlink()  # what a killed screen leaves: the store, no results.csv yet
    with pytest.warns(UserWarning, match="has not finished"):
        loaded = load_results(copy)
    finished = load_results(out)
    assert loaded.attrs["finished"] is False
    assert list(loaded.columns) == [*RESULT_COLUMNS, "structure"]
    assert list(loaded["id"]) == list(finished["id"]) and list(loaded["status"]) == list(finished["status"])
    ok = loaded["status"] == "ok"
    assert loaded.loc[ok, "energy_per_atom"].to_numpy() == pytest.approx(
        finished.loc[ok, "energy_per_atom"].to_numpy(), abs=1e-12
    )
    assert loaded.loc[0, "structure"] == finished.loc[0, "structure"]


@pytest.mark.slow
def test_screen_refuses_to_mix_screens_in_one_folder(screened):
    _, out = screened
    before = {p.name: p.read_text() for p in (out / INPUTS_DIR).iterdir()}
    config = yaml.safe_load((out.parent / "screen.yaml").read_text())
    # other structures into a folder holding results: refused before any work, inputs untouched
    with pytest.raises(InputError, match="other inputs"):
        screen([_gaas(5.7)], config, out_dir=out)
    assert {p.name: p.read_text() for p in (out / INPUTS_DIR).iterdir()} == before
    # the same structures again without resume: refused, saying how to continue from Python
    with pytest.raises(ResumeError, match=r"resume=True"):
        screen([_si(), _gaas(), _overlapping()], config, out_dir=out)


def test_load_results_names_a_folder_that_is_not_a_screen(tmp_path):
    plain = tmp_path / "not_a_screen"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello\n")
    with pytest.raises(NotAScreenError, match="not_a_screen.*not a screen output folder"):
        load_results(plain)
    assert not (plain / "results.sqlite").exists()  # looking creates nothing
    (plain / "results.sqlite").write_text("not a database")
    with pytest.raises(
        NotAScreenError, match=r"not_a_screen/results\.sqlite is not a screen's result store \(file is not a database\)"
    ):
        load_results(plain)
    with pytest.raises(NotAScreenError, match="missing_folder: no such folder"):
        load_results(tmp_path / "missing_folder")
    assert isinstance(NotAScreenError("x"), InputError)


@pytest.mark.parametrize(
    ("structures", "ids", "message"),
    [
        ([], None, "list is empty"),
        ([bulk("Si", "diamond", a=5.43)], None, "AseAtomsAdaptor"),
        ([_si(), _si()], ["a", "A"], "repeat"),
        ([_si()], ["../escape"], "without /"),
        ([_si()], ["a", "b"], "one id per structure"),
    ],
)
def test_screen_rejects_bad_structures_before_any_work(tmp_path, structures, ids, message):
    with pytest.raises(InputError, match=message):
        screen(structures, {"tracking": {"enabled": False}}, out_dir=tmp_path / "out", ids=ids)
    assert not (tmp_path / "out" / "results.sqlite").exists()


def test_predict_gaps_keeps_input_order_and_errors_per_row():
    gaas = _gaas(5.65)
    frame = predict_gaps(["Si", gaas, "bad!!", Composition("ZnO"), 42])
    assert len(frame) == 5 and frame.loc[1, "input"] is gaas
    assert list(frame["formula"][:4]) == ["Si", "GaAs", "bad!!", "ZnO"]
    assert list(frame["error"].isna()) == [True, True, False, True, False]
    assert "bad!!" in frame.loc[2, "error"] and "int is not a formula" in frame.loc[4, "error"]
    for i in (2, 4):
        assert math.isnan(frame.loc[i, "gap_expt"]) and math.isnan(frame.loc[i, "gap_pbe"])
    # experimental gaps: Si 1.17, GaAs 1.42, ZnO 3.4 eV, within the ensemble's spread on such textbook compounds
    assert 0.6 < frame.loc[0, "gap_expt"] < 1.8 and 0.8 < frame.loc[1, "gap_expt"] < 2.2
    assert 2.3 < frame.loc[3, "gap_expt"] < 4.2
    assert frame.loc[0, "gap_expt_lo"] <= frame.loc[0, "gap_expt"] <= frame.loc[0, "gap_expt_hi"]
    # composition is all the model sees: a Structure gets its formula's numbers (float32: batch order moves ~1e-7)
    by_formula = predict_gaps("GaAs")
    assert len(by_formula) == 1 and frame.loc[1, "gap_expt"] == pytest.approx(by_formula.loc[0, "gap_expt"], abs=1e-5)
