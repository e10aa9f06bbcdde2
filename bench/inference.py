"""Seconds per image of the default HDM (K=7): plain float32 forward vs the fast path.

Baseline: ``model(x)`` under ``torch.no_grad`` on a contiguous tensor (float32, NCHW,
masks computed inside), with the library's deformable conv (``torchvision.ops.deform_conv2d``,
the reference of ``hdm_model.deform``). Variants, run interleaved (baseline, variant,
baseline, ...) so that a machine shared with other jobs loads them alike; figures are medians:

- ``plain+op``: the baseline with the device's measured deformable conv
  (``hdm_model.deform.implementation_for``): what the op alone gives a plain forward.
- ``fp32+CL``: ``enhance`` on ``prepare_for_inference(fold_head=False)``: inference_mode,
  channels_last, the device's deformable conv.
- ``fast``: ``enhance(precision="auto")`` on ``prepare_for_inference(...)``: channels_last,
  the device's deformable conv and the decoder head's three convs folded into one; "auto"
  is bfloat16 on CUDA GPUs and on CPUs with AMX or AMD AVX512_BF16, float32 elsewhere.
- ``bf16``: the fast path forced to bfloat16 autocast (deformable conv in float32); only on
  CPUs with bfloat16 instructions (``--bf16`` forces it: elsewhere it is emulated, ~40x slower).
- ``compiled`` (``--compile``): the fast path under ``torch.compile`` with frozen weights;
  its one-off compile time is printed.

Also reports the PSNR of each variant's output against the baseline's and the DCP mask
time as a share of the baseline. Goals: fast >= 1.8x the baseline, >= 40 dB, masks < 5%.

    python bench/inference.py [--sizes 256 512] [--repeats 5] [--threads N] [--compile] [--bf16]
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
from hdm_model.deform import implementation_for
from hdm_model.inference import resolve_precision

GOAL_SPEEDUP = 1.8
GOAL_PSNR_DB = 40.0


def has_bf16_instructions() -> bool:
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


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
    parser.add_argument("--bf16", action="store_true", help="time bf16 even without bf16 instructions")
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
    for block in baseline.structure:
        block.implementation = "torchvision"
    with_op = copy.deepcopy(baseline)
    for block in with_op.structure:
        block.implementation = None
    channels_last = prepare_for_inference(copy.deepcopy(with_op), device="cpu", fold_head=False)
    fast = prepare_for_inference(copy.deepcopy(with_op), device="cpu")
    variants: dict[str, tuple[HDM, str]] = {
        "fp32+CL": (channels_last, "fp32"),
        "fast": (fast, "auto"),
    }
    if args.bf16 or has_bf16_instructions():
        variants["bf16"] = (fast, "bf16")
    if args.compile:
        variants["compiled"] = (
            prepare_for_inference(copy.deepcopy(with_op), device="cpu", compile=True),
            "auto",
        )
    print(f"HDM default (K=7, {sum(p.numel() for p in baseline.parameters()):,} parameters, random init)")
    print(
        f"CPU: {torch.cpu.get_capabilities().get('cpu_name') or platform.machine()} "
        f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; precision 'auto' here = {resolve_precision('auto', 'cpu')}; "
        f"deformable conv: baseline torchvision, variants {implementation_for('cpu')!r}"
    )
    if "bf16" not in variants:
        print("bf16: not timed, this CPU has no bfloat16 instructions (--bf16 to force)")
    for size in args.sizes:
        image = test_image(size)
        with torch.no_grad():
            reference = baseline(image.contiguous())
        if args.compile:
            start = time.perf_counter()
            enhance(variants["compiled"][0], image)
            print(f"{size}x{size}: compile + first call {time.perf_counter() - start:.1f} s")

        def plain(image: torch.Tensor = image, model: HDM = baseline) -> None:
            with torch.no_grad():
                model(image.contiguous())

        runs: dict[str, Callable[[], object]] = {
            "baseline": plain,
            "plain+op": lambda image=image: plain(image, with_op),
        }
        for name, (model, precision) in variants.items():
            runs[name] = lambda model=model, precision=precision, image=image: enhance(
                model, image, precision=precision
            )
        runs["DCP masks"] = lambda image=image: baseline.region_masks(image)
        seconds = interleaved_seconds(runs, args.repeats)
        print(f"{size}x{size}: baseline fp32 model(x) {seconds['baseline']:.3f} s/img; "
              f"DCP masks {100 * seconds['DCP masks'] / seconds['baseline']:.1f}% of it")
        with torch.no_grad():
            outputs = {"plain+op": with_op(image.contiguous())}
        for name, (model, precision) in variants.items():
            outputs[name] = enhance(model, image, precision=precision)
        for name, output in outputs.items():
            print(
                f"  {name:>8}: {seconds[name]:.3f} s/img, {seconds['baseline'] / seconds[name]:.2f}x, "
                f"{psnr(output, reference):.1f} dB vs baseline"
            )
        speedup, quality = seconds["baseline"] / seconds["fast"], psnr(outputs["fast"], reference)
        met = speedup >= GOAL_SPEEDUP and quality >= GOAL_PSNR_DB
        print(
            f"  goal (fast >= {GOAL_SPEEDUP}x at >= {GOAL_PSNR_DB:.0f} dB): {'met' if met else 'NOT met'}; "
            f"fast vs plain+op {seconds['plain+op'] / seconds['fast']:.2f}x"
        )


if __name__ == "__main__":
    main()
