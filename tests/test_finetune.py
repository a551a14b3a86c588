"""Fine-tuning: training-set validation, a real 2-epoch mace-torch fine-tune of the committed tiny MACE on
EMT-labelled Cu/Ni/Al cells (EMT stands in for DFT), registration in a temp MLflow store, loading back through
``mlflow:/name/version`` and a 2-structure screen with it. No mocks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from pymatgen.io.ase import AseAtomsAdaptor

from materials.potentials.calculators import PotentialError, PotentialSpec, load_potential
from materials.potentials.finetune import (
    FORCES_KEY,
    DataSettings,
    TrainingSetError,
    labelled_frame,
    perturbed_structures,
    relative_energy_mae,
    validate_training_set,
)

TINY_MACE = Path(__file__).parent / "data" / "tiny_mace.model"

#: EMT labels recorded like DFT ones, so the same validation applies.
EMT_METADATA = {
    "dft_code": "emt",
    "dft_xc": "EMT",
    "dft_ecut": 0.0,
    "dft_kpoint_density": 0.0,
    "dft_kpoint_grid": "none",
    "dft_smearing": 0.0,
    "dft_spinpol": False,
    "dft_settings_hash": "emt-asap",
}


def emt_frames(seed: int) -> list:
    """20 EMT-labelled 4-atom cells: CuNi and Al3Cu, rattled (0.08 Å) and strained (4 %)."""
    data = DataSettings(n_rattled=6, rattle_std=0.08, n_strained=4, max_strain=0.04, seed=seed)
    frames = []
    for name, symbols, a in (("cuni", ["Cu", "Ni", "Cu", "Ni"], 3.56), ("al3cu", ["Al", "Cu", "Al", "Al"], 3.95)):
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.set_chemical_symbols(symbols)
        for frame_id, copy in perturbed_structures(atoms, data, name):
            copy.calc = EMT()
            energy, forces, stress = copy.get_potential_energy(), copy.get_forces(), copy.get_stress(voigt=True)
            frames.append(labelled_frame(copy, energy, forces, stress, EMT_METADATA, frame_id))
    return frames


def test_perturbations_are_seeded_and_distinct():
    a, b = emt_frames(0), emt_frames(0)
    assert [f.info["id"] for f in a][:2] == ["cuni-rattle0", "cuni-rattle1"]
    assert np.allclose(a[3].positions, b[3].positions)
    assert not np.allclose(a[0].positions, a[1].positions)
    assert not np.allclose(a[0].positions, emt_frames(1)[0].positions)


def test_missing_forces_named_with_fix():
    frames = emt_frames(0)[:4]
    del frames[2].arrays[FORCES_KEY]
    with pytest.raises(
        TrainingSetError, match=r"structure 2 \(cuni-rattle2\) has missing or invalid forces.*recompute"
    ):
        validate_training_set(frames)


def test_mixed_functionals_named_with_fix():
    frames = emt_frames(0)[:4]
    frames[3].info["dft_xc"] = "PBEsol"
    with pytest.raises(TrainingSetError, match=r"mixed functionals.*cuni-rattle3.*'PBEsol'.*'EMT'.*one functional"):
        validate_training_set(frames)


def test_mixed_settings_named_with_fix():
    frames = emt_frames(0)[:4]
    frames[1].info["dft_ecut"] = 500.0
    with pytest.raises(TrainingSetError, match=r"mixed DFT settings.*cuni-rattle1.*dft_ecut=500.0.*recompute"):
        validate_training_set(frames)


def test_relative_energy_mae_ignores_per_composition_offsets():
    comps = ["A", "A", "B", "B", "C"]
    ref = [1.0, 2.0, 5.0, 7.0, 3.0]
    shifted = [11.0, 12.0, -5.0, -3.0, 100.0]  # another code's scale: one constant per composition
    assert relative_energy_mae(comps, ref, shifted) == (0.0, 4)
    assert relative_energy_mae(comps, ref, [1.0, 3.0, 5.0, 7.0, 0.0])[0] == pytest.approx(0.25)


def test_unresolved_registry_uri_is_a_clear_error():
    with pytest.raises(PotentialError, match="registry URI.*resolve_potential"):
        load_potential(PotentialSpec(name="mace", model="mlflow:/tiny/1"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, mlflow_uri):
    """One real fine-tune (2 epochs from tiny_mace.model) through the pipeline, registered in a temp store."""
    from materials.potentials.finetune import TrainSettings, write_frames
    from pipelines.finetune_run import FinetuneConfig, run_finetune

    tmp = tmp_path_factory.mktemp("finetune")
    write_frames(emt_frames(0), tmp / "train.xyz")
    write_frames(emt_frames(1)[::2], tmp / "heldout.xyz")
    config = FinetuneConfig(
        name="tiny-ft",
        train_file=str(tmp / "train.xyz"),
        heldout_file=str(tmp / "heldout.xyz"),
        train=TrainSettings(
            foundation_model=str(TINY_MACE), e0s="average", max_num_epochs=4, lr=0.01, batch_size=2, energy_weight=1.0
        ),
        compare=[PotentialSpec(name="emt")],
        register_as="tiny-ft",
        tracking={"uri": mlflow_uri(tmp / "mlruns" / "mlflow.db"), "experiment": "test-finetune"},
    )
    return config, run_finetune(config, out_dir=tmp / "out"), tmp


@pytest.mark.slow
def test_finetuning_lowers_error_on_training_chemistry(finetuned):
    _, summary, _ = finetuned
    parent, tuned = summary.metrics["parent"], summary.metrics["finetuned"]
    # measured: train force RMSE 0.070 -> 0.037 eV/Å, energy MAE 0.052 -> 0.031 eV/atom after 4 epochs
    assert tuned["train"]["force_rmse"] < 0.7 * parent["train"]["force_rmse"]
    assert tuned["train"]["energy_mae"] < parent["train"]["energy_mae"]
    assert tuned["heldout"]["force_rmse"] < parent["heldout"]["force_rmse"]
    assert summary.metrics["emt"]["heldout"]["force_rmse"] < 1e-6  # the labels' own method


@pytest.mark.slow
def test_registered_model_loads_and_screens(finetuned, tmp_path):
    import mlflow

    from pipelines.config import parse_config
    from pipelines.registry import RegistryError, resolve_potential
    from pipelines.screen import run_screen

    config, summary, _ = finetuned
    assert summary.registry_uri == "mlflow:/tiny-ft/1" and summary.n_train == 20 and summary.n_heldout == 10
    client = mlflow.MlflowClient(tracking_uri=config.tracking.uri)
    version = client.get_model_version("tiny-ft", "1")
    assert version.tags["training_data_hash"] == summary.data_hash
    assert version.tags["parent_model"].endswith("tiny_mace.model")
    assert float(version.tags["heldout_force_rmse"]) == pytest.approx(
        summary.metrics["finetuned"]["heldout"]["force_rmse"], rel=1e-5
    )

    with pytest.raises(RegistryError, match="'mlflow:/tiny-ft/7': not found in the registry"):
        resolve_potential(PotentialSpec(name="mace", model="mlflow:/tiny-ft/7"), config.tracking.uri)
    spec, tags = resolve_potential(PotentialSpec(name="mace", model="models:/tiny-ft/latest"), config.tracking.uri)
    assert spec.model.endswith("tiny-ft.model") and tags["potential_registry_version"] == "1"
    cu = bulk("Cu", "fcc", a=3.6)
    cu.calc = load_potential(spec)
    assert np.isfinite(cu.get_potential_energy())

    folder = tmp_path / "structures"
    folder.mkdir()
    AseAtomsAdaptor.get_structure(bulk("Cu", "fcc", a=3.7)).to(filename=str(folder / "cu.cif"))
    AseAtomsAdaptor.get_structure(bulk("NiAl", "cesiumchloride", a=2.9)).to(filename=str(folder / "nial.cif"))
    screen = parse_config(
        {
            "name": "screen-finetuned",
            "potential": {"name": "mace", "model": summary.registry_uri},
            "relax": {"fmax": 0.05, "max_steps": 100},
            "ray": {"num_cpus": 1, "num_workers": 1},
            "tracking": {"uri": config.tracking.uri, "experiment": "test-screen"},
        }
    )
    result = run_screen(screen, structures=str(folder), out_dir=tmp_path / "screen", progress=False)
    assert result.n_ok == 2, result
    run = mlflow.MlflowClient(tracking_uri=config.tracking.uri).get_run(result.mlflow_run_id)
    assert run.data.tags["potential_registry_name"] == "tiny-ft"
    assert run.data.tags["potential_registry_version"] == "1"
    assert run.data.tags["potential"] == "mace-tiny-ft.model"
    # fine-tuned on our own data: convention self, elemental references relaxed with the model itself, so fcc
    # Cu (the Cu reference crystal) forms from the elements at ~0 eV/atom
    assert run.data.tags["energy_convention"] == "self" and result.references["source"] == "model"
    assert set(result.references["mu"]) == {"Al", "Cu", "Ni"}
    rows = {r["id"]: r for r in csv.DictReader((tmp_path / "screen" / "results.csv").open())}
    assert abs(float(rows["cu"]["e_form_per_atom"])) < 0.02 and rows["cu"]["energy_convention"] == "self"


def test_shipped_config_builds_the_benchmark_jobs():
    from pipelines.finetune_run import label_jobs, load_finetune_config

    config = load_finetune_config(Path(__file__).parent.parent / "configs" / "finetune.yaml")
    jobs = label_jobs(config)
    # 8 structures x (4 rattled + 2 strained single points + 1 relaxation); 2 of each 6 copies held out
    assert len(jobs) == 56 and sum(j.heldout for j in jobs) == 16
    assert {j.composition for j in jobs} == {"GaAs", "GaP", "InAs", "InP", "InGaAs2", "InGaP2"}
    assert max(len(j.atoms) for j in jobs) == 8 and not any(j.heldout and j.relax_steps for j in jobs)
