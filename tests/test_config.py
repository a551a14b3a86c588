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
