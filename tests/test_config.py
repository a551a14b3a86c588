from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart.yaml", "mace-mp.yaml", "sevennet.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "configs" / name)
    assert config.candidates.prototypes
    assert config.ray.num_workers == 2


def test_wrong_key_is_named():
    with pytest.raises(ConfigError, match=r"relax\.fmx: Unexpected keyword"):
        parse_config({"relax": {"fmx": 0.1}})


def test_wrong_value_is_named():
    with pytest.raises(ConfigError, match=r"potential\.name"):
        parse_config({"potential": {"name": "vasp"}})
    with pytest.raises(ConfigError, match=r"ray\.num_workers"):
        parse_config({"ray": {"num_workers": 0}})


@pytest.mark.parametrize(
    "section, values, field",
    [
        ("relax", {"fmax": -1}, r"relax\.fmax: Input should be greater than 0"),
        ("relax", {"max_steps": 0}, r"relax\.max_steps: Input should be greater than or equal to 1"),
        ("relax", {"max_volume_factor": 0.5}, r"relax\.max_volume_factor"),
        ("checks", {"min_distance": -1}, r"checks\.min_distance: Input should be greater than 0"),
        ("checks", {"max_atoms": 0}, r"checks\.max_atoms"),
        ("checks", {"min_volume_per_atom": 10, "max_volume_per_atom": 5}, r"must exceed min_volume_per_atom"),
    ],
)
def test_out_of_range_settings_are_refused_with_their_name(section, values, field):
    with pytest.raises(ConfigError, match=field):
        parse_config({section: values})


def test_unknown_prototype_is_named():
    with pytest.raises(ConfigError, match="unknown prototype 'zincblend'"):
        parse_config({"candidates": {"prototypes": {"zincblend": [["Ga"], ["As"]]}}})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_removed_scheme_and_convention_settings_are_named():
    with pytest.raises(ConfigError, match=r"stability\.scheme was removed.*energy_convention"):
        parse_config({"stability": {"scheme": "fitted"}})
    with pytest.raises(ConfigError, match=r"potential\.energy_convention"):
        parse_config({"potential": {"energy_convention": "corrected"}})
    with pytest.raises(ConfigError, match="element_offsets: true needs a potential on MP's scale"):
        parse_config({"potential": {"name": "emt"}, "stability": {"element_offsets": True}})
    config = parse_config({"potential": {"name": "mace", "model": "x.model"}})
    assert config.potential.convention() == "uncorrected" and config.stability.stable_threshold == 0.1


# Numeric settings with no range by nature: signed energies and the objective window's ends.
UNBOUNDED_NUMBERS = {
    "materials.potentials.relax.RelaxSettings.min_energy_per_atom",
    "pipelines.config.ObjectiveSettings.low",
    "pipelines.config.ObjectiveSettings.high",
    "pipelines.config.ObjectiveSettings.stable_max",
    "pipelines.config.ConstraintSettings.hhi_production_max",  # float or "median": checked by its validator
}


def settings_classes() -> dict[str, type]:
    """Every pydantic dataclass or model defined in materials/ and pipelines/, by dotted name."""
    import importlib
    import inspect
    import pkgutil

    import materials
    import pipelines

    found = {}
    for package in (materials, pipelines):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and hasattr(cls, "__pydantic_fields__"):
                    found[f"{module.__name__}.{name}"] = cls
    return found


def test_every_numeric_setting_has_a_range():
    """A number in any settings class carries a pydantic Field constraint (gt/ge/lt/le), unless it is signed by
    nature; so a negative step count or a zero cutoff is refused where it is given, naming the field."""
    import typing

    classes = settings_classes()
    assert {"DFTSettings", "TrainSettings", "GapTrainSettings", "RelaxSettings", "ScreenConfig"} <= {
        name.rsplit(".", 1)[1] for name in classes
    }
    bare = []
    for name, cls in classes.items():
        for field, info in cls.__pydantic_fields__.items():
            kinds = set(typing.get_args(info.annotation)) or {info.annotation}
            if kinds & {int, float} and not info.metadata and f"{name}.{field}" not in UNBOUNDED_NUMBERS:
                bare.append(f"{name}.{field}")
    assert bare == [], bare


@pytest.mark.parametrize(
    "module, cls, values, field",
    [
        ("materials.dft.gpaw", "DFTSettings", {"ecut": 0.0}, "ecut"),
        ("materials.dft.gpaw", "DFTSettings", {"band_extra": 0}, "band_extra"),
        ("materials.dft.gpaw", "DFTSettings", {"smearing": -0.01}, "smearing"),
        ("materials.potentials.finetune", "DataSettings", {"max_strain": 0.3}, "max_strain"),
        ("materials.potentials.finetune", "DataSettings", {"seed": -1}, "seed"),
        ("materials.potentials.finetune", "TrainSettings", {"valid_fraction": 1.0}, "valid_fraction"),
        ("materials.ml.bandgap", "GapModelSettings", {"layers": 0}, "layers"),
        ("materials.ml.bandgap", "GapTrainSettings", {"lr": 0.0}, "lr"),
        ("materials.ml.bandgap", "GapCalibrationSettings", {"nonmetal_weight": -1.0}, "nonmetal_weight"),
    ],
)
def test_science_settings_refuse_out_of_range_values(module, cls, values, field):
    import importlib

    settings = getattr(importlib.import_module(module), cls)
    settings()  # the defaults are in range
    with pytest.raises(ValueError, match=field):
        settings(**values)


def test_supply_limit_is_on_the_hhi_scale():
    from pipelines.config import ConstraintSettings

    assert ConstraintSettings(hhi_production_max=2500).hhi_production_max == 2500
    assert ConstraintSettings(hhi_production_max="median").hhi_production_max == "median"
    with pytest.raises(ValueError, match="outside the HHI scale"):
        ConstraintSettings(hhi_production_max=12_000)
