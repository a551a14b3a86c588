"""What a user meets when something goes wrong: one line on stderr, exit code 2 for a mistake in the input (1 for a
failed run), nothing stale left on disk, and a corrected rerun into the same folder that works.

Real parts: the CLI in-process, a real local Ray and MLflow store for the one screen that runs, real stores."""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import pkgutil
from pathlib import Path

import pytest
import yaml
from ase.build import bulk
from ase.io import write

import materials
import pipelines
from materials.errors import InputError, RunError, SemidiscError
from pipelines.cli import main
from pipelines.config import ConfigError, load_campaign_config, load_config
from pipelines.store import ResultStore, ScreenRow


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def screen_config(tmp_path: Path, potential: dict) -> dict:
    return {
        "name": "errors",
        "potential": potential,
        "relax": {"fmax": 0.05, "max_steps": 100},
        "ray": {"num_cpus": 1, "num_workers": 1, "chunk_size": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "errors"},
    }


@pytest.fixture
def cu_folder(tmp_path) -> Path:
    folder = tmp_path / "structures"
    folder.mkdir()
    write(folder / "Cu.cif", bulk("Cu", "fcc", a=3.7))
    return folder


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


def test_every_error_class_has_one_base_and_an_exit_code():
    found = {}
    for package in (materials, pipelines):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, Exception):
                    found[f"{module.__name__}.{name}"] = cls
    assert len(found) >= 17, sorted(found)
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, SemidiscError))
    assert outside == [], f"errors without the SemidiscError base: {outside}"
    for name, cls in found.items():
        assert cls.exit_code in (1, 2), name
        if issubclass(cls, InputError):
            assert cls.exit_code == 2 and issubclass(cls, ValueError), name
        if issubclass(cls, RunError):
            assert cls.exit_code == 1 and issubclass(cls, RuntimeError), name


@pytest.mark.slow
def test_unknown_potential_fails_at_once_and_a_corrected_rerun_reuses_the_folder(
    tmp_path, cu_folder, capsys, mlflow_uri
):
    mlflow_uri(tmp_path / "mlflow.db")  # the store screen_config points at: empty, schema made once
    import ray

    out = tmp_path / "out"
    bad = write_config(tmp_path / "bad.yaml", screen_config(tmp_path, {"name": "mace", "model": "no-such-model"}))
    argv = ["screen", str(bad), "--structures", str(cu_folder), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "no-such-model" in err and "foundation name" in err
    assert not ray.is_initialized(), "the potential is checked in the driver, before Ray starts"
    assert not out.exists(), "nothing is written before the inputs are valid"
    with pytest.raises(SemidiscError, match="no-such-model"):  # --debug: the exception and its traceback
        main(["--debug", *argv])

    # an earlier start that died before storing a result leaves a fingerprint: the folder is still reusable
    with ResultStore(out / "results.sqlite") as store:
        store.set_meta("fingerprint", "an-earlier-start")
    good = write_config(tmp_path / "good.yaml", screen_config(tmp_path, {"name": "emt"}))
    assert main(["screen", str(good), "--structures", str(cu_folder), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok"]
    # EMT relaxes fcc Cu to its own elemental reference: E_form = 0, on the hull
    assert float(rows[0]["e_form_per_atom"]) == pytest.approx(0.0, abs=1e-4)
    assert float(rows[0]["e_above_hull"]) == pytest.approx(0.0, abs=1e-4)


def test_foreign_resume_and_unwritable_out_are_one_line_errors(tmp_path, cu_folder, capsys):
    cfg = write_config(tmp_path / "c.yaml", screen_config(tmp_path, {"name": "emt"}))
    foreign = tmp_path / "foreign"
    with ResultStore(foreign / "results.sqlite") as store:
        store.set_meta("fingerprint", "another-screen")
        store.write([ScreenRow("x", "Si", "failed", "test")])
    base = ["screen", str(cfg), "--structures", str(cu_folder), "--no-progress"]
    assert main([*base, "--out", str(foreign), "--resume"]) == 2
    assert "holds a screen with different settings" in one_line(capsys.readouterr().err)
    with ResultStore(foreign / "results.sqlite") as store:
        assert len(store) == 1 and store.get_meta("fingerprint") == "another-screen"  # untouched
    # the folder is judged before the potential is loaded: a refused run costs no model load (nor its errors)
    unloadable = write_config(tmp_path / "m.yaml", screen_config(tmp_path, {"name": "mace", "model": "no-such-model"}))
    assert main(["screen", str(unloadable), "--structures", str(cu_folder), "--out", str(foreign)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "holds a screen with different settings" in err and "no-such-model" not in err

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert main([*base, "--out", str(a_file / "out")]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(a_file) in err


def test_campaign_wrong_column_is_one_line_and_writes_nothing(tmp_path, capsys):
    pool = tmp_path / "pool.csv"
    pool.write_text("composition,gap\nGaAs,1.4\nSi,1.1\n")
    cfg = write_config(
        tmp_path / "campaign.yaml",
        {
            "pool": {"csv": "pool.csv", "formula_column": "formula"},
            "objective": {"target": "gap", "low": 1.0, "high": 2.0},
            "optimizer": {"n_init": 2, "batch_size": 1, "budget": 3},
            "oracle": {"kind": "table"},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        },
    )
    out = tmp_path / "out"
    assert main(["campaign", str(cfg), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no formula column 'formula'" in err and "'composition'" in err
    assert not out.exists()


def test_input_paths_are_relative_to_the_config_file(tmp_path, tiny_mace_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "pool.csv").write_text("formula,gap\nGaAs,1.4\n")
    (folder / "data" / "tiny.model").write_bytes(tiny_mace_path.read_bytes())
    cfg = write_config(
        folder / "campaign.yaml",
        {
            "pool": {"csv": "data/pool.csv"},
            "objective": {"target": "gap", "low": 1.0, "high": 2.0},
            "optimizer": {"n_init": 1, "batch_size": 1, "budget": 2},
            "oracle": {"kind": "table"},
            "potential": {"name": "mace", "model": "data/tiny.model"},
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_campaign_config(cfg)
    assert Path(config.pool.csv).resolve() == (folder / "data" / "pool.csv").resolve()
    assert Path(config.potential.model).resolve() == (folder / "data" / "tiny.model").resolve()
    # outputs keep MLflow's convention: relative to where you run
    assert config.output_dir == "runs/campaign" and config.tracking.uri == "sqlite:///mlruns/mlflow.db"
    # names are not paths
    named = write_config(folder / "named.yaml", {"potential": {"name": "mace", "model": "medium-mpa-0"}})
    assert load_config(named).potential.model == "medium-mpa-0"

    # the old convention (relative to the working folder) is named, with the path to write instead
    monkeypatch.chdir(tmp_path / "project")
    old_data = {**yaml.safe_load(cfg.read_text()), "pool": {"csv": "configs/data/pool.csv"}}
    old = write_config(folder / "old.yaml", old_data)
    with pytest.raises(ConfigError, match=r"pool\.csv: 'configs/data/pool\.csv'.*write 'data/pool\.csv'"):
        load_campaign_config(old)


def test_one_csv_reader_accepts_a_byte_order_mark(tmp_path):
    from materials.datasets.records import read_csv_rows
    from pipelines.campaign import read_csv_rows as read_pool
    from pipelines.validate import read_predictions

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffid,formula,band_gap\nsi,Si,1.1\ngaas,GaAs,1.4\n".encode())
    assert read_csv_rows(path)[0] == {"id": "si", "formula": "Si", "band_gap": "1.1"}
    assert list(read_pool(path)[1]) == ["id", "formula", "band_gap"]
    preds, skipped = read_predictions(path, "band_gap", "band_gap")
    assert [(p.formula, p.value) for p in preds] == [("Si", 1.1), ("GaAs", 1.4)] and not skipped
    out = tmp_path / "gaps.csv"
    assert main(["predict-gap", "--input", str(path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["formula"] for r in rows] == ["Si", "GaAs"] and all(r["error"] == "" for r in rows)


def test_failure_reasons_reach_the_csv_without_terminal_colours(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.write([ScreenRow("a", None, "failed", "worker died: \x1b[31mRayActorError\x1b[0m: x")])
        store.export_csv(tmp_path / "results.csv")
    row = next(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert row["failure_reason"] == "worker died: RayActorError: x"
