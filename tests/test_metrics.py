"""PSNR / SSIM match scikit-image on 8-bit-quantised images, on RGB and on BT.601 Y, and SSIM
matches torchmetrics' ``structural_similarity_index_measure``, the library it replaces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hdm_model.metrics import image_metrics, psnr, quantize, rgb_to_y, ssim, ssim_reference
from realworld import REALWORLD

SOTS = REALWORLD / "dehaze" / "SOTS-indoor"
# Metrics run in float32 (ten times faster convolutions than float64); scikit-image in
# float64. Benchmarks report SSIM to 3 decimals, PSNR to 2.
TOLERANCE = {"psnr": 1e-4, "psnr_y": 1e-4, "ssim": 1e-4, "ssim_y": 1e-4}


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, the benchmarks' quantisation."""
    return np.round(image.clamp(0, 1).permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)


def _skimage_reference(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    pred_u8, target_u8 = _to_uint8(pred), _to_uint8(target)
    pred_y = rgb2ycbcr(pred_u8)[..., 0]
    target_y = rgb2ycbcr(target_u8)[..., 0]
    ssim_options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    return {
        "psnr": peak_signal_noise_ratio(target_u8, pred_u8, data_range=255),
        "ssim": structural_similarity(target_u8, pred_u8, channel_axis=2, **ssim_options),
        "psnr_y": peak_signal_noise_ratio(target_y, pred_y, data_range=255),
        "ssim_y": structural_similarity(target_y, pred_y, **ssim_options),
    }


def _load(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_matches_scikit_image_on_random_images_per_image():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 37, 53, generator=generator)
    # Out-of-range predictions exercise the clamp; different noise levels give distinct values.
    noise = torch.randn(3, 3, 37, 53, generator=generator) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1, 1)
    pred = target + noise
    metrics = image_metrics(pred, target)
    assert set(metrics) == {"psnr", "ssim", "psnr_y", "ssim_y"}
    for index in range(3):
        reference = _skimage_reference(pred[index], target[index])
        for name, value in reference.items():
            assert metrics[name].shape == (3,)
            assert metrics[name][index].item() == pytest.approx(value, abs=TOLERANCE[name]), name
    assert metrics["psnr"][0] > metrics["psnr"][1] > metrics["psnr"][2]


def test_matches_scikit_image_on_real_sots_pairs():
    hazy_paths = sorted((SOTS / "hazy").glob("*.png"))
    hazy = torch.stack([_load(path) for path in hazy_paths])
    clear = torch.stack([_load(SOTS / "gt" / f"{path.stem.split('_')[0]}.png") for path in hazy_paths])
    metrics = image_metrics(hazy, clear)
    # scikit-image's SSIM is slow on 620x460 images: compare one pair.
    for name, value in _skimage_reference(hazy[0], clear[0]).items():
        assert metrics[name][0].item() == pytest.approx(value, abs=TOLERANCE[name]), name
    # The data README: hazy-vs-clear PSNR on SOTS indoor is about 13 dB (measured: 13.96 dB
    # mean, 12.2-15.5 per image).
    assert 12.0 < metrics["psnr"].mean().item() < 15.0
    assert ((metrics["psnr"] > 10) & (metrics["psnr"] < 18)).all()
    assert ((metrics["ssim"] > 0.5) & (metrics["ssim"] < 0.95)).all()


@pytest.mark.parametrize("shape", [(4, 3, 96, 96), (2, 3, 37, 53), (1, 3, 11, 300)])
@pytest.mark.parametrize("y_channel", [False, True])
def test_ssim_matches_torchmetrics_on_random_batches(shape, y_channel):
    generator = torch.Generator().manual_seed(sum(shape))
    target = torch.rand(shape, generator=generator)
    pred = target + torch.randn(shape, generator=generator) * torch.linspace(0.01, 0.3, shape[0]).view(-1, 1, 1, 1)
    ours = ssim(pred, target, y_channel=y_channel)
    torch.testing.assert_close(ours, ssim_reference(pred, target, y_channel=y_channel), rtol=0, atol=2e-6)
    assert ours.shape == (shape[0],)
    # Validation measures the model's channels_last outputs.
    channels_last = pred.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ssim(channels_last, target, y_channel=y_channel), ours, rtol=0, atol=1e-7)


def test_ssim_matches_torchmetrics_on_a_real_sots_pair():
    hazy_path = sorted((SOTS / "hazy").glob("*.png"))[0]
    hazy = _load(hazy_path)[None]
    clear = _load(SOTS / "gt" / f"{hazy_path.stem.split('_')[0]}.png")[None]
    for y_channel in (False, True):
        torch.testing.assert_close(
            ssim(hazy, clear, y_channel=y_channel), ssim_reference(hazy, clear, y_channel=y_channel), rtol=0, atol=2e-6
        )


def test_y_channel_is_matlab_bt601_luma():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = rgb_to_y(quantize(rgb.T.reshape(1, 3, 4, 1))).flatten()
    torch.testing.assert_close(
        y, torch.tensor([16 + 65.481, 16 + 128.553, 16 + 24.966, 235.0], dtype=torch.float32)
    )


def test_quantisation_to_eight_bits_before_measuring():
    target = torch.full((1, 3, 16, 16), 0.5)
    # A difference below half an 8-bit level disappears after quantisation...
    assert math.isinf(psnr(target + 0.001, target).item())
    # ...and values outside [0, 1] are clamped before measuring.
    assert math.isinf(psnr(torch.full_like(target, 1.7), torch.ones_like(target)).item())


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    image = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    metrics = image_metrics(image, image.clone())
    assert torch.isinf(metrics["psnr"]).all() and (metrics["psnr"] > 0).all()
    assert torch.isinf(metrics["psnr_y"]).all()
    torch.testing.assert_close(metrics["ssim"], torch.ones(2, dtype=torch.float32))
    torch.testing.assert_close(metrics["ssim_y"], torch.ones(2, dtype=torch.float32))


def test_mismatched_or_non_rgb_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 64), torch.zeros(1, 3, 8, 64))
