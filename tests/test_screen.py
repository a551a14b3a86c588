"""End to end: a real local Ray, real CHGNet, a real MLflow store in a temp dir."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ase.build import bulk
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.datasets.sustainability import SUSTAINABILITY_COLUMNS
from materials.ml.bandgap import PREDICTION_COLUMNS
from pipelines.config import parse_config
from pipelines.screen import ResumeError, run_screen
from pipelines.store import RESULT_COLUMNS, ResultStore

pytestmark = pytest.mark.slow

SMALL = {
    "name": "test-screen",
    "candidates": {"prototypes": {"zincblende": [["Ga", "In", "Zn"], ["P", "As", "Se"]], "rocksalt": [["Ga"], ["As"]]}},
    "relax": {"fmax": 0.05, "max_steps": 200},
    "ray": {"num_cpus": 2, "num_workers": 2, "chunk_size": 2},
}


def small_config(tmp_path: Path, **changes):
    data = yaml.safe_load(yaml.safe_dump(SMALL))
    data["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "experiment": "test"}
    for key, value in changes.items():
        data[key] = value
    return parse_config(data)


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {row["id"]: row for row in csv.DictReader(path.open())}


def test_screen_end_to_end_with_mlflow(tmp_path, mlflow_uri):
    mlflow_uri(tmp_path / "mlruns" / "mlflow.db")  # the store small_config points at: empty, schema made once
    import mlflow

    config = small_config(tmp_path)
    summary = run_screen(config, out_dir=tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "results.csv")
    # the band-gap GNN's columns follow the screen's own
    assert tuple(next(iter(rows.values()))) == RESULT_COLUMNS + PREDICTION_COLUMNS + SUSTAINABILITY_COLUMNS
    gaas_supply = rows[
        "zincblende-GaAs"
    ]  # supply-chain columns (materials.datasets.sustainability): HHI 4,360, As Ga critical
    assert abs(float(gaas_supply["hhi_production"]) - 4360.5) < 1 and gaas_supply["critical_raw_materials"] == "As Ga"
    assert 0.8 < float(rows["zincblende-GaAs"]["gap_expt"]) < 2.2 and float(rows["zincblende-GaAs"]["p_metal"]) < 0.5
    # ZnP, GaSe... are not charge balanced: only the 4 III-V + ZnSe zincblendes + rocksalt GaAs
    assert set(rows) == {
        "zincblende-GaP",
        "zincblende-GaAs",
        "zincblende-InP",
        "zincblende-InAs",
        "zincblende-ZnSe",
        "rocksalt-GaAs",
    }
    assert all(r["status"] == "ok" for r in rows.values())
    # known ground states sit on the signed MP hull within CHGNet's error (benchmarks/stability_accuracy.py: max
    # 0.13 eV/atom over 50 ground states); rocksalt GaAs, a high-pressure phase, well above zincblende
    for key in ("zincblende-GaAs", "zincblende-InP", "zincblende-ZnSe"):
        assert abs(float(rows[key]["e_above_hull"])) <= 0.15, key
        assert rows[key]["warning"] == "", key
    assert float(rows["rocksalt-GaAs"]["e_above_hull"]) > float(rows["zincblende-GaAs"]["e_above_hull"]) + 0.15
    assert summary.n_stable >= 3 and summary.top[0]["e_above_hull"] <= 0.05
    assert summary.below_hull == [] and summary.references["source"] == "mp-2023"
    for row in rows.values():  # the screen's own hull is never below the signed one
        assert float(row["e_above_hull_screen"]) >= float(row["e_above_hull"]) - 1e-9
    assert (tmp_path / "out" / "structures" / "zincblende-GaAs.cif").is_file()

    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(summary.mlflow_run_id)
    assert run.data.params["relax.fmax"] == "0.05"
    assert run.data.metrics["n_ok"] == 6 and run.data.metrics["n_stable"] == summary.n_stable
    assert run.data.tags["potential"] == "chgnet-0.3.0" and run.data.tags["energy_convention"] == "mp2020"
    assert {r["energy_convention"] for r in rows.values()} == {"mp2020"}
    assert len(run.data.tags["potential_weights_hash"]) == 16
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.mlflow_run_id)}
    assert {"results.csv", "config.yaml", "e_above_hull.png", "stable_structures"} <= artifacts
    # the supply-chain split of the stable candidates: median HHI over the 6 relaxed rows; As is toxic, so the
    # arsenides are never low risk whatever their HHI
    hhis = sorted(float(r["hhi_production"]) for r in rows.values())
    supply = summary.supply
    assert supply.hhi_median == pytest.approx((hhis[2] + hhis[3]) / 2)
    stable = {k for k, r in rows.items() if float(r["e_above_hull"]) <= config.stability.stable_threshold}
    assert {c.id for c in supply.stable} == stable
    low = {k for k in stable if float(rows[k]["hhi_production"]) < supply.hhi_median and not rows[k]["toxic_elements"]}
    assert {c.id for c in supply.low_risk} == low and not {"zincblende-GaAs", "zincblende-InAs"} & low
    assert run.data.metrics["supply_n_stable_low_supply_risk"] == len(low)
    assert run.data.metrics["supply_hhi_production_median"] == pytest.approx(supply.hhi_median)
    assert {"supply_risk.json", "gap_vs_supply_risk.png"} <= artifacts
    report = json.loads((tmp_path / "out" / "supply_risk.json").read_text())
    assert [r["id"] for r in report["low_supply_risk"]] == [c.id for c in supply.low_risk]

    # a second run in the same folder must not silently redo or mix results
    with pytest.raises(ResumeError, match="--resume"):
        run_screen(config, out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ResumeError, match="different settings"):
        run_screen(small_config(tmp_path, relax={"fmax": 0.1}), out_dir=tmp_path / "out", progress=False)


def test_bad_inputs_are_recorded_and_the_batch_completes(tmp_path):
    folder = tmp_path / "structures"
    folder.mkdir()
    AseAtomsAdaptor.get_structure(bulk("GaAs", "zincblende", a=5.6)).to(filename=str(folder / "gaas.cif"))
    AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.4)).to(filename=str(folder / "POSCAR"))
    (folder / "garbage.cif").write_text("this is not a cif\n")
    Structure(Lattice.cubic(4.0), ["Ga", "As"], [[0, 0, 0], [0.02, 0, 0]]).to(filename=str(folder / "overlap.cif"))
    Structure(Lattice.cubic(30.0), ["Ga", "As"], [[0, 0, 0], [0.1, 0, 0]]).to(filename=str(folder / "vacuum.cif"))
    Structure(Lattice.cubic(3.5), ["Am"], [[0, 0, 0]]).to(filename=str(folder / "americium.cif"))
    config = small_config(tmp_path, tracking={"enabled": False})
    summary = run_screen(config, structures=str(folder), out_dir=tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert rows["gaas"]["status"] == "ok" and rows["POSCAR"]["status"] == "ok"
    assert "unreadable structure file" in rows["garbage"]["failure_reason"]
    assert "min_distance" in rows["overlap"]["failure_reason"]
    assert "volume per atom" in rows["vacuum"]["failure_reason"]
    assert "Am not supported" in rows["americium"]["failure_reason"]
    assert summary.n_ok == 2 and summary.n_failed == 4
    assert rows["gaas"]["source"].endswith("gaas.cif") and rows["gaas"]["prototype"] == "user"


def _stored(out: Path) -> int:
    db = out / "results.sqlite"
    if not db.exists():
        return 0
    try:
        return sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_interrupted_screen_resumes_to_identical_results(tmp_path, mlflow_uri, capsys):
    import ray

    from pipelines.cli import main

    data = yaml.safe_load(yaml.safe_dump(SMALL))
    data["candidates"]["prototypes"]["wurtzite"] = [["Ga", "In", "Al"], ["N", "P"]]
    data["ray"] = {"num_cpus": 1, "num_workers": 1, "chunk_size": 1, "max_in_flight_per_worker": 1}
    data["tracking"] = {"uri": mlflow_uri(tmp_path / "mlflow.db"), "experiment": "resume"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "pipelines.cli", "screen", str(cfg), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    expected = read_csv(tmp_path / "full" / "results.csv")
    assert len(expected) == 12

    out = tmp_path / "cut"

    def stop_after(stored: int, sig: int, extra: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(
            [*cmd, "--out", str(out), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 240
        while _stored(out) < stored and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the screen finished before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)

    def mlflow_status() -> str:
        import mlflow

        with ResultStore(out / "results.sqlite") as store:
            run_id = store.get_meta("mlflow_run_id")
        return mlflow.MlflowClient(data["tracking"]["uri"]).get_run(run_id).info.status

    cut = stop_after(3, signal.SIGINT, [])  # Ctrl-C
    assert cut.returncode == 130, cut.stderr[-2000:]
    assert "interrupted; results computed so far are saved; rerun the same command with --resume" in cut.stderr
    assert "Traceback" not in cut.stderr
    assert mlflow_status() == "KILLED"
    done_before = _stored(out)
    assert 3 <= done_before < 12
    assert not (out / "results.csv").exists()

    # the same command without --resume is refused (in this process: the refusal comes before any potential loads)
    capsys.readouterr()
    assert main(["screen", str(cfg), "--no-progress", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and not ray.is_initialized()
    # SIGTERM (Slurm's time limit, Kubernetes, kill) stops the resumed run the same way
    term = stop_after(done_before + 2, signal.SIGTERM, ["--resume"])
    assert term.returncode == 143, term.stderr[-2000:]
    assert "terminated (SIGTERM); results computed so far are saved" in term.stderr and "Traceback" not in term.stderr
    assert mlflow_status() == "KILLED"
    done_before = _stored(out)
    assert done_before < 12
    resumed = subprocess.run([*cmd, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({12 - done_before} relaxed this run" in resumed.stdout
    assert mlflow_status() == "FINISHED"
    got = read_csv(out / "results.csv")
    assert set(got) == set(expected)
    for key, row in expected.items():
        for col in ("status", "energy_per_atom", "e_form_per_atom", "e_above_hull", "relax_steps", "volume_per_atom"):
            assert got[key][col] == row[col], (key, col)


def test_uncorrected_model_screen_adds_mp2020_once(tmp_path, tiny_mace_path, mlflow_uri):
    """The tiny MACE declared ``uncorrected``: E_form = (E + MP2020 correction - MP elemental energies) / N, the
    convention recorded per row and as an MLflow tag (intermetallics carry no MP2020 correction: by hand it is
    the plain difference)."""
    mlflow_uri(tmp_path / "mlruns" / "mlflow.db")  # the store small_config points at: empty, schema made once
    import gzip
    import json
    from importlib import resources

    import mlflow
    from pymatgen.core import Composition

    folder = tmp_path / "structures"
    folder.mkdir()
    AseAtomsAdaptor.get_structure(bulk("NiAl", "cesiumchloride", a=2.88)).to(filename=str(folder / "nial.cif"))
    AseAtomsAdaptor.get_structure(bulk("Cu", "fcc", a=3.62)).to(filename=str(folder / "cu.cif"))
    config = small_config(
        tmp_path,
        potential={"name": "mace", "model": str(tiny_mace_path), "energy_convention": "uncorrected"},
        ray={"num_cpus": 1, "num_workers": 1},
    )
    summary = run_screen(config, structures=str(folder), out_dir=tmp_path / "out", progress=False)
    assert summary.n_ok == 2 and summary.references["convention"] == "uncorrected"
    rows = read_csv(tmp_path / "out" / "results.csv")
    with resources.files("materials.data").joinpath("mp_elemental_reference_entries.json.gz").open("rb") as raw:
        entries = json.loads(gzip.decompress(raw.read()))
    mu = {el: e["energy"] / Composition(e["composition"]).num_atoms for el, e in entries.items()}
    for key, formula in (("nial", "NiAl"), ("cu", "Cu")):
        comp = Composition(formula)
        by_hand = float(rows[key]["energy_per_atom"]) - sum(mu[el.symbol] * comp.get_atomic_fraction(el) for el in comp)
        assert float(rows[key]["e_form_per_atom"]) == pytest.approx(by_hand, abs=1e-6), key
        assert rows[key]["energy_convention"] == "uncorrected"
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(summary.mlflow_run_id)
    assert run.data.tags["energy_convention"] == "uncorrected"


@pytest.mark.parametrize(("limit", "fragment"), [("-1", "-1 is not >= 1"), ("0", "0 is not >= 1"), ("x", "'x' is not")])
def test_screen_limit_below_one_is_refused_before_anything_runs(tmp_path, capsys, limit, fragment):
    """``--limit -1`` used to screen all but the last item and ``--limit 0`` to log an empty MLflow run."""
    from pipelines.cli import main

    config = tmp_path / "screen.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["screen", str(config), "--limit", limit, "--out", str(out)])
    assert info.value.code == 2
    assert f"argument --limit: {fragment}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"limit=0: give a whole number >= 1"):  # the library refuses it too
        run_screen(small_config(tmp_path), limit=0, out_dir=out, progress=False)
    assert not out.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
