"""Model references shared by enhance, explain and evaluate: folders, URIs and baselines."""

from __future__ import annotations

import pytest
import torch

from hdm_model import enhance, hdm, prepare_for_inference, save_checkpoint
from hdm_model.priors import dehaze
from hdm_platform.model_refs import load_enhancer, load_model


def _tiny(**settings):
    torch.manual_seed(0)
    return hdm(blocks_per_group=1, num_groups=1, channels=8, num_regions=3, **settings)


def test_baselines_are_the_input_itself_and_classic_dcp():
    images = torch.rand(1, 3, 24, 32)
    assert torch.equal(load_enhancer("input")(images), images)
    assert torch.equal(load_enhancer("dcp")(images), dehaze(images))


def test_a_checkpoint_folder_and_a_file_uri_give_the_same_model(tmp_path):
    model = _tiny()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    images = torch.rand(1, 3, 36, 44)
    expected = enhance(prepare_for_inference(model, device="cpu"), images, precision="auto")
    for reference in (str(folder), f"file://{folder}"):
        assert torch.equal(load_enhancer(reference)(images), expected)


def test_a_training_checkpoint_resolves_to_its_exported_model(tmp_path):
    model = _tiny()
    save_checkpoint(model, tmp_path / "checkpoint-step-00000010" / "model")
    loaded = load_model(str(tmp_path / "checkpoint-step-00000010"))
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_tiling_policy_and_refusals(tmp_path):
    folder = save_checkpoint(_tiny(), tmp_path / "ckpt")
    images = torch.rand(1, 3, 64, 64)
    whole = load_enhancer(str(folder), tile=0)(images)
    tiled = load_enhancer(str(folder), tile=32, tile_overlap=8)(images)
    assert whole.shape == tiled.shape == images.shape
    assert not torch.equal(whole, tiled)  # tiles really ran, blended back to the full size
    own_tile = save_checkpoint(_tiny(inference_tile=32), tmp_path / "own-tile")
    assert torch.equal(load_enhancer(str(own_tile), tile_overlap=8)(images), tiled)  # same weights
    assert torch.equal(load_enhancer(str(own_tile), tile=0)(images), whole)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_model(str(tmp_path / "missing"))
    external = save_checkpoint(_tiny(mask_source="external"), tmp_path / "external")
    with pytest.raises(ValueError, match="external guide map"):
        load_enhancer(str(external))
