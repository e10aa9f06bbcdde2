"""The structure level's deformable conv: ``hdm_model.deform``'s gather version against
torchvision's ``deform_conv2d`` (the baseline), on this machine's CPU.

Cases are the shapes HDM runs: 64 channels at 1/4 of a 512x512 image (inference: forward
under ``torch.inference_mode``, features channels_last as the fast path has them) and a
training batch of 8 crops of 64x64 (16x16 features; forward and backward). Offsets of a few
pixels send part of the samples outside the feature map. Runs take turns (baseline, ours,
baseline, ...), medians of ``--repeats``. This is the measurement behind
``hdm_model.deform.IMPLEMENTATION_BY_DEVICE["cpu"]``.

    python bench/deform.py [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from hdm_model.deform import modulated_deform_conv3x3

CASES = {
    "inference, 1 x 64 x 128 x 128 (512x512 image)": (1, 128, False),
    "inference, 4 x 64 x 64 x 64 (4 images of 256x256)": (4, 64, False),
    "training, 8 x 64 x 16 x 16 (crops of 64x64), forward + backward": (8, 16, True),
    "training, 8 x 64 x 64 x 64 (crops of 256x256), forward + backward": (8, 64, True),
}


def case_inputs(batch: int, size: int, *, seed: int = 0) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 64, size, size, generator=generator)
    offset = torch.randn(batch, 18, size, size, generator=generator) * 2
    mask = torch.rand(batch, 9, size, size, generator=generator)
    weight = torch.randn(64, 64, 3, 3, generator=generator) * 0.05
    bias = torch.randn(64, generator=generator)
    return features.contiguous(memory_format=torch.channels_last), offset, mask, weight, bias


def run_of(implementation: str, inputs: tuple[Tensor, ...], backward: bool) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            modulated_deform_conv3x3(*inputs, implementation=implementation)

    def forward_backward() -> None:
        leaves = [tensor.detach().requires_grad_() for tensor in inputs]
        modulated_deform_conv3x3(*leaves, implementation=implementation).square().mean().backward()

    return forward_backward if backward else forward


def interleaved_seconds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    capabilities = torch.cpu.get_capabilities()
    print(
        f"CPU: {capabilities.get('cpu_name')} ({torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for label, (batch, size, backward) in CASES.items():
        inputs = case_inputs(batch, size)
        seconds = interleaved_seconds(
            {name: run_of(name, inputs, backward) for name in ("torchvision", "gather")},
            args.repeats,
        )
        print(
            f"{label}: torchvision {1000 * seconds['torchvision']:.1f} ms, "
            f"gather {1000 * seconds['gather']:.1f} ms, "
            f"{seconds['torchvision'] / seconds['gather']:.2f}x"
        )


if __name__ == "__main__":
    main()
