"""Campaign end to end with the table oracle on a ~200-row pool: real Ray, real MLflow, resume, bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from pipelines.campaign import Campaign, CampaignError, CampaignStore, run_campaign
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


@pytest.fixture(autouse=True)
def _empty_mlflow_store(tmp_path, mlflow_uri):
    """The store config_for points at, created from the session's empty MLflow store (no schema migrations)."""
    mlflow_uri(tmp_path / "mlflow.db")


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
    cut = [r for r in db.evaluations() if r.iteration == 2][:2]
    for r in cut:
        db._db.execute("DELETE FROM evaluations WHERE pool_index = ?", (r.pool_index,))
    db._db.commit()
    db.close()
    with pytest.raises(CampaignError, match="--resume"):
        run_campaign(config, out_dir=out)
    resumed = read_evaluations(run_campaign(config, out_dir=out, resume=True).out_dir)
    assert [r["id"] for r in resumed] == [r["id"] for r in reference]
    assert [r["hit"] for r in resumed] == [r["hit"] for r in reference]


def test_campaign_object_steps_stop_and_resume_like_one_run(pool_csv, tmp_path):
    """The campaign as an object: open, resume, two steps, stopped (KILLED); reopened with resume it finishes with
    the same evaluations, in the same order, as one uninterrupted run_campaign."""
    config = config_for(pool_csv, tmp_path)
    reference = read_evaluations(run_campaign(config, out_dir=tmp_path / "ref").out_dir)
    out = tmp_path / "steps"
    first = Campaign.open(config, out)
    try:
        with pytest.raises(RuntimeError, match="before Campaign.resume"):
            first.step()
        first.resume()  # the initial design: 6 evaluations
        assert first.iteration == 1 and len(first.order) == 6
        assert first.step() and first.step()
        assert first.iteration == 3 and len(first.order) == 14
    finally:
        first.close("KILLED")
    assert [it for it, _, _ in CampaignStore(out / "campaign.sqlite").iterations()] == [0, 1, 2]
    with pytest.raises(CampaignError, match="--resume"):
        Campaign.open(config, out)
    second = Campaign.open(config, out, resume=True)
    try:
        second.resume()
        assert second.iteration == 3 and len(second.order) == 14
        steps = 0
        while second.step():
            steps += 1
        summary = second.finish()
    finally:
        second.close()
    assert steps == 2 and summary.n_evaluated == 22 and summary.iterations == 5
    resumed = read_evaluations(out)
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


def test_dft_oracle_computes_each_shared_elemental_reference_once(tmp_path):
    """SiGe and AlSi share Si: one batch relaxes Al, Ge and Si once each (the ledger counts real computations).
    (Elements with 1-2 atom symmetric references keep it fast; the compounds need only be ordered cells.)"""
    pytest.importorskip("gpaw")
    import ray
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    from materials.dft.gpaw import REFERENCE_LEDGER, DFTSettings
    from pipelines.config import RaySettings
    from pipelines.execution import init_ray
    from pipelines.oracles import DFTOracle

    files = []
    for formula, a in (("SiGe", 5.54), ("AlSi", 5.6)):
        path = tmp_path / f"{formula}.cif"
        AseAtomsAdaptor.get_structure(bulk(formula, "zincblende", a=a)).to(filename=str(path))
        files.append(str(path))
    rows = [{"id": "SiGe"}, {"id": "AlSi"}]
    # one BFGS step per reference: their numbers do not matter here, only how often they are computed
    settings = DFTSettings(ecut=250.0, kpts=(3, 3, 3), relax_max_steps=1)
    started = init_ray(RaySettings(num_cpus=2))
    try:
        oracle = DFTOracle(rows, files, ["dft_e_form_per_atom"], settings, False, tmp_path / "work")
        records = dict(oracle.evaluate([0, 1]))
    finally:
        if started:
            ray.shutdown()
    assert all(r.ok and r.failure_reason is None for r in records.values()), records
    # SiGe (unrelaxed, at these settings, MP2020 Si term included) lies near Si + Ge; zincblende AlSi above it
    sige, alsi = (records[i].labels["dft_e_form_per_atom"] for i in (0, 1))
    assert abs(sige) < 0.15 and alsi > sige, (sige, alsi)
    ledger = (oracle.reference_dir / REFERENCE_LEDGER).read_text().splitlines()
    assert sorted(json.loads(line)["symbol"] for line in ledger) == ["Al", "Ge", "Si"]


def test_forest_surrogate_campaign_with_oxidation_features(pool_csv, tmp_path):
    import hashlib

    from pipelines.campaign import campaign_fingerprint

    with pytest.raises(ConfigError, match="surrogate: forest needs optimizer.method: bo-hit"):
        config_for(pool_csv, tmp_path, surrogate="forest")
    config = config_for(pool_csv, tmp_path, method="bo-hit", surrogate="forest")
    config.pool.oxidation = True
    summary = run_campaign(config, out_dir=tmp_path / "forest")
    assert summary.n_evaluated == 22 and summary.n_skipped == 2
    # 5 of the 200 are hits: random search expects 22 * 5 / 200 = 0.55 in this budget
    assert summary.n_hits >= 1
    rows = read_evaluations(tmp_path / "forest")
    assert len({r["id"] for r in rows}) == 22
    proposals = [
        p for _, kind, p in CampaignStore(tmp_path / "forest" / "campaign.sqlite").iterations() if kind == "bo-hit"
    ]
    assert len(proposals) == 4 and all(p["model_info"]["target_forest_trees"] == 100.0 for p in proposals)
    # settings added later leave the fingerprint of a campaign that does not set them as it was before them
    plain = config_for(pool_csv, tmp_path, method="bo-hit")
    science = plain.model_dump(
        mode="json", exclude={"ray", "tracking", "output_dir", "name", "finetune", "finetune_every"}
    )
    del science["pool"]["oxidation"], science["optimizer"]["surrogate"]
    for key in ("magnetic_order", "hubbard_u", "mp2020", "u_corrections"):  # DFT settings added with magnetism, +U
        del science["dft"][key]
    science["dft"]["spinpol"] = False  # the default before the automatic spin rule
    del science["objective"]["supply_axis"], science["constraints"], science["preset"]  # added with sustainability
    before = hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:16]
    assert campaign_fingerprint(plain) == before != campaign_fingerprint(config)


def test_bo_benchmark_cli_forest_for_bo_hit_gp_for_the_rest(pool_csv, capsys):
    from pipelines.cli import main

    argv = ["bo-benchmark", "--pool", str(pool_csv), "--formula-column", "formula", "--target", "gap pbe"]
    argv += ["--window", "0.5", "3.0", "--stable-column", "e_hull", "--stable-max", "0.1", "--hits", "2"]
    argv += ["--seeds", "2", "--first-seed", "5", "--batch", "4", "--n-init", "6", "--budget", "60"]
    argv += ["--methods", "bo-hit,bo,random", "--surrogate", "forest", "--oxidation", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_pool"] == 200 and report["n_skipped"] == 2 and report["n_hits_pool"] == 5
    assert report["first_seed"] == 5 and report["settings"]["surrogate"] == "forest"
    assert report["n_features"] > 90  # composition statistics + 11 oxidation-state features + 3 site codes
    for method in ("bo-hit", "bo", "random"):  # bo ran on the GP: the forest is for bo-hit only
        evals = report["methods"][method]["evaluations_to_target"]
        assert len(evals) == 2 and all(e is None or 2 <= e <= 60 for e in evals)


def test_bo_benchmark_names_every_skipped_row_and_why(tmp_path, capsys):
    """It used to print "4 skipped" and nothing else."""
    from pipelines.cli import main

    with gzip.open(EMERY, "rt", newline="") as handle:
        rows = [
            {"id": f"emery-{r['']}", "formula": r["formula"], "gap pbe": r["gap pbe"]} for r in csv.DictReader(handle)
        ]
    pool = rows[::50][:60]
    pool += [
        {"id": "bad-formula", "formula": "Xx2O3", "gap pbe": "1.0"},
        {"id": "no-formula", "formula": "", "gap pbe": "1.0"},
        {"id": "text-label", "formula": "SrTiO3", "gap pbe": "n/a"},
        {"id": "inf-label", "formula": "BaTiO3", "gap pbe": "inf"},
    ]
    path = tmp_path / "pool.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "formula", "gap pbe"])
        writer.writeheader()
        writer.writerows(pool)
    argv = ["bo-benchmark", "--pool", str(path), "--formula-column", "formula", "--id-column", "id"]
    argv += ["--target", "gap pbe", "--window", "0.5", "3.0", "--hits", "1", "--seeds", "1", "--methods", "random"]
    argv += ["--n-init", "4", "--batch", "4", "--budget", "12", "--num-cpus", "1", "--plot", str(tmp_path / "t.png")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "pool: 60 usable of 64 rows (4 skipped)" in text
    assert "skipped rows (4; --json lists all):" in text
    lines = {
        line.split()[0]: line
        for line in text.splitlines()[text.splitlines().index("skipped rows (4; --json lists all):") + 1 :]
    }
    assert "unknown element(s)" in lines["bad-formula"] and "Xx2O3" in lines["bad-formula"]
    assert "(no formula)" in lines["no-formula"] and "empty" in lines["no-formula"]
    assert lines["text-label"].endswith("non-numeric label (gap pbe='n/a')")
    assert lines["inf-label"].endswith("non-finite label (gap pbe='inf')")
    assert (tmp_path / "t.png").is_file()
    # the same list, every row, is what --json prints under "skipped" (rows count data rows from 0)
    from pipelines.bo_benchmark import load_labelled_pool

    skipped = load_labelled_pool(path, "formula", ["gap pbe"], "sites", id_column="id").skipped
    assert [(s["id"], s["row"]) for s in skipped] == [
        ("bad-formula", 60),
        ("no-formula", 61),
        ("text-label", 62),
        ("inf-label", 63),
    ]
    assert [s["id"] for s in load_labelled_pool(path, "formula", ["gap pbe"], "sites").skipped][:1] == ["row60"]


def test_sustainable_absorber_preset_filters_the_pool_by_supply_risk(pool_csv, tmp_path):
    """preset sustainable_absorber: PV window, stable, production HHI at most the pool's median, no Cd/Pb; every
    excluded row is listed with the rule it breaks, and the constraint leaves the plain fingerprint alone."""
    from materials.datasets.sustainability import median_hhi_production, sustainability_descriptors
    from pipelines.campaign import apply_constraints, campaign_fingerprint, pool_from_rows, read_csv_rows

    config = parse_campaign_config(
        {
            "preset": "sustainable_absorber",
            "pool": {"csv": str(pool_csv)},
            "objective": {"target": "gap pbe", "stable": "e_hull"},
        }
    )
    assert (config.objective.low, config.objective.high, config.objective.stable_max) == (1.1, 1.8, 0.05)
    pool = pool_from_rows(read_csv_rows(pool_csv), "formula", None, str(pool_csv), "composition")
    median = median_hhi_production(pool.formulas)
    kept = apply_constraints(pool, config.constraints)
    assert 0.35 * len(pool.ids) < len(kept.ids) <= 0.5 * len(pool.ids) + 1
    for formula in kept.formulas:
        d = sustainability_descriptors(formula)
        assert d.hhi_production <= median and not {"Cd", "Pb"} & set(formula_elements(formula))
    reasons = {r["formula"]: r["reason"] for r in kept.skipped}
    assert len(reasons) >= len(pool.ids) - len(kept.ids)
    assert any("hhi_production_max" in r for r in reasons.values())
    assert all(r.startswith("constraints: ") for f, r in reasons.items() if f in pool.formulas)
    assert kept.features.shape == (len(kept.ids), pool.features.shape[1])
    plain = config_for(pool_csv, tmp_path)
    constrained = plain.model_copy(update={"constraints": config.constraints})
    assert campaign_fingerprint(plain) != campaign_fingerprint(constrained)
    with pytest.raises(ConfigError, match="exclude_elements"):
        parse_campaign_config({"objective": {"target": "g"}, "constraints": {"exclude_elements": ["Xq"]}})


def formula_elements(formula: str) -> list[str]:
    from pymatgen.core import Composition

    return [el.symbol for el in Composition(formula).elements]


def test_pareto_campaign_with_the_supply_axis(pool_csv, tmp_path):
    """objective.supply_axis: the production HHI is a third qLogNEHVI objective, known from the formula."""
    with pytest.raises(ConfigError, match="supply_axis"):
        parse_campaign_config({"objective": {"target": "g", "supply_axis": True}})
    config = config_for(pool_csv, tmp_path, budget=14)
    config.objective.mode = "pareto"
    config.objective.supply_axis = True
    summary = run_campaign(config, out_dir=tmp_path / "supply")
    assert summary.n_evaluated == 14
    proposals = [
        p for _, kind, p in CampaignStore(tmp_path / "supply" / "campaign.sqlite").iterations() if kind == "bo-pareto"
    ]
    assert len(proposals) == 2
    for p in proposals:  # three axes: stability, distance, and the known HHI (its reference point too)
        assert "known0_noise" in p["model_info"] or any(k.startswith("known0_") for k in p["model_info"])
        assert "ref_point_2" in p["model_info"]
    rows = read_evaluations(tmp_path / "supply")  # the supply-chain columns follow each evaluation
    values = [r["hhi_production"] for r in rows]  # "unknown" where an element has no HHI data (e.g. Tc), never 0
    assert all(v == "unknown" or float(v) > 0 for v in values) and sum(v != "unknown" for v in values) >= 10
    assert all(r["scarcest_element"] for r in rows)
