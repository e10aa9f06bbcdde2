"""Seconds per image of the default HDM (K=7): plain float32 forward vs the fast path.

Baseline: ``model(x)`` under ``torch.no_grad`` on a contiguous tensor (float32, masks
computed inside). Also shown: ``enhance(...)`` in float32 (inference_mode, channels_last).
Fast path: ``enhance(..., precision="bf16")`` (inference_mode,
channels_last, bfloat16 autocast, deformable conv in float32). Also reports the PSNR of
the fast path against the baseline and the DCP mask time as a share of the forward pass.
Goals: >= 1.8x faster, >= 40 dB, masks < 5%.

    python bench/inference.py [--sizes 256 512] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hdm_model import enhance, hdm, prepare_for_inference


def seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: oneDNN picks and caches its kernels on the first call
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def test_image(size: int) -> torch.Tensor:
    """A smooth hazy-looking photo stand-in (the timing does not depend on content)."""
    generator = torch.Generator().manual_seed(size)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.6 * image + 0.4).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    baseline = hdm().eval()
    with torch.no_grad():
        # Random-init outputs sit near 0 and would make the PSNR trivially high; a wider head
        # spreads them over [0, 1] like a trained model's.
        baseline.decoder.head[2].weight.mul_(20)
        baseline.decoder.head[2].bias.fill_(0.55)
    fast = prepare_for_inference(copy.deepcopy(baseline), device="cpu")
    print(f"HDM default (K=7, {sum(p.numel() for p in baseline.parameters()):,} parameters, random init)")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = (
        f"{'size':>9} | {'fp32 s/img':>10} | {'fp32+CL s/img':>13} | {'bf16+CL s/img':>13} | "
        f"{'bf16 speed-up':>13} | {'bf16 PSNR dB':>12} | {'DCP masks':>9}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        image = test_image(size)
        with torch.no_grad():
            reference = baseline(image.contiguous())
        fast_output = enhance(fast, image, precision="bf16")
        psnr = 10 * torch.log10(1 / F.mse_loss(fast_output, reference)).item()

        def plain() -> None:
            with torch.no_grad():
                baseline(image.contiguous())

        plain_seconds = seconds(plain, args.repeats)
        channels_last_seconds = seconds(lambda: enhance(fast, image), args.repeats)
        fast_seconds = seconds(lambda: enhance(fast, image, precision="bf16"), args.repeats)
        mask_seconds = seconds(lambda: baseline.region_masks(image), args.repeats)
        print(
            f"{size:>4}x{size:<4} | {plain_seconds:>10.3f} | {channels_last_seconds:>13.3f} | "
            f"{fast_seconds:>13.3f} | {plain_seconds / fast_seconds:>12.2f}x | {psnr:>12.1f} | "
            f"{100 * mask_seconds / plain_seconds:>8.1f}%"
        )
        print(f"{'':>9}   fp32+CL speed-up over fp32: {plain_seconds / channels_last_seconds:.2f}x")
    print("DCP masks: share of the fp32 forward pass spent computing the region masks.")


if __name__ == "__main__":
    main()
