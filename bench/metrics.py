"""Speed and agreement of ``hdm_model.metrics.image_metrics`` (PSNR, SSIM, on RGB and Y).

Baseline: scikit-image (float64, one image at a time), the reference the tests check
against. Also shown: the same torchmetrics code in float64, to justify float32.
Reports seconds for the 5 real SOTS-indoor pairs (620x460) and the largest difference from
scikit-image for each metric.

    python bench/metrics.py [--data ../shared/data/realworld/dehaze/SOTS-indoor]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hdm_model import metrics
from hdm_platform.imageio import read_image

_SSIM_OPTIONS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)


def skimage_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_y": [], "ssim_y": []}
    for one_pred, one_target in zip(pred, target):
        a = np.round(one_pred.clamp(0, 1).permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
        b = np.round(one_target.clamp(0, 1).permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
        a_y, b_y = rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0]
        results["psnr"].append(peak_signal_noise_ratio(b, a, data_range=255))
        results["ssim"].append(structural_similarity(b, a, channel_axis=2, **_SSIM_OPTIONS))
        results["psnr_y"].append(peak_signal_noise_ratio(b_y, a_y, data_range=255))
        results["ssim_y"].append(structural_similarity(b_y, a_y, **_SSIM_OPTIONS))
    return results


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/realworld/dehaze/SOTS-indoor")
    args = parser.parse_args()
    hazy_paths = sorted((args.data / "hazy").glob("*.png"))
    hazy = torch.stack([read_image(path) for path in hazy_paths])
    clear = torch.stack([read_image(args.data / "gt" / f"{path.stem.split('_')[0]}.png") for path in hazy_paths])

    metrics.image_metrics(hazy[:1], clear[:1])  # warm-up
    reference, baseline_seconds = timed(lambda: skimage_metrics(hazy, clear))
    ours, ours_seconds = timed(lambda: metrics.image_metrics(hazy, clear))
    as_float64 = lambda image: image.detach().double().clamp(0, 1).mul(255).round()  # noqa: E731
    with mock.patch.object(metrics, "quantize", as_float64):
        ours64, float64_seconds = timed(lambda: metrics.image_metrics(hazy, clear))

    print(f"{len(hazy_paths)} SOTS-indoor pairs, 620x460, 4 metrics each")
    print(f"scikit-image (baseline): {baseline_seconds:.2f} s")
    print(f"image_metrics float32:   {ours_seconds:.2f} s ({baseline_seconds / ours_seconds:.1f}x faster)")
    print(f"image_metrics float64:   {float64_seconds:.2f} s ({baseline_seconds / float64_seconds:.1f}x faster)")
    for name, values in reference.items():
        expected = torch.tensor(values, dtype=torch.float64)
        error32 = (ours[name].double() - expected).abs().max().item()
        error64 = (ours64[name].double() - expected).abs().max().item()
        print(f"  {name}: max |diff| vs scikit-image {error32:.1e} (float32), {error64:.1e} (float64)")


if __name__ == "__main__":
    main()
