"""Seconds per image of the default HDM (K=7): plain float32 forward vs the fast path.

Baseline: ``model(x)`` under ``torch.no_grad`` on a contiguous tensor (float32, NCHW,
masks computed inside). Variants, run interleaved (baseline, variant, baseline, ...) so
that a machine shared with other jobs loads them alike; figures are medians:

- ``fp32+CL``: ``enhance`` on ``prepare_for_inference(fold_head=False)``: inference_mode,
  channels_last.
- ``fast``: ``enhance(precision="auto")`` on ``prepare_for_inference(...)``: channels_last
  and the decoder head's last two convs folded into one; "auto" is float32 on CPUs without
  AMX and bfloat16 on AMX CPUs and CUDA GPUs.
- ``bf16``: the fast path forced to bfloat16 autocast (deformable conv in float32).
- ``compiled`` (``--compile``): the fast path under ``torch.compile`` with frozen weights;
  its one-off compile time is printed.

Also reports the PSNR of each variant's output against the baseline's and the DCP mask
time as a share of the baseline. Goals: fast >= 1.8x the baseline, >= 40 dB, masks < 5%.

    python bench/inference.py [--sizes 256 512] [--repeats 5] [--threads N] [--compile]
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

from hdm_model import HDM, enhance, hdm, prepare_for_inference
from hdm_model.inference import resolve_precision


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns; one untimed warm-up each (oneDNN
    picks and caches its kernels on the first call)."""
    for run in runs.values():
        run()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def test_image(size: int) -> torch.Tensor:
    """A smooth hazy-looking photo stand-in (the timing does not depend on content)."""
    generator = torch.Generator().manual_seed(size)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.6 * image + 0.4).clamp(0, 1)


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    return 10 * torch.log10(1 / F.mse_loss(output, reference)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow warm-up)")
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
    channels_last = prepare_for_inference(copy.deepcopy(baseline), device="cpu", fold_head=False)
    fast = prepare_for_inference(copy.deepcopy(baseline), device="cpu")
    variants: dict[str, tuple[HDM, str]] = {
        "fp32+CL": (channels_last, "fp32"),
        "fast": (fast, "auto"),
        "bf16": (fast, "bf16"),
    }
    if args.compile:
        variants["compiled"] = (
            prepare_for_inference(copy.deepcopy(baseline), device="cpu", compile=True),
            "auto",
        )
    print(f"HDM default (K=7, {sum(p.numel() for p in baseline.parameters()):,} parameters, random init)")
    print(
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; precision 'auto' here = {resolve_precision('auto', 'cpu')}"
    )
    for size in args.sizes:
        image = test_image(size)
        with torch.no_grad():
            reference = baseline(image.contiguous())
        if args.compile:
            start = time.perf_counter()
            enhance(variants["compiled"][0], image)
            print(f"{size}x{size}: compile + first call {time.perf_counter() - start:.1f} s")

        def plain(image: torch.Tensor = image) -> None:
            with torch.no_grad():
                baseline(image.contiguous())

        runs: dict[str, Callable[[], object]] = {"baseline": plain}
        for name, (model, precision) in variants.items():
            runs[name] = lambda model=model, precision=precision, image=image: enhance(
                model, image, precision=precision
            )
        runs["DCP masks"] = lambda image=image: baseline.region_masks(image)
        seconds = interleaved_seconds(runs, args.repeats)
        print(f"{size}x{size}: baseline fp32 model(x) {seconds['baseline']:.3f} s/img; "
              f"DCP masks {100 * seconds['DCP masks'] / seconds['baseline']:.1f}% of it")
        for name, (model, precision) in variants.items():
            quality = psnr(enhance(model, image, precision=precision), reference)
            print(
                f"  {name:>8}: {seconds[name]:.3f} s/img, {seconds['baseline'] / seconds[name]:.2f}x, "
                f"{quality:.1f} dB vs baseline"
            )


if __name__ == "__main__":
    main()
