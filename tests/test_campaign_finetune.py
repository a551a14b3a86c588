"""Fine-tuning inside a DFT campaign (``finetune_every``): the GPAW frames the oracle keeps, a real mace-torch
training after each BO iteration (first from scratch, then from the campaign's previous registered model),
registration in a temp MLflow store, loading back through ``mlflow:/name/version``, resume, and bad input.
No mocks: real Ray, GPAW (low settings, 2-atom zincblende cells), mace-torch and MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from materials.potentials.finetune import ENERGY_KEY, FORCES_KEY, STRESS_KEY, labelled_frame, read_frames
from pipelines.campaign import CampaignStore, run_campaign
from pipelines.campaign_finetune import finetune_on_campaign_data, finetune_parent, split_by_candidate
from pipelines.config import ConfigError, parse_campaign_config

METADATA = {"dft_xc": "PBE", "dft_code": "gpaw", "dft_settings_hash": "test"}


def campaign_data(tmp_path, **overrides) -> dict:
    data = {
        "name": "ft-campaign",
        "candidates": {"prototypes": {"zincblende": [["Al", "Ga"], ["P", "As"]]}},
        # all four III-V are stable and bound: the window only steers BO, every label is a real GPAW E_form
        "objective": {"target": "dft_e_form_per_atom", "low": -2.0, "high": 0.0},
        "optimizer": {"method": "bo", "batch_size": 1, "n_init": 2, "budget": 4},
        "oracle": {"kind": "dft", "relax": True},
        # cheap GPAW: 3 BFGS steps per relaxation (candidates and elemental references) give 4 frames each
        "dft": {"ecut": 250, "kpts": [3, 3, 3], "relax_max_steps": 3},
        "finetune_every": 1,
        "finetune": {
            "train": {
                "e0s": "elemental",
                "num_channels": 8,
                "num_interactions": 1,
                "num_radial_basis": 4,
                "mlp_irreps": "8x0e",
                "max_num_epochs": 10,
                "batch_size": 2,
                "energy_weight": 10.0,
            },
            "min_train_frames": 4,
            "heldout_fraction": 0.34,
            "compare": [],
        },
        "ray": {"num_cpus": 2, "num_workers": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "experiment": "ft-campaign"},
    }
    data.update(overrides)
    return data


@pytest.mark.slow
def test_dft_campaign_finetunes_registers_and_resumes(tmp_path, mlflow_uri):
    mlflow_uri(tmp_path / "mlruns" / "mlflow.db")  # the store campaign_data points at, empty, schema made once
    pytest.importorskip("gpaw")
    import mlflow

    from materials.potentials.calculators import PotentialSpec, load_potential
    from materials.structures.candidates import build_prototype
    from pipelines.registry import resolve_potential

    config = parse_campaign_config(campaign_data(tmp_path))
    out = tmp_path / "out"
    summary = run_campaign(config, out_dir=out)
    assert summary.n_evaluated == 4 and summary.n_failed == 0

    # the DFT frames: every ionic step of each relaxation, labelled, written per candidate and gathered at the end
    frames = read_frames(out / "dft_frames.xyz")
    by_candidate = {p.stem: read_frames(p) for p in sorted((out / "dft" / "frames").glob("*.xyz"))}
    assert len(by_candidate) == 4 and len(frames) == sum(len(f) for f in by_candidate.values())
    for candidate, steps in by_candidate.items():
        assert 2 <= len(steps) <= 4, candidate  # the start + at most relax_max_steps BFGS steps
        assert [f.info["id"] for f in steps] == [f"{candidate}-step{i}" for i in range(len(steps))]
        energies = [f.info[ENERGY_KEY] for f in steps]
        assert energies[-1] <= energies[0] + 1e-3, energies  # BFGS goes downhill
        for frame in steps:
            assert len(frame) == 2 and frame.arrays[FORCES_KEY].shape == (2, 3)
            assert np.all(np.isfinite(frame.arrays[FORCES_KEY])) and np.shape(frame.info[STRESS_KEY]) == (6,)
            # GPAW energies are relative to the setups' atoms: ~ minus the cohesive energy, 3-6 eV/atom
            assert -6.5 < frame.info[ENERGY_KEY] / len(frame) < -2.5, frame.info[ENERGY_KEY]

    # a fine-tune after each BO iteration: the first from scratch, the second from the first's registered model
    store = CampaignStore(out / "campaign.sqlite")
    records = store.finetunes()
    store.close()
    assert [r["iteration"] for r in records] == [1, 2] == [r["iteration"] for r in summary.finetunes]
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    first, second = records
    assert first["registry_uri"] == "mlflow:/ft-campaign-mace/1" and first["parent"] == "scratch"
    assert second["registry_uri"] == "mlflow:/ft-campaign-mace/2" and second["parent"] == first["registry_uri"]
    assert first["n_train"] + first["n_heldout"] == sum(len(by_candidate[c]) for c in by_candidate) - len(
        by_candidate[summary_last_id(out)]
    )
    assert second["n_heldout"] >= 2 and second["n_train"] >= 4 and first["data_hash"] != second["data_hash"]
    tuned = second["metrics"]["finetuned"]["heldout"]
    assert np.isfinite(tuned["force_rmse"]) and tuned["n_frames"] == second["n_heldout"]
    # the second model learnt from its parent (the first): lower energy error on the training frames
    parent_train, tuned_train = second["metrics"]["parent"]["train"], second["metrics"]["finetuned"]["train"]
    assert tuned_train["energy_mae"] < 0.97 * parent_train["energy_mae"], (parent_train, tuned_train)

    client = mlflow.MlflowClient(tracking_uri=config.tracking.uri)
    version = client.get_model_version("ft-campaign-mace", "2")
    assert version.tags["training_data_hash"] == second["data_hash"]
    assert version.tags["parent_model"] == "mlflow:/ft-campaign-mace/1"
    assert version.tags["campaign_iteration"] == "2" and version.tags["campaign_run_id"] == summary.mlflow_run_id
    campaign_run = client.get_run(summary.mlflow_run_id)
    assert campaign_run.data.tags["finetune_latest_model"] == "mlflow:/ft-campaign-mace/2"
    children = client.search_runs(
        [campaign_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.mlflow_run_id}'"
    )
    assert {r.info.run_id for r in children} >= {first["mlflow_run_id"], second["mlflow_run_id"]}

    # the registered model through the potential factory: a GaAs energy near the DFT one (E0s = GPAW μ)
    spec, tags = resolve_potential(PotentialSpec(name="mace", model="mlflow:/ft-campaign-mace/2"), config.tracking.uri)
    assert tags["potential_training_data_hash"] == second["data_hash"]
    gaas = build_prototype("zincblende", ["Ga", "As"])
    atoms = Atoms([s.specie.symbol for s in gaas], positions=gaas.cart_coords, cell=gaas.lattice.matrix, pbc=True)
    atoms.calc = load_potential(spec)
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_forces().shape == (2, 3)

    # resume: nothing left to evaluate, and no fine-tune is redone (still two versions)
    resumed = run_campaign(config, out_dir=out, resume=True)
    assert [r["registry_uri"] for r in resumed.finetunes] == [first["registry_uri"], second["registry_uri"]]
    assert len(client.search_model_versions("name = 'ft-campaign-mace'")) == 2


def summary_last_id(out) -> str:
    """Id of the candidate evaluated in the last iteration (not yet in the first fine-tune's data)."""
    import csv

    rows = list(csv.DictReader((out / "evaluations.csv").open()))
    return rows[-1]["id"]


def frame(symbols: list[str], frame_id: str) -> Atoms:
    atoms = Atoms(symbols, positions=np.eye(len(symbols), 3) * 1.2, cell=np.eye(3) * 4, pbc=True)
    return labelled_frame(atoms, -4.0 * len(atoms), np.zeros((len(atoms), 3)), None, METADATA, frame_id)


def test_heldout_split_is_by_candidate_and_covers_elements():
    data = [
        ("gaas", [frame(["Ga", "As"], "gaas-0"), frame(["Ga", "As"], "gaas-1")]),
        ("alp", [frame(["Al", "P"], "alp-0")]),
        ("gap", [frame(["Ga", "P"], "gap-0"), frame(["Ga", "P"], "gap-1")]),
        ("alas", [frame(["Al", "As"], "alas-0")]),
        ("none", []),
    ]
    for seed in range(5):
        train, heldout, held = split_by_candidate(data, 0.34, seed)
        assert held and len(train) + len(heldout) == 6
        train_elements = {s for f in train for s in f.get_chemical_symbols()}
        assert {s for f in heldout for s in f.get_chemical_symbols()} <= train_elements
        # whole candidates: no candidate's frames on both sides
        assert {f.info["id"].split("-")[0] for f in heldout} == set(held)
        assert not {f.info["id"].split("-")[0] for f in train} & set(held)
        assert split_by_candidate(data, 0.34, seed) == (train, heldout, held)  # deterministic
    # a candidate with an element nobody else has is never held out
    _, _, held = split_by_candidate([("gaas", data[0][1]), ("cus", [frame(["Cu", "S"], "cus-0")])], 0.99, 0)
    assert held == []
    assert split_by_candidate(data, 0.0, 0)[1] == []


def test_too_few_frames_is_recorded_not_raised(tmp_path):
    config = parse_campaign_config(campaign_data(tmp_path))
    data = [("gaas", [frame(["Ga", "As"], "gaas-0")]), ("gap", [frame(["Ga", "P"], "gap-0")])]
    record = finetune_on_campaign_data(config, 3, data, None, tmp_path / "refs", tmp_path / "out")
    assert record["status"] == "failed" and record["iteration"] == 3 and record["registry_uri"] is None
    assert "min_train_frames=4" in record["reason"] and "raise finetune_every" in record["reason"]
    assert not (tmp_path / "out" / "finetune").exists()


def test_forces_all_zero_refuse_rms_force_scaling(tmp_path):
    """Relaxed zincblende cells have zero forces by symmetry: mace's default scaling would freeze the model."""
    from materials.potentials.finetune import TrainingSetError, TrainSettings, train_mace

    frames = [frame(["Ga", "As"], f"gaas-{i}") for i in range(4)]
    with pytest.raises(TrainingSetError, match=r"RMS of 0 eV/Å.*set train.scaling: std_scaling"):
        train_mace(frames, TrainSettings(e0s="average"), tmp_path)
    assert not (tmp_path / "train.xyz").exists()
    config = parse_campaign_config(campaign_data(tmp_path))
    assert config.finetune.train.scaling == "std_scaling"  # the campaign's default for its relaxed structures


def test_finetune_every_needs_the_dft_oracle(tmp_path):
    data = campaign_data(tmp_path, oracle={"kind": "table", "csv": "labels.csv"})
    with pytest.raises(ConfigError, match=r"finetune_every: 1 .*oracle.kind is 'table': set oracle.kind: dft"):
        parse_campaign_config(data)
    off = parse_campaign_config({**data, "finetune_every": 0})
    assert off.finetune_every == 0
    with pytest.raises(ConfigError, match=r"finetune.min_train_frames"):
        parse_campaign_config(campaign_data(tmp_path, finetune={"min_train_frames": 1}))


def test_next_parent_is_the_previous_model_unless_it_lacks_an_element(tmp_path):
    config = parse_campaign_config(campaign_data(tmp_path))
    ok = {"status": "ok", "registry_uri": "mlflow:/m/2", "model_path": "m2.model", "elements": ["As", "Ga", "P"]}
    failed = {"status": "failed", "registry_uri": None, "model_path": None, "elements": ["Al", "As", "Ga", "P"]}
    assert finetune_parent(config, [], ["Ga", "As"]) is None  # scratch
    assert finetune_parent(config, [ok, failed], ["Ga", "As"]) == "mlflow:/m/2"
    assert finetune_parent(config, [ok], ["Al", "As"]) is None  # Al is new: mace cannot fine-tune it in
    assert finetune_parent(config, [{**ok, "registry_uri": None}], ["P"]) == "m2.model"  # tracking off
    data = campaign_data(tmp_path)
    data["finetune"] = {**data["finetune"], "continue_from_previous": False}
    data["finetune"]["train"] = {**data["finetune"]["train"], "foundation_model": "parent.model"}
    assert finetune_parent(parse_campaign_config(data), [ok], ["Ga"]) == "parent.model"
