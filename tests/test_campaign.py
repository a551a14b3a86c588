"""Campaign end to end with the table oracle on a ~200-row pool: real Ray, real MLflow, resume, bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from pipelines.campaign import CampaignError, CampaignStore, run_campaign
from pipelines.config import ConfigError, parse_campaign_config

pytestmark = pytest.mark.slow

EMERY = Path(__file__).resolve().parents[1] / "materials" / "data" / "emery2017_abo3_perovskites.csv.gz"


@pytest.fixture(scope="module")
def pool_csv(tmp_path_factory) -> Path:
    """200 perovskites (every 24th row) plus two rows with unparseable formulas."""
    with gzip.open(EMERY, "rt", newline="") as handle:
        rows = list(csv.DictReader(handle))
    subset = rows[::24][:200]
    subset.append({**subset[0], "formula": "Xx2O3", "": "bad1"})
    subset.append({**subset[1], "formula": "", "": "bad2"})
    path = tmp_path_factory.mktemp("pool") / "pool.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(subset[0]))
        writer.writeheader()
        writer.writerows(subset)
    return path


def config_for(pool: Path, tmp_path: Path, **optimizer):
    return parse_campaign_config(
        {
            "name": "test-campaign",
            "seed": 3,
            "pool": {"csv": str(pool), "formula_column": "formula"},
            # a wide window so a 200-row pool has enough hits to count
            "objective": {"target": "gap pbe", "low": 0.5, "high": 3.0, "stable": "e_hull", "stable_max": 0.1},
            "optimizer": {"method": "bo", "batch_size": 4, "n_init": 6, "budget": 22, **optimizer},
            "oracle": {"kind": "table"},
            "ray": {"num_cpus": 2},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "campaign-test"},
        }
    )


def read_evaluations(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "evaluations.csv").open()))


def test_campaign_end_to_end_and_resume(pool_csv, tmp_path):
    import mlflow

    config = config_for(pool_csv, tmp_path)
    full = run_campaign(config, out_dir=tmp_path / "full")
    rows = read_evaluations(tmp_path / "full")
    assert full.n_pool == 200 and full.n_skipped == 2
    skipped = json.loads((tmp_path / "full" / "skipped_pool_rows.json").read_text())
    assert {s["formula"] for s in skipped} == {"Xx2O3", ""}
    assert len(rows) == 22 == full.n_evaluated  # 6 initial + 4 batches of 4
    assert len({r["id"] for r in rows}) == 22  # never proposed twice
    assert {r["iteration"] for r in rows} == {str(i) for i in range(5)}
    for r in rows:  # a hit is what the objective says it is
        gap, ehull = float(r["gap pbe"]), float(r["e_hull"])
        assert (r["hit"] == "1") == (0.5 <= gap <= 3.0 and ehull <= 0.1)
    assert full.trace[-1] == full.n_hits == sum(r["hit"] == "1" for r in rows)

    mlflow.set_tracking_uri(config.tracking.uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(full.mlflow_run_id)
    assert parent.data.metrics["n_evaluated"] == 22 and parent.data.params["optimizer.batch_size"] == "4"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{full.mlflow_run_id}'"
    )
    assert len(children) == 5
    bo_child = next(c for c in children if c.data.params["kind"] == "bo")
    assert any(k.startswith("gp_") for k in bo_child.data.metrics)
    assert "acquisition_max" in bo_child.data.metrics
    assert {a.path for a in client.list_artifacts(full.mlflow_run_id)} >= {"evaluations.csv", "bo_trace.png"}

    # a folder holding another campaign is never mixed with this one
    with pytest.raises(CampaignError, match="different settings"):
        run_campaign(config_for(pool_csv, tmp_path, budget=30), out_dir=tmp_path / "full", resume=True)


def test_resume_after_a_crash_mid_iteration_matches_uninterrupted(pool_csv, tmp_path):
    config = config_for(pool_csv, tmp_path)
    reference = read_evaluations(run_campaign(config, out_dir=tmp_path / "ref").out_dir)
    out = tmp_path / "crash"
    run_campaign(config, out_dir=out)
    # simulate a crash: forget the last two iterations' results, and half of the one before
    db = CampaignStore(out / "campaign.sqlite")
    db._db.execute("DELETE FROM iterations WHERE iteration >= 3")
    db._db.execute("DELETE FROM evaluations WHERE iteration >= 3")
    cut = [r for r in db.evaluations() if r["iteration"] == 2][:2]
    for r in cut:
        db._db.execute("DELETE FROM evaluations WHERE pool_index = ?", (r["pool_index"],))
    db._db.commit()
    db.close()
    with pytest.raises(CampaignError, match="--resume"):
        run_campaign(config, out_dir=out)
    resumed = read_evaluations(run_campaign(config, out_dir=out, resume=True).out_dir)
    assert [r["id"] for r in resumed] == [r["id"] for r in reference]
    assert [r["hit"] for r in resumed] == [r["hit"] for r in reference]


def test_bad_campaign_input(pool_csv, tmp_path):
    with pytest.raises(ConfigError, match="smaller than the initial design"):
        config_for(pool_csv, tmp_path, budget=4, n_init=6)
    bad = config_for(pool_csv, tmp_path).model_copy(deep=True)
    bad.objective.target = "band_gap"
    with pytest.raises(CampaignError, match=r"'band_gap'.*available columns: .*'gap pbe'"):
        run_campaign(bad, out_dir=tmp_path / "bad")
    dft = config_for(pool_csv, tmp_path).model_copy(deep=True)
    dft.oracle.kind = "dft"
    with pytest.raises(CampaignError, match="dft needs structures"):
        run_campaign(dft, out_dir=tmp_path / "dft")


def test_dft_oracle_campaign_on_a_screened_pool(tmp_path):
    """MLIP screen builds the pool; GPAW band gaps are the expensive labels; MLIP E_hull is the gate."""
    pytest.importorskip("gpaw")
    config = parse_campaign_config(
        {
            "name": "dft-campaign",
            "candidates": {"prototypes": {"zincblende": [["Al", "Ga"], ["P", "As"]]}},
            "objective": {"target": "band_gap", "low": 1.0, "high": 3.0, "stable": "e_above_hull", "stable_max": 0.1},
            "optimizer": {"method": "bo", "batch_size": 1, "n_init": 2, "budget": 3},
            "oracle": {"kind": "dft"},
            "dft": {"ecut": 250, "kpts": [3, 3, 3]},
            "ray": {"num_cpus": 2, "num_workers": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "dft-campaign"},
        }
    )
    summary = run_campaign(config, out_dir=tmp_path / "out")
    rows = read_evaluations(tmp_path / "out")
    assert summary.n_pool == 4 and len(rows) == 3
    assert all(r["status"] == "ok" for r in rows), rows
    gaps = {r["formula"]: float(r["band_gap"]) for r in rows}
    # PBE gaps at low settings: all four are semiconductors with gaps between ~0.3 and ~2.5 eV
    assert all(0.2 < g < 3.0 for g in gaps.values()), gaps
    assert (tmp_path / "out" / "dft" / "dft_references").is_dir()
