"""The experiment schema: YAML + --set overrides, typed validation naming the field."""

from __future__ import annotations

import pytest
import yaml

from hdm_platform.config import ConfigError, apply_overrides, load_config, parse_overrides

MINIMAL = {"name": "exp", "task": "dehaze", "data": {"uri": "file:///tmp/ds"}}


def write(tmp_path, raw):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_follow_the_paper_recipe(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train.lr == 2e-4
    assert config.train.betas == (0.9, 0.999)
    assert config.train.batch_size == 16
    hdm = config.model.to_hdm_config()
    assert hdm.num_regions == 5 and hdm.blocks_per_group == 7 and hdm.order == "PSR"
    assert config.registered_model_name() == "hdm-dehaze"
    assert config.run_name() == "exp"


def test_overrides_are_typed_and_reach_the_model(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["train.lr=1e-3", "model.num_regions=3", "model.variant=HDM-F", "scaling.use_gpu=true"],
    )
    assert config.train.lr == pytest.approx(1e-3)
    assert config.scaling.use_gpu is True
    hdm = config.model.to_hdm_config()
    assert hdm.num_regions == 3
    assert hdm.mask_source == "learned"
    assert config.flat()["model.num_regions"] == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.learning_rate=1", "train.learning_rate"),
        ("model.num_regions=1", "num_regions"),
        ("model.variant=HDM-X", "variant"),
        ("task=denoise", "task"),
        ("data.crop_size=30", "data.crop_size"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(tmp_path, override, named):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), [override])
    assert named in str(error.value)


def test_missing_required_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data"):
        load_config(write(tmp_path, {"name": "exp", "task": "derain"}))


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_apply_overrides_refuses_to_descend_into_a_value():
    with pytest.raises(ConfigError, match="'train.lr' is a value"):
        apply_overrides({"train": {"lr": 1.0}}, [("train.lr.x", 2)])
