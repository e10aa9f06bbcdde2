"""EnhancementLoss: L1 + frozen VGG16 perceptual loss loaded from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import vgg16

from hdm_model.losses import EnhancementLoss, LossTerms, VGGPerceptualLoss, load_vgg16_features


def _random_vgg16_features_state() -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's VGG16 key names, up to relu3_3 (conv layers 0-14)."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {
            f"features.{name}": tensor.shape
            for name, tensor in vgg16(weights=None).features[:16].state_dict().items()
        }
    return {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("vgg")
    state = _random_vgg16_features_state()
    pth, safetensors = directory / "vgg16-random.pth", directory / "vgg16-random.safetensors"
    torch.save(state, pth)
    save_file(state, safetensors)
    return {"pth": pth, "safetensors": safetensors, "state": state}


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_loads_weights_from_either_format_and_freezes_them(vgg_files, kind):
    features = load_vgg16_features(vgg_files[kind], last_layer="relu3_3")
    assert len(features) == 16
    assert not features.training
    assert all(not parameter.requires_grad for parameter in features.parameters())
    torch.testing.assert_close(features[14].weight, vgg_files["state"]["features.14.weight"])


def test_perceptual_term_is_zero_for_identical_images_and_positive_otherwise(vgg_files):
    loss = EnhancementLoss(l1_weight=1.0, perceptual_weight=0.1, vgg_weights=vgg_files["pth"])
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 32, generator=generator)
    same = loss(target.clone(), target)
    assert isinstance(same, LossTerms)
    assert same.perceptual.item() == 0.0 and same.l1.item() == 0.0 and same.total.item() == 0.0

    pred = (target + 0.1 * torch.randn(2, 3, 32, 32, generator=generator)).clamp(0, 1)
    pred.requires_grad_(True)
    terms = loss(pred, target)
    assert terms.perceptual.item() > 0.0 and terms.l1.item() > 0.0
    torch.testing.assert_close(terms.total, terms.l1 + 0.1 * terms.perceptual)
    terms.total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in loss.parameters())


def test_vgg_stays_in_eval_mode_when_parent_trains(vgg_files):
    loss = EnhancementLoss(perceptual_weight=1.0, vgg_weights=vgg_files["safetensors"]).train()
    assert loss.training and not loss.perceptual.features.training


def test_l1_only_needs_no_vgg():
    loss = EnhancementLoss(l1_weight=2.0)
    pred, target = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    terms = loss(pred, target)
    assert loss.perceptual is None
    assert terms.l1.item() == pytest.approx(0.5) and terms.total.item() == pytest.approx(1.0)
    assert terms.perceptual.item() == 0.0


def test_perceptual_layers_select_the_taps(vgg_files):
    only_first = VGGPerceptualLoss(vgg_files["pth"], layers=["relu1_2"])
    assert len(only_first.features) == 4
    with pytest.raises(ValueError, match="relu9_9"):
        VGGPerceptualLoss(vgg_files["pth"], layers=["relu9_9"])


def test_missing_weights_file_fails_at_construction_naming_path_and_source(tmp_path):
    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as error:
        EnhancementLoss(perceptual_weight=0.1, vgg_weights=missing)
    assert str(missing) in str(error.value) and "download.pytorch.org" in str(error.value)


def test_perceptual_weight_without_weights_file_is_rejected():
    with pytest.raises(ValueError, match="needs vgg_weights"):
        EnhancementLoss(perceptual_weight=0.04)


def test_unreadable_or_wrong_weights_files_are_rejected_naming_the_file(tmp_path, vgg_files):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        EnhancementLoss(perceptual_weight=1.0, vgg_weights=garbage)

    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_vgg16_features(bad_safetensors)

    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"features.0.weight": vgg_files["state"]["features.0.weight"]}, incomplete)
    with pytest.raises(ValueError, match="lacks VGG16 tensors"):
        load_vgg16_features(incomplete)

    wrong_shape = tmp_path / "wrong.pth"
    state = dict(vgg_files["state"], **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match="wrong.pth"):
        load_vgg16_features(wrong_shape)


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="l1_weight=-1"):
        EnhancementLoss(l1_weight=-1.0)
