"""The dark channel prior pieces and the classic DCP dehazer (the paper's Table 1 "DCP")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from hdm_model.metrics import psnr, ssim
from hdm_model.priors import (
    atmospheric_light,
    box_filter,
    dark_channel,
    dehaze,
    guided_filter,
    transmission,
)
from realworld import REALWORLD

SOTS = REALWORLD / "dehaze" / "SOTS-indoor"


def _load(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _brute_force_box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    out = torch.empty_like(x)
    for row in range(height):
        for col in range(width):
            window = x[..., max(0, row - radius) : row + radius + 1, max(0, col - radius) : col + radius + 1]
            out[..., row, col] = window.mean(dim=(-2, -1))
    return out


@pytest.mark.parametrize("radius", [1, 3, 9])
def test_box_filter_is_the_border_clipped_window_mean(radius):
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(radius))
    torch.testing.assert_close(box_filter(x, radius), _brute_force_box_mean(x, radius))


def test_box_filter_stays_exact_on_large_images():
    # Summed-area tables of big images need wide accumulators; small windows expose it.
    x = torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(0))
    window = box_filter(x, 1)[..., -3:, -3:]
    expected = _brute_force_box_mean(x[..., -5:, -5:], 1)[..., -3:, -3:]
    torch.testing.assert_close(window, expected, atol=1e-6, rtol=0)


def test_box_filter_radius_zero_is_identity():
    x = torch.rand(1, 1, 5, 5)
    assert box_filter(x, 0) is x


def test_dark_channel_of_known_images():
    image = torch.ones(1, 3, 32, 32)
    image[:, 0, 10, 20] = 0.1  # one dark red pixel: every 15x15 patch that contains it goes dark
    image[:, 2] = 0.7  # a bright blue floor elsewhere
    dark = dark_channel(image, patch_size=15)
    assert dark.shape == (1, 1, 32, 32)
    assert dark[0, 0, 10, 20] == pytest.approx(0.1)
    assert dark[0, 0, 3, 13] == pytest.approx(0.1) and dark[0, 0, 17, 27] == pytest.approx(0.1)
    assert dark[0, 0, 2, 20] == pytest.approx(0.7) and dark[0, 0, 10, 12] == pytest.approx(0.7)
    assert torch.equal(dark_channel(image, patch_size=1), image.amin(dim=1, keepdim=True))


def test_airlight_and_transmission_of_a_uniform_haze():
    # Pure airlight everywhere: A is its colour and the transmission is 1 - omega.
    airlight_colour = torch.tensor([0.8, 0.85, 0.9]).view(1, 3, 1, 1)
    image = airlight_colour.expand(1, 3, 20, 20).clone()
    airlight = atmospheric_light(image, dark_channel(image))
    torch.testing.assert_close(airlight, airlight_colour)
    torch.testing.assert_close(transmission(image, airlight, omega=0.95), torch.full((1, 1, 20, 20), 0.05))


def test_guided_filter_keeps_edges_of_the_guide():
    guide = torch.zeros(1, 1, 32, 32)
    guide[..., 16:] = 1.0
    noisy = guide + 0.05 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    smoothed = guided_filter(guide, noisy, radius=4, eps=1e-3)
    assert (smoothed - guide).abs().mean() < (noisy - guide).abs().mean() / 2
    assert smoothed[..., 15].mean() < 0.1 and smoothed[..., 16].mean() > 0.9


def test_dehaze_removes_synthetic_haze_from_a_clear_photo():
    clear = torch.from_numpy(skimage_data.astronaut()[::2, ::2].astype(np.float32) / 255.0)
    clear = clear.permute(2, 0, 1)[None].contiguous()
    height, width = clear.shape[-2:]
    depth = torch.linspace(0.2, 1.0, width).view(1, 1, 1, width).expand(1, 1, height, width)
    transmission_map = torch.exp(-1.5 * depth)
    hazy = clear * transmission_map + 0.9 * (1 - transmission_map)
    restored = dehaze(hazy)
    assert restored.shape == hazy.shape and restored.min() >= 0 and restored.max() <= 1
    # Measured: hazy 9.53 dB / 0.602, DCP 20.85 dB / 0.829 (256x256 astronaut).
    assert psnr(restored, clear).item() > psnr(hazy, clear).item() + 5
    assert ssim(restored, clear).item() > ssim(hazy, clear).item() + 0.05


def test_dehaze_on_real_sots_pairs_lands_in_the_published_range():
    hazy_paths = sorted((SOTS / "hazy").glob("*.png"))
    hazy = torch.cat([_load(path) for path in hazy_paths])
    clear = torch.cat([_load(SOTS / "gt" / f"{path.stem.split('_')[0]}.png") for path in hazy_paths])
    restored = dehaze(hazy)
    hazy_psnr, restored_psnr = psnr(hazy, clear), psnr(restored, clear)
    # Measured on these 5 pairs: hazy 13.96 dB, DCP 20.69 dB on average (15.8-25.2 per
    # image); the paper's DCP column reports 15.09 dB over all of SOTS.
    assert (restored_psnr > hazy_psnr).all()
    assert 14.0 < restored_psnr.mean().item() < 26.0
    assert ((restored_psnr > 13.0) & (restored_psnr < 30.0)).all()
