"""The classic DCP dehazer (the paper's Table 1 "DCP" column) on the real SOTS-indoor samples.

Quality: PSNR / SSIM of DCP output against the clear image, with the hazy input itself as
the baseline (ratio = DCP PSNR / hazy PSNR). Speed: seconds per 620x460 image of
``hdm_model.priors.dehaze`` (float64 summed-area tables) against the same dehazer with the
float32 tables it used before, and the largest box-filter error of each on a 12-megapixel
image (the reason for float64).

    python bench/dcp_baseline.py [--data ../shared/data/realworld/dehaze/SOTS-indoor]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from hdm_model import priors
from hdm_model.metrics import psnr, ssim
from hdm_platform.imageio import read_image


def float32_box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The summed-area box filter as it was, accumulating in the input's float32."""
    if radius <= 0:
        return x
    height, width = x.shape[-2:]
    integral = F.pad(x, (1, 0, 1, 0)).cumsum(-1).cumsum(-2)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    top, bottom = (rows - radius).clamp(min=0), (rows + radius + 1).clamp(max=height)
    left, right = (cols - radius).clamp(min=0), (cols + radius + 1).clamp(max=width)
    window_sum = (
        integral[..., bottom, :][..., right]
        - integral[..., top, :][..., right]
        - integral[..., bottom, :][..., left]
        + integral[..., top, :][..., left]
    )
    area = (bottom - top).to(x.dtype)[:, None] * (right - left).to(x.dtype)[None, :]
    return window_sum / area


def seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/realworld/dehaze/SOTS-indoor")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    hazy_paths = sorted((args.data / "hazy").glob("*.png"))
    hazy = torch.stack([read_image(path) for path in hazy_paths])
    clear = torch.stack([read_image(args.data / "gt" / f"{path.stem.split('_')[0]}.png") for path in hazy_paths])
    restored = priors.dehaze(hazy)
    hazy_psnr, dcp_psnr = psnr(hazy, clear), psnr(restored, clear)
    hazy_ssim, dcp_ssim = ssim(hazy, clear), ssim(restored, clear)
    print(f"{len(hazy_paths)} SOTS-indoor pairs, {hazy.shape[-1]}x{hazy.shape[-2]}")
    for path, a, b, c, d in zip(hazy_paths, hazy_psnr, hazy_ssim, dcp_psnr, dcp_ssim):
        print(f"  {path.name}: hazy {a:.2f} dB / {b:.3f}   DCP {c:.2f} dB / {d:.3f}")
    print(
        f"mean: hazy {hazy_psnr.mean():.2f} dB / {hazy_ssim.mean():.3f}, "
        f"DCP {dcp_psnr.mean():.2f} dB / {dcp_ssim.mean():.3f} "
        f"(ratio {dcp_psnr.mean() / hazy_psnr.mean():.2f}x; paper's DCP on all of SOTS: 15.09 / 0.765)"
    )

    one = hazy[:1]
    now = seconds(lambda: priors.dehaze(one), args.repeats)
    with mock.patch.object(priors, "box_filter", float32_box_filter):
        before = seconds(lambda: priors.dehaze(one), args.repeats)
    print(f"dehaze 620x460: {now:.3f} s (float64 tables) vs {before:.3f} s (float32 tables), "
          f"{now / before:.2f}x the time")

    large = torch.rand(1, 1, 3000, 4000, generator=torch.Generator().manual_seed(0))
    for radius in (1, 60):
        exact = F.avg_pool2d(large.double(), 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
        error64 = (priors.box_filter(large, radius) - exact).abs().max().item()
        error32 = (float32_box_filter(large, radius) - exact).abs().max().item()
        print(f"box filter r={radius} on 12 MP: max error {error64:.1e} (float64 tables) vs {error32:.1e} (float32)")


if __name__ == "__main__":
    main()
