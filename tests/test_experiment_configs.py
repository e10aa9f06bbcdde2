"""jobs/configs: one valid file per paper experiment, with the paper's recipe, plus tiny-cpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdm_model import build_hdm
from hdm_platform.cli.submit import PLACEHOLDER_MARK, unset_placeholders
from hdm_platform.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
PAPER_EXPERIMENTS = {
    "dehaze-reside-its": "dehaze",
    "dehaze-nh-haze": "dehaze",
    "dehaze-dense-haze": "dehaze",
    "derain-rain100l": "derain",
    "derain-rain200h": "derain",
    "derain-did-data": "derain",
    "lowlight-lol": "lowlight",
}


def test_every_paper_experiment_has_a_config():
    assert {path.stem for path in ALL_CONFIGS} == {*PAPER_EXPERIMENTS, "tiny-cpu", "quickstart-cpu"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda path: path.stem)
def test_config_validates_and_is_named_after_its_file(path):
    config = load_config(path)
    assert config.name == path.stem


@pytest.mark.parametrize("stem", sorted(PAPER_EXPERIMENTS))
def test_paper_configs_follow_the_paper_recipe(stem):
    config = load_config(CONFIG_DIR / f"{stem}.yaml")
    assert config.task == PAPER_EXPERIMENTS[stem]
    hdm = config.model.to_hdm_config()
    assert config.model.variant == "HDM"
    assert (hdm.blocks_per_group, hdm.num_regions, hdm.mask_source) == (7, 5, "dcp")
    assert hdm.channels == 64 and hdm.order == "PSR"
    train = config.train
    assert (train.lr, train.betas, train.batch_size, train.epochs) == (2e-4, (0.9, 0.999), 16, 100)
    assert train.min_lr == 0.0 and train.weight_decay == 0.0
    assert config.loss.l1_weight > 0 and config.loss.perceptual_weight > 0
    assert config.data.crop_size == 256
    assert config.scaling.use_gpu and config.scaling.num_workers == 4
    # The global batch must split evenly over the workers.
    assert train.batch_size % config.scaling.num_workers == 0


@pytest.mark.parametrize("stem", sorted(PAPER_EXPERIMENTS))
def test_paper_configs_mark_user_settings_as_placeholders(stem, tmp_path):
    path = CONFIG_DIR / f"{stem}.yaml"
    config = load_config(path)
    assert set(unset_placeholders(config)) == {"data.uri", "loss.vgg_weights", "run.storage_path"}
    assert config.data.uri.startswith(f"s3://{PLACEHOLDER_MARK}/")

    filled = load_config(
        path,
        [
            "data.uri=s3://lab-data/datasets/x",
            "loss.vgg_weights=s3://lab-data/vgg16.pth",
            "run.storage_path=s3://lab-data/runs",
        ],
    )
    assert unset_placeholders(filled) == []
    assert filled.data.uri == "s3://lab-data/datasets/x"


def test_paper_model_has_the_measured_parameter_count():
    # hdm-reference.md: HDM with K=7 blocks and DCP masks has 2.37M parameters.
    config = load_config(CONFIG_DIR / "dehaze-reside-its.yaml")
    parameters = sum(p.numel() for p in build_hdm(config.model.to_hdm_config()).parameters())
    assert 2.36e6 < parameters < 2.38e6


def test_tiny_cpu_config_is_small_and_cpu_only():
    config = load_config(CONFIG_DIR / "tiny-cpu.yaml")
    assert not config.scaling.use_gpu and config.scaling.num_workers == 2
    assert config.loss.perceptual_weight == 0.0 and config.loss.vgg_weights is None
    assert config.data.crop_size <= 64 and config.train.epochs <= 3
    assert unset_placeholders(config) == []

    model = build_hdm(config.model.to_hdm_config()).eval()
    assert sum(p.numel() for p in model.parameters()) < 200_000
    crop = config.data.crop_size
    with torch.no_grad():
        restored = model(torch.rand(2, 3, crop, crop))
    assert restored.shape == (2, 3, crop, crop)
    assert torch.isfinite(restored).all()
