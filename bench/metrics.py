"""Speed and agreement of ``hdm_model.metrics.image_metrics`` (PSNR, SSIM, on RGB and Y).

Baseline: scikit-image (float64, one image at a time), the reference the tests check
against. Also shown: the same code in float64, to justify float32, and SSIM (RGB and Y) by
torchmetrics' ``structural_similarity_index_measure``, which ``hdm_model.metrics.ssim``
replaces, on the 5 pairs and on a validation's share of one worker (12 images of 96x96 in
batches of 3, 1 thread, as the quickstart validates).
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


def torchmetrics_ssim(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ssim": metrics.ssim_reference(pred, target), "ssim_y": metrics.ssim_reference(pred, target, y_channel=True)}


def ours_ssim(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ssim": metrics.ssim(pred, target), "ssim_y": metrics.ssim(pred, target, y_channel=True)}


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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

    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    small = torch.rand(12, 3, 96, 96, generator=generator)
    small_pred = (small + 0.1 * torch.randn(small.shape, generator=generator)).clamp(0, 1)
    cases = {
        f"5 SOTS pairs, 620x460, {threads} threads": (lambda ssim: ssim(hazy, clear), 3, threads),
        "12 images of 96x96 in batches of 3, 1 thread": (
            lambda ssim: [ssim(small_pred[i : i + 3], small[i : i + 3]) for i in range(0, 12, 3)], 20, 1
        ),
    }  # fmt: skip
    print("SSIM on RGB and Y, median seconds: torchmetrics (baseline) -> hdm_model.metrics.ssim")
    for label, (run, repeats, case_threads) in cases.items():
        torch.set_num_threads(case_threads)
        baseline = median_seconds(lambda: run(torchmetrics_ssim), repeats)
        fast = median_seconds(lambda: run(ours_ssim), repeats)
        torch.set_num_threads(threads)
        print(f"  {label}: {baseline:.4f} s -> {fast:.4f} s ({baseline / fast:.1f}x)")
    difference = max(
        (torchmetrics_ssim(hazy, clear)[name] - ours_ssim(hazy, clear)[name]).abs().max().item()
        for name in ("ssim", "ssim_y")
    )  # fmt: skip
    print(f"  max |diff| ours vs torchmetrics on the SOTS pairs: {difference:.1e}")


if __name__ == "__main__":
    main()
