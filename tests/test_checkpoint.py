"""Checkpoints: safetensors + JSON, exact round trips, clear errors, atomic writes, no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from hdm_model import (
    HDM,
    hdm,
    hdm_f,
    load_checkpoint,
    prepare_for_inference,
    read_checkpoint_config,
    save_checkpoint,
    variant_config,
)
from hdm_model.model import build_hdm

TINY = {"channels": 16, "blocks_per_group": 1, "num_groups": 1}


def trained_looking(network: HDM) -> HDM:
    """Perturb every weight so that a loader that silently re-initialised would be caught."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return network.eval()


@pytest.mark.parametrize(
    "config",
    [
        variant_config("HDM", **TINY),
        variant_config("HDM-F", **TINY, num_regions=3),
        variant_config("B+FA", **TINY, order="SPR", sr_repeats=3, share_sr_weights=False),
        variant_config("HDM", **TINY, mask_source="external", dcp_mask_mode="dark_channel"),
    ],
)
def test_round_trip_rebuilds_the_variant_with_identical_outputs(tmp_path: Path, config) -> None:
    original = trained_looking(build_hdm(config))
    save_checkpoint(original, tmp_path / "run", metadata={"task": "dehaze", "psnr": 30.5})
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.config == config and not loaded.training
    image = torch.rand(1, 3, 28, 36)
    guide = torch.rand(1, 1, 28, 36)
    with torch.no_grad():
        assert torch.equal(loaded(image, guide=guide), original(image, guide=guide))
    assert read_checkpoint_config(tmp_path / "run") == (config, {"task": "dehaze", "psnr": 30.5})


def test_channels_last_model_saves_and_files_are_as_documented(tmp_path: Path) -> None:
    network = prepare_for_inference(trained_looking(hdm(**TINY)), device="cpu")
    directory = save_checkpoint(network, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((directory / "config.json").read_text())
    assert document["format"] == "hdm" and document["format_version"] == 1
    assert document["model"] == network.config.to_dict() and document["metadata"] == {}


def test_loading_does_not_unpickle(tmp_path: Path) -> None:
    save_checkpoint(hdm(**TINY), tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(hdm(**TINY), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_bad_configs_are_named(tmp_path: Path) -> None:
    save_checkpoint(hdm(**TINY), tmp_path)
    config_path = tmp_path / "config.json"
    document = json.loads(config_path.read_text())

    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_checkpoint(tmp_path)

    config_path.write_text(json.dumps({**document, "model": {**document["model"], "depth": 3}}))
    with pytest.raises(ValueError, match="depth"):
        load_checkpoint(tmp_path)

    config_path.write_text(json.dumps({**document, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(tmp_path)

    # Weights of a different architecture than the config describes.
    config_path.write_text(json.dumps({**document, "model": {**document["model"], "num_regions": 4}}))
    with pytest.raises(ValueError, match="does not match config.json"):
        load_checkpoint(tmp_path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    first = trained_looking(hdm(**TINY))
    save_checkpoint(first, tmp_path, metadata={"step": 1})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(hdm_f(**TINY), tmp_path, metadata={"when": object()})
    assert read_checkpoint_config(tmp_path) == (first.config, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path)(image), first(image))
