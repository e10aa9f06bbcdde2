"""GPU checks of the HDM model in one short run: model tests, inference latency, training throughput.

Made for a lent GPU machine that has PyTorch, torchvision, NumPy, Pillow, safetensors and
torchmetrics but no Ray, MLflow or package registry: this module imports only torch,
torchvision, the standard library and ``hdm_model``. Four sections, each in a process of
its own under a time budget, so that a CUDA fault or a slow compile in one cannot take the
others down; every check is recorded on its own (a failing check does not stop the rest):

* ``model``: forward and backward, agreement with the CPU (TF32 off), bfloat16 autocast with
  the deformable conv kept in float32, DCP masks on the device, tiled equal to untiled, a
  checkpoint round trip;
* ``inference``: latency of the paper's HDM (``hdm()``, K=7, batch 1) at 512x512 and
  1920x1080 for the plain float32 forward, channels_last, the fast path (channels_last and
  the folded head) in float32 and bfloat16, and the DCP masks alone: medians after warm-up
  (CUDA events on a GPU, ``time.perf_counter`` on a CPU), PSNR against true float32 (TF32
  off) and peak GPU memory;
* ``compile``: the fast path under ``prepare_for_inference(compile=True)``, at the device's
  ``precision="auto"``, with its compile and warm-up time;
* ``training``: samples/s of a plain training loop of the paper's model (crop 256, batch 16,
  Adam, L1, EMA of the weights, as ``hdm_platform.train``), float32 and bfloat16 autocast.

A JSON and a Markdown summary go to ``--out`` (default ``$OUT``). Exit status 0 when every
check that ran passed, 1 otherwise, 2 for bad arguments or a missing CUDA device.

    bash scripts/gpu-check.sh                                  # on a CUDA machine, under 8 minutes
    bash scripts/gpu-check.sh --device cpu --quick --skip-compile   # tiny sizes, on any CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Adam
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hdm_model import structure
from hdm_model import HDM, enhance, hdm, load_checkpoint, prepare_for_inference, save_checkpoint
from hdm_model.inference import resolve_precision
from hdm_model.losses import EnhancementLoss

SECTIONS = ("model", "inference", "compile", "training")
RESULT_JSON = "gpu-check.json"
RESULT_MARKDOWN = "gpu-check.md"
SCHEMA_VERSION = 1
MIN_PSNR_DB = 40.0
"""Every fast variant, tiled output and bfloat16 output against float32 (the project's goal)."""
MIN_DEVICE_PSNR_DB = 50.0
"""The device's true-float32 output against the CPU's."""
MAX_GRADIENT_RELATIVE_ERROR = 1e-3
MIN_MASK_AGREEMENT = 0.999
DEFAULT_DEADLINE_S = 470.0
"""The whole run, under the 8 minutes a lent machine's 10-minute command can spare."""
_MIN_SECTION_S = 10.0
"""A section is not started with less of the run's deadline left."""

Size = tuple[int, int]
"""(height, width)."""


def size_label(size: Size) -> str:
    return f"{size[1]}x{size[0]}"


@dataclass(frozen=True)
class Profile:
    """Sizes, iterations and time budgets of one run."""

    name: str
    model_overrides: Mapping[str, int]
    check_size: Size
    tiled_size: Size
    tile: int
    tile_overlap: int
    latency_sizes: tuple[Size, ...]
    compile_sizes: tuple[Size, ...]
    warmup: int
    repeats: int
    compile_warmup: int
    train_crop: int
    train_batch: int
    train_warmup: int
    train_steps: int
    budgets_s: Mapping[str, float]


PAPER = Profile(
    name="paper",
    model_overrides={},
    check_size=(94, 126),
    tiled_size=(300, 420),
    tile=256,
    tile_overlap=32,
    latency_sizes=((512, 512), (1080, 1920)),
    compile_sizes=((512, 512), (1080, 1920)),
    warmup=5,
    repeats=20,
    # The compiled model recompiles on its second call (a guard on FoldedHead's kernel cache).
    compile_warmup=3,
    train_crop=256,
    train_batch=16,
    train_warmup=3,
    train_steps=15,
    budgets_s={"model": 60, "inference": 90, "compile": 210, "training": 90},
)
"""The paper's model (K=7) at the sizes the issue names; budgets sum to 450 s."""

QUICK = Profile(
    name="quick",
    model_overrides={"channels": 16, "num_groups": 1, "blocks_per_group": 1},
    check_size=(22, 30),
    tiled_size=(70, 90),
    tile=48,
    tile_overlap=16,
    latency_sizes=((64, 64), (54, 96)),
    compile_sizes=((64, 64),),
    warmup=2,
    repeats=3,
    compile_warmup=2,
    train_crop=32,
    train_batch=2,
    train_warmup=1,
    train_steps=3,
    # A cold inductor compile of even the tiny model takes 1-2 minutes on 2 CPU cores.
    budgets_s={"model": 60, "inference": 60, "compile": 300, "training": 60},
)
"""A tiny model at tiny sizes: the same code paths, in seconds on a CPU."""


class CheckSkipped(Exception):
    """A check that does not apply to this device; its message says why."""


# --------------------------------------------------------------------------- measuring


def synthetic_image(size: Size, *, batch: int = 1, seed: int = 0) -> Tensor:
    """A bright, low-contrast, hazy-looking RGB batch in [0, 1] (smooth colour fields plus
    fine noise), on the CPU. Timings do not depend on the content; the comparisons need a
    real range of values."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 8, generator=generator)
    smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    noise = torch.rand(batch, 3, *size, generator=generator)
    return (0.5 * smooth + 0.35 + 0.15 * noise).clamp(0.0, 1.0)


def clear_target(hazy: Tensor) -> Tensor:
    """A fixed training target for ``hazy`` (the loop's speed does not depend on it)."""
    return (1.4 * hazy - 0.4).clamp(0.0, 1.0)


def spread_output(model: HDM) -> HDM:
    """A random-init model whose eval output spans most of [0, 1] like a trained model's
    instead of sitting at 0, so that output comparisons are not trivially close."""
    with torch.no_grad():
        model.decoder.head[2].weight.mul_(20)
        model.decoder.head[2].bias.fill_(0.55)
    return model


def psnr_db(output: Tensor, reference: Tensor) -> float | None:
    """PSNR of ``output`` against ``reference`` (both in [0, 1]); None when identical."""
    mse = F.mse_loss(output.double().cpu(), reference.double().cpu()).item()
    return None if mse == 0 else 10 * math.log10(1 / mse)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    run: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones: CUDA events
    on a GPU (the device's time between the two points of the stream), ``perf_counter``
    on a CPU."""
    for _ in range(warmup):
        run()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            run()
            samples.append(1000 * (time.perf_counter() - started))
    return samples


def timing_figures(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": len(samples),
    }


class PeakMemory:
    """Peak GPU memory allocated by tensors inside the block (``mib``; None on a CPU, where
    torch keeps no allocator statistics)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


@contextmanager
def strict_float32(device: torch.device) -> Iterator[None]:
    """True float32 convolutions: cuDNN's TF32 off (PyTorch's default allows it for convs on
    Ampere and later GPUs). Matmuls are float32 by default. Nothing to do on a CPU."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
        allow_tf32=False,
    ):  # fmt: skip
        yield


class Bench:
    """What the checks of one section share, built on first use, so that a failure to build
    it is the failure of each check that needs it."""

    def __init__(self, device: torch.device, profile: Profile) -> None:
        self.device = device
        self.profile = profile
        self._images: dict[tuple[Size, int, int], Tensor] = {}
        self._references: dict[Size, Tensor] = {}

    def fresh_model(self) -> HDM:
        """The profile's HDM with the seed-0 random initialisation, on the CPU, in train mode."""
        torch.manual_seed(0)
        return hdm(**self.profile.model_overrides)

    @functools.cached_property
    def base_model(self) -> HDM:
        """Seed-0 weights with a spread output, eval mode, on the CPU."""
        return spread_output(self.fresh_model()).eval()

    @functools.cached_property
    def plain_model(self) -> HDM:
        """``base_model`` on the device as a plain module (NCHW, unfolded head)."""
        return copy.deepcopy(self.base_model).to(self.device)

    @functools.cached_property
    def channels_last_model(self) -> HDM:
        return prepare_for_inference(copy.deepcopy(self.base_model), device=self.device, fold_head=False)

    @functools.cached_property
    def fast_model(self) -> HDM:
        return prepare_for_inference(copy.deepcopy(self.base_model), device=self.device)

    @functools.cached_property
    def compiled_model(self) -> HDM:
        return prepare_for_inference(copy.deepcopy(self.base_model), device=self.device, compile=True)

    def image(self, size: Size, *, batch: int = 1, seed: int = 0) -> Tensor:
        key = (size, batch, seed)
        if key not in self._images:
            self._images[key] = synthetic_image(size, batch=batch, seed=seed).to(self.device)
        return self._images[key]

    def reference(self, size: Size) -> Tensor:
        """The plain model's true-float32 output for ``image(size)``."""
        if size not in self._references:
            with torch.inference_mode(), strict_float32(self.device):
                self._references[size] = self.plain_model(self.image(size))
        return self._references[size]


# --------------------------------------------------------------------------- model checks


def _gradient_problems(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters without a gradient and of those with a non-finite one."""
    missing, non_finite = [], []
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            missing.append(name)
        elif not torch.isfinite(parameter.grad).all():
            non_finite.append(name)
    return missing, non_finite


def check_forward_backward(bench: Bench) -> dict[str, Any]:
    """Train-mode forward of an odd-sized batch, a gradient for every parameter, and three
    Adam steps that lower the loss on the fixed batch."""
    model = bench.fresh_model().to(bench.device).train()
    hazy = bench.image(bench.profile.check_size, batch=2, seed=1)
    clear = clear_target(hazy)
    optimizer = Adam(model.parameters(), lr=1e-3)
    output = model(hazy)
    assert output.shape == hazy.shape, f"output {list(output.shape)} for input {list(hazy.shape)}"
    assert output.device.type == bench.device.type, f"output on {output.device}"
    first = F.l1_loss(output, clear)
    first.backward()
    missing, non_finite = _gradient_problems(model)
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert not non_finite, f"non-finite gradients: {non_finite[:5]}"
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        F.l1_loss(model(hazy), clear).backward()
    with torch.no_grad():
        last = F.l1_loss(model(hazy), clear).item()
    assert last < first.item(), f"loss {first.item():.5f} -> {last:.5f} after 3 Adam steps"
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": first.item(),
        "loss_after_3_steps": last,
    }


def _gradient_relative_error(reference: nn.Module, other: nn.Module) -> float:
    squared_error = squared_norm = 0.0
    for (name, expected), (_, actual) in zip(reference.named_parameters(), other.named_parameters()):
        assert actual.grad is not None, f"no gradient for {name} on the device"
        squared_error += (actual.grad.double().cpu() - expected.grad.double()).square().sum().item()
        squared_norm += expected.grad.double().square().sum().item()
    return math.sqrt(squared_error / squared_norm)


def check_matches_cpu(bench: Bench) -> dict[str, Any]:
    """Output and gradients on the device against the CPU's, both in true float32."""
    if bench.device.type == "cpu":
        raise CheckSkipped("the device is the CPU, the reference itself")
    image = synthetic_image(bench.profile.check_size, batch=2, seed=2)
    on_cpu = copy.deepcopy(bench.base_model)
    on_device = copy.deepcopy(bench.base_model).to(bench.device)
    with torch.no_grad(), strict_float32(bench.device):
        output_psnr = psnr_db(on_device(image.to(bench.device)), on_cpu(image))
    assert output_psnr is None or output_psnr >= MIN_DEVICE_PSNR_DB, (
        f"eval output {output_psnr:.1f} dB from the CPU's (want >= {MIN_DEVICE_PSNR_DB})"
    )
    target = clear_target(image)
    F.l1_loss(on_cpu.train()(image), target).backward()
    with strict_float32(bench.device):
        F.l1_loss(on_device.train()(image.to(bench.device)), target.to(bench.device)).backward()
    relative_error = _gradient_relative_error(on_cpu, on_device)
    assert relative_error <= MAX_GRADIENT_RELATIVE_ERROR, (
        f"gradients {relative_error:.2e} (relative) from the CPU's (want <= {MAX_GRADIENT_RELATIVE_ERROR})"
    )
    return {"output_psnr_db_vs_cpu": output_psnr, "gradient_relative_error_vs_cpu": relative_error}


@contextmanager
def recorded_deform_input_dtypes() -> Iterator[set[torch.dtype]]:
    """The dtypes of every tensor the structure level hands its deformable conv inside the
    block (``hdm_model.deform.modulated_deform_conv3x3``, whichever kernel it picks)."""
    dtypes: set[torch.dtype] = set()
    original = structure.modulated_deform_conv3x3

    def recording(*args: Any, **kwargs: Any) -> Tensor:
        dtypes.update(value.dtype for value in (*args, *kwargs.values()) if isinstance(value, Tensor))
        return original(*args, **kwargs)

    structure.modulated_deform_conv3x3 = recording
    try:
        yield dtypes
    finally:
        structure.modulated_deform_conv3x3 = original


@contextmanager
def recorded_output_dtypes(module: nn.Module) -> Iterator[set[torch.dtype]]:
    dtypes: set[torch.dtype] = set()
    handle = module.register_forward_hook(lambda _module, _args, output: dtypes.add(output.dtype))
    try:
        yield dtypes
    finally:
        handle.remove()


def check_bf16_autocast(bench: Bench) -> dict[str, Any]:
    """Under bfloat16 autocast the convolutions run in bfloat16 and the deformable conv in
    float32, in inference (the fast path) and in a training step; the output stays close to
    true float32."""
    model = bench.fast_model
    image = bench.image(bench.profile.check_size, seed=3)
    first_conv = model.encoder.stem[0]
    with (
        recorded_deform_input_dtypes() as deform_dtypes,
        recorded_output_dtypes(first_conv) as conv_dtypes,
    ):
        output = enhance(model, image, precision="bf16")
    with strict_float32(bench.device):
        reference = enhance(model, image, precision="fp32")
    assert conv_dtypes == {torch.bfloat16}, f"convolutions ran in {conv_dtypes}, not bfloat16"
    assert deform_dtypes == {torch.float32}, f"deformable conv inputs were {deform_dtypes}"
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    quality = psnr_db(output, reference)
    assert quality is None or quality >= MIN_PSNR_DB, f"bf16 output {quality:.1f} dB from fp32"

    trained = bench.fresh_model().to(bench.device).train()
    batch = bench.image(bench.profile.check_size, batch=2, seed=1)
    with (
        recorded_deform_input_dtypes() as train_deform_dtypes,
        torch.autocast(bench.device.type, dtype=torch.bfloat16),
    ):
        loss = F.l1_loss(trained(batch).float(), clear_target(batch))
    loss.backward()
    missing, non_finite = _gradient_problems(trained)
    assert train_deform_dtypes == {torch.float32}, f"deformable conv inputs were {train_deform_dtypes}"
    assert not missing and not non_finite, f"gradients missing {missing[:3]}, non-finite {non_finite[:3]}"
    return {"psnr_db_vs_fp32": quality, "train_loss": loss.item()}


def check_dcp_masks(bench: Bench) -> dict[str, Any]:
    """One-hot region masks computed on the device, without a graph, at the padded feature
    shape, using more than one region; on a GPU they agree with the CPU's."""
    model = bench.plain_model
    height, width = bench.profile.check_size
    image = bench.image(bench.profile.check_size, batch=2, seed=4)
    masks = model.region_masks(image)
    expected = (2, model.config.num_regions, 1, math.ceil(height / 4), math.ceil(width / 4))
    assert tuple(masks.shape) == expected, f"masks {list(masks.shape)}, want {list(expected)}"
    assert masks.device.type == bench.device.type, f"masks on {masks.device}"
    assert not masks.requires_grad
    assert ((masks == 0) | (masks == 1)).all() and (masks.sum(dim=1) == 1).all(), "masks are not one-hot"
    regions_used = int((masks.sum(dim=(0, 2, 3, 4)) > 0).sum())
    assert regions_used >= 2, f"only {regions_used} region used"
    agreement = None
    if bench.device.type != "cpu":
        on_cpu = bench.base_model.region_masks(image.cpu())
        agreement = (masks.cpu() == on_cpu).all(dim=1).float().mean().item()
        assert agreement >= MIN_MASK_AGREEMENT, f"{agreement:.4%} of mask pixels agree with the CPU"
    return {"regions_used": regions_used, "agreement_with_cpu": agreement}


def check_tiled_equals_untiled(bench: Bench) -> dict[str, Any]:
    """``enhance`` with overlapping tiles against the whole image (>= 40 dB, as the tests)."""
    profile = bench.profile
    image = bench.image(profile.tiled_size, seed=5)
    whole = enhance(bench.fast_model, image)
    tiled = enhance(bench.fast_model, image, tile=profile.tile, tile_overlap=profile.tile_overlap)
    assert tiled.shape == image.shape and tiled.device.type == bench.device.type
    quality = psnr_db(tiled, whole)
    assert quality is None or quality >= MIN_PSNR_DB, f"tiled output {quality:.1f} dB from untiled"
    return {"psnr_db_vs_untiled": quality, "tile": profile.tile, "tile_overlap": profile.tile_overlap}


def check_checkpoint_round_trip(bench: Bench) -> dict[str, Any]:
    """A prepared (channels_last, folded) model saved from the device and loaded onto it:
    the same config and bitwise the same weights, on the device, with the same output."""
    original = bench.plain_model
    with tempfile.TemporaryDirectory(prefix="hdm-gpu-check-") as directory:
        prepared = prepare_for_inference(copy.deepcopy(original), device=bench.device)
        save_checkpoint(prepared, directory, metadata={"written_by": "scripts/gpu_check.py"})
        weights_mib = (Path(directory) / "model.safetensors").stat().st_size / 2**20
        loaded = load_checkpoint(directory, device=bench.device)
    assert loaded.config == original.config and not loaded.training
    expected, actual = original.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].device.type == bench.device.type, f"{name} loaded onto {actual[name].device}"
        assert torch.equal(actual[name], tensor), f"{name} differs after the round trip"
    image = bench.image(bench.profile.check_size, seed=6)
    with torch.no_grad():
        difference = (loaded(image) - original(image)).abs().max().item()
    assert difference <= 1e-6, f"outputs differ by {difference:.2e}"
    return {"weights_mib": weights_mib, "max_abs_output_difference": difference}


# --------------------------------------------------------------------------- latency and throughput

INFERENCE_VARIANTS = ("fp32", "fp32 channels_last", "fp32 fast", "bf16 fast")
"""``fp32``: ``model(x)`` on NCHW under ``inference_mode`` with PyTorch's default conv math
(TF32 on GPUs that have it): the baseline of the speed-ups. ``channels_last``:
``prepare_for_inference(fold_head=False)``; ``fast``: ``prepare_for_inference()``
(channels_last and the folded decoder head), through ``enhance``."""

_FAST_PATHS = {
    "fp32 channels_last": ("channels_last_model", "fp32"),
    "fp32 fast": ("fast_model", "fp32"),
    "bf16 fast": ("fast_model", "bf16"),
}


def _variant_call(bench: Bench, variant: str, image: Tensor) -> Callable[[], Tensor]:
    if variant == "fp32":
        model = bench.plain_model

        def plain() -> Tensor:
            with torch.inference_mode():
                return model(image)

        return plain
    attribute, precision = _FAST_PATHS[variant]
    model = getattr(bench, attribute)
    return lambda: enhance(model, image, precision=precision)


def _timed_output_figures(
    bench: Bench, size: Size, run: Callable[[], Tensor], *, warmup: int
) -> dict[str, Any]:
    """Timings of ``run`` and how its output compares with true float32."""
    with PeakMemory(bench.device) as peak:
        samples = time_calls(run, bench.device, warmup=warmup, repeats=bench.profile.repeats)
        output = run()
    assert output.shape == bench.image(size).shape and torch.isfinite(output).all()
    quality = psnr_db(output, bench.reference(size))
    assert quality is None or quality >= MIN_PSNR_DB, f"output {quality:.1f} dB from true fp32"
    return {
        **timing_figures(samples),
        "psnr_db_vs_fp32": quality,
        "max_abs_diff_vs_fp32": (output - bench.reference(size)).abs().max().item(),
        "peak_memory_mib": peak.mib,
    }


def check_latency(bench: Bench, size: Size, variant: str) -> dict[str, Any]:
    run = _variant_call(bench, variant, bench.image(size))
    return _timed_output_figures(bench, size, run, warmup=bench.profile.warmup)


def check_mask_latency(bench: Bench, size: Size) -> dict[str, Any]:
    """The DCP region masks alone (dark channel, airlight, guided filter, bins)."""
    model, image = bench.plain_model, bench.image(size)
    with PeakMemory(bench.device) as peak:
        samples = time_calls(
            lambda: model.region_masks(image), bench.device,
            warmup=bench.profile.warmup, repeats=bench.profile.repeats,
        )  # fmt: skip
    return {**timing_figures(samples), "peak_memory_mib": peak.mib}


def check_compiled_latency(bench: Bench, size: Size) -> dict[str, Any]:
    """``prepare_for_inference(compile=True)`` at ``precision="auto"``; the first calls at
    a new size compile (inductor, frozen weights) and are timed apart."""
    precision = resolve_precision("auto", bench.device)
    model, image = bench.compiled_model, bench.image(size)
    warmup_s = []
    for _ in range(bench.profile.compile_warmup):
        started = time.perf_counter()
        enhance(model, image, precision=precision)
        synchronize(bench.device)
        warmup_s.append(time.perf_counter() - started)
    figures = _timed_output_figures(
        bench, size, lambda: enhance(model, image, precision=precision), warmup=0
    )
    return {
        "precision": precision,
        "first_call_s": warmup_s[0],
        "compile_and_warmup_s": sum(warmup_s),
        **figures,
    }


def _training_batches(bench: Bench, count: int) -> list[tuple[Tensor, Tensor]]:
    profile = bench.profile
    crop = (profile.train_crop, profile.train_crop)
    batches = []
    for seed in range(count):
        hazy = bench.image(crop, batch=profile.train_batch, seed=100 + seed)
        batches.append(
            tuple(image.contiguous(memory_format=torch.channels_last) for image in (hazy, clear_target(hazy)))
        )
    return batches


def check_training_throughput(bench: Bench, precision: str) -> dict[str, Any]:
    """Samples/s of the training step of ``hdm_platform.train`` (Adam (0.9, 0.999), lr 2e-4,
    L1 loss, EMA 0.999, optional bfloat16 autocast, model and batches channels_last) on
    batches already on the device: the model's step alone, without a data pipeline."""
    profile, device = bench.profile, bench.device
    model = bench.fresh_model().to(device, memory_format=torch.channels_last).train()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    optimizer = Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999))
    loss_fn = EnhancementLoss(l1_weight=1.0, perceptual_weight=0.0)
    batches = _training_batches(bench, 2)
    steps = itertools.count()
    losses: list[Tensor] = []

    def step() -> None:
        inputs, targets = batches[next(steps) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            terms = loss_fn(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        ema.update_parameters(model)
        losses.append(terms.total.detach())

    with PeakMemory(device) as peak:
        samples = time_calls(step, device, warmup=profile.train_warmup, repeats=profile.train_steps)
    values = torch.stack(losses).float().cpu()
    assert torch.isfinite(values).all(), f"non-finite losses: {values.tolist()}"
    median_ms = statistics.median(samples)
    return {
        "samples_per_s": profile.train_batch / (median_ms / 1000),
        "median_step_ms": median_ms,
        "min_step_ms": min(samples),
        "steps_timed": len(samples),
        "batch": profile.train_batch,
        "crop": profile.train_crop,
        "loss_first": values[0].item(),
        "loss_last": values[-1].item(),
        "peak_memory_mib": peak.mib,
    }


def section_checks(section: str, bench: Bench) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The named checks of ``section``, in order; nothing runs until a check is called."""
    profile = bench.profile
    if section == "model":
        model_checks = {
            "forward_backward": check_forward_backward,
            "matches_cpu": check_matches_cpu,
            "bf16_autocast": check_bf16_autocast,
            "dcp_masks": check_dcp_masks,
            "tiled_equals_untiled": check_tiled_equals_untiled,
            "checkpoint_round_trip": check_checkpoint_round_trip,
        }
        return [(name, functools.partial(check, bench)) for name, check in model_checks.items()]
    if section == "inference":
        checks: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for size in profile.latency_sizes:
            label = size_label(size)
            checks += [
                (f"{label} {variant}", functools.partial(check_latency, bench, size, variant))
                for variant in INFERENCE_VARIANTS
            ]
            checks.append((f"{label} DCP masks", functools.partial(check_mask_latency, bench, size)))
        return checks
    if section == "compile":
        return [
            (f"{size_label(size)} compiled", functools.partial(check_compiled_latency, bench, size))
            for size in profile.compile_sizes
        ]
    if section == "training":
        return [
            (f"train {precision}", functools.partial(check_training_throughput, bench, precision))
            for precision in ("fp32", "bf16")
        ]
    raise ValueError(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")


# --------------------------------------------------------------------------- one section, in its own process


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def _json_value(value: Any) -> Any:
    """Figures as JSON: non-finite floats become null (the check asserts finiteness itself)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format_figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def progress_line(section: str, position: str, entry: Mapping[str, Any]) -> str:
    head = f"[{section} {position}] {entry['name']}: {entry['status']} in {entry['wall_s']:.1f} s"
    if entry["status"] == "failed":
        return f"{head}: {entry['error']}"
    if entry["status"] == "skipped":
        return f"{head}: {entry['reason']}"
    shown = [
        f"{name}={_format_figure(value)}"
        for name, value in entry["figures"].items()
        if value is not None and not name.startswith(("min_", "max_", "repeats", "steps_"))
    ]
    return f"{head}  " + " ".join(shown[:6])


class SectionRecorder:
    """Runs the checks of a section one by one and rewrites its result file after each, so
    that a section killed at its time budget leaves what it finished."""

    def __init__(self, section: str, path: Path, names: list[str], device: torch.device) -> None:
        self.section, self.path, self.device = section, path, device
        self.document = {"section": section, "checks": [{"name": n, "status": "pending"} for n in names]}
        write_json_atomically(path, self.document)

    def run(self, index: int, name: str, check: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        try:
            figures = check()
            # Surface a failed kernel here, not in the next check.
            synchronize(self.device)
        except CheckSkipped as skip:
            entry.update(status="skipped", reason=str(skip))
        except Exception as error:  # noqa: BLE001 - any failure is this check's result
            entry.update(
                status="failed",
                error=f"{type(error).__name__}: {error}".strip(),
                traceback=traceback.format_exc(limit=-6),
            )
        else:
            entry.update(status="passed", figures={k: _json_value(v) for k, v in figures.items()})
        entry["wall_s"] = time.perf_counter() - started
        self.document["checks"][index] = entry
        write_json_atomically(self.path, self.document)
        total = len(self.document["checks"])
        print(progress_line(self.section, f"{index + 1}/{total}", entry), flush=True)


def run_section(section: str, device: torch.device, profile: Profile, result: Path) -> None:
    bench = Bench(device, profile)
    checks = section_checks(section, bench)
    recorder = SectionRecorder(section, result, [name for name, _ in checks], device)
    for index, (name, check) in enumerate(checks):
        recorder.run(index, name, check)


# --------------------------------------------------------------------------- the run: sections, summary


@dataclass(frozen=True)
class RunOptions:
    device: torch.device
    profile: Profile
    sections: tuple[str, ...]
    skip_compile: bool
    budgets_s: Mapping[str, float]
    deadline_s: float
    out: Path


def _section_command(section: str, options: RunOptions, result: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--section", section]
    command += ["--result", str(result), "--device", str(options.device)]
    return command + (["--quick"] if options.profile is QUICK else [])


def _close_section(
    names: list[str], document: Mapping[str, Any] | None, *, status: str | None, reason: str | None
) -> dict[str, Any]:
    """A section's record from what its process wrote: checks it never finished are
    ``not_run``; ``status`` (timed_out, crashed, skipped, not_run) overrides the verdict."""
    checks = [dict(check) for check in document["checks"]] if document else [{"name": n} for n in names]
    for check in checks:
        if check.get("status", "pending") == "pending":
            check.update(status="skipped" if status == "skipped" else "not_run", reason=reason)
    if status is None:
        bad = any(check["status"] in ("failed", "not_run") for check in checks)
        status = "failed" if bad else "passed"
    return {"status": status, "reason": reason, "checks": checks}


def launch_section(section: str, names: list[str], options: RunOptions, budget_s: float) -> dict[str, Any]:
    """Run ``section`` in a process of its own (a new process group, so that a timeout also
    ends its compile workers) and return its record."""
    print(f"== {section}: {len(names)} checks, budget {budget_s:.0f} s", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hdm-gpu-check-") as directory:
        result = Path(directory) / f"{section}.json"
        process = subprocess.Popen(_section_command(section, options, result), start_new_session=True)
        status = reason = None
        try:
            returncode = process.wait(timeout=budget_s)
            if returncode != 0:
                status, reason = "crashed", f"the section's process exited with status {returncode}"
        except subprocess.TimeoutExpired:
            status, reason = "timed_out", f"the section's budget of {budget_s:.0f} s ran out"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        document = json.loads(result.read_text()) if result.is_file() else None
    record = _close_section(names, document, status=status, reason=reason)
    record.update(budget_s=budget_s, wall_s=time.monotonic() - started)
    print(f"== {section}: {record['status']} in {record['wall_s']:.1f} s"
          + (f" ({reason})" if reason else ""), flush=True)  # fmt: skip
    return record


def run_sections(options: RunOptions) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + options.deadline_s
    planner = Bench(options.device, options.profile)
    records: dict[str, dict[str, Any]] = {}
    for section in options.sections:
        names = [name for name, _ in section_checks(section, planner)]
        remaining_s = deadline - time.monotonic()
        if section == "compile" and options.skip_compile:
            records[section] = _close_section(names, None, status="skipped", reason="--skip-compile")
            print(f"== {section}: skipped (--skip-compile)", flush=True)
        elif remaining_s < _MIN_SECTION_S:
            reason = f"the run's deadline of {options.deadline_s:.0f} s was reached"
            records[section] = _close_section(names, None, status="not_run", reason=reason)
            print(f"== {section}: not run ({reason})", flush=True)
        else:
            budget_s = min(options.budgets_s[section], remaining_s)
            records[section] = launch_section(section, names, options, budget_s)
    return records


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def describe_environment(device: torch.device) -> dict[str, Any]:
    """Versions, the machine, and the conv math settings the figures ran under."""
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": {
            name: _distribution_version(name)
            for name in ("torch", "torchvision", "numpy", "pillow", "safetensors", "torchmetrics")
        },
        "git_commit": _git_commit(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        environment.update(
            gpu=properties.name,
            gpu_memory_gib=properties.total_memory / 2**30,
            gpu_multiprocessors=properties.multi_processor_count,
            compute_capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return environment


def device_label(environment: Mapping[str, Any]) -> str:
    return environment.get("gpu") or f"{environment['cpu']} (CPU, {environment['torch_threads']} threads)"


def _passed_figures(section: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    if section is None:
        return {}
    return {check["name"]: check["figures"] for check in section["checks"] if check["status"] == "passed"}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def latency_rows(sections: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per passed latency check, with its speed-up over the plain fp32 forward."""
    figures = {**_passed_figures(sections.get("inference")), **_passed_figures(sections.get("compile"))}
    rows = []
    for name, values in figures.items():
        size, variant = name.split(" ", 1)
        baseline = figures.get(f"{size} fp32", {}).get("median_ms")
        if variant == "compiled":
            variant = f"compiled ({values['precision']})"
        row = {
            "size": size,
            "variant": variant,
            "median_ms": values["median_ms"],
            "speedup_vs_fp32": _ratio(baseline, values["median_ms"]),
            "psnr_db_vs_fp32": values.get("psnr_db_vs_fp32"),
            "max_abs_diff_vs_fp32": values.get("max_abs_diff_vs_fp32"),
            "peak_memory_mib": values["peak_memory_mib"],
            "compile_and_warmup_s": values.get("compile_and_warmup_s"),
        }
        if variant == "DCP masks":
            row["speedup_vs_fp32"] = None
            row["share_of_fp32"] = _ratio(values["median_ms"], baseline)
        rows.append(row)
    return rows


def training_rows(sections: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    figures = _passed_figures(sections.get("training"))
    baseline = figures.get("train fp32", {}).get("samples_per_s")
    return [
        {
            "precision": name.removeprefix("train "),
            "samples_per_s": values["samples_per_s"],
            "median_step_ms": values["median_step_ms"],
            "vs_fp32": _ratio(values["samples_per_s"], baseline),
            "batch": values["batch"],
            "crop": values["crop"],
            "peak_memory_mib": values["peak_memory_mib"],
        }
        for name, values in figures.items()
    ]


def build_summary(
    options: RunOptions, sections: dict[str, dict[str, Any]], environment: dict[str, Any],
    started_at: str, wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    checks = [(section, check) for section, record in sections.items() for check in record["checks"]]
    counts = {status: 0 for status in ("passed", "failed", "skipped", "not_run")}
    for _, check in checks:
        counts[check["status"]] += 1
    failures = [
        {"section": section, "check": check["name"], "error": check.get("error") or check.get("reason")}
        for section, check in checks
        if check["status"] in ("failed", "not_run")
    ]
    model = Bench(torch.device("cpu"), options.profile).fresh_model()
    return {
        "schema_version": SCHEMA_VERSION,
        "passed": not failures and all(r["status"] in ("passed", "skipped") for r in sections.values()),
        "started_at": started_at,
        "wall_s": wall_s,
        "device": str(options.device),
        "device_name": device_label(environment),
        "options": {
            "profile": options.profile.name,
            "sections": list(options.sections),
            "skip_compile": options.skip_compile,
            "budgets_s": dict(options.budgets_s),
            "deadline_s": options.deadline_s,
        },
        "profile": dataclasses.asdict(options.profile),
        "model": {
            "variant": "HDM",
            "overrides": dict(options.profile.model_overrides),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "environment": environment,
        "counts": counts,
        "failures": failures,
        "latency": latency_rows(sections),
        "training": training_rows(sections),
        "sections": sections,
    }


def _cell(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else str(value)


def _psnr_cell(row: Mapping[str, Any]) -> str:
    if row.get("psnr_db_vs_fp32") is None:
        return "identical" if row.get("max_abs_diff_vs_fp32") == 0 else "n/a"
    return f"{row['psnr_db_vs_fp32']:.1f}"


def _markdown_header(summary: Mapping[str, Any]) -> list[str]:
    environment, options = summary["environment"], summary["options"]
    packages = ", ".join(f"{name} {version}" for name, version in environment["packages"].items())
    counts = ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in summary["counts"].items())
    lines = [
        f"# GPU check on {summary['device_name']}: {'passed' if summary['passed'] else 'FAILED'}",
        "",
        f"- run: {summary['started_at']}, {summary['wall_s']:.0f} s, profile `{options['profile']}`, "
        f"sections {', '.join(options['sections'])}"
        + (", compile skipped" if options["skip_compile"] else ""),
        f"- checks: {counts}",
        (
            f"- model: HDM {summary['model']['overrides'] or '(the paper: 64 channels, 3 groups of K=7)'}, "
            f"{summary['model']['parameters']:,} parameters, random init"
        ),
        f"- device `{summary['device']}`; CPU {environment['cpu']}, {environment['cpu_count']} CPUs",
        f"- {packages}",
    ]
    if "gpu" in environment:
        lines.append(
            f"- GPU {environment['gpu']}, {environment['gpu_memory_gib']:.0f} GiB, compute capability "
            f"{environment['compute_capability']}, CUDA {environment['cuda']}, cuDNN {environment['cudnn']}, "
            f"cuDNN TF32 {'on' if environment['cudnn_allow_tf32'] else 'off'} (the `fp32` rows), "
            f"matmul precision {environment['float32_matmul_precision']}"
        )
    if environment.get("git_commit"):
        lines.append(f"- commit {environment['git_commit']}")
    return lines


def _markdown_checks(summary: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Checks",
        "",
        "| section | check | status | s | figures or reason |",
        "|---|---|---|---|---|",
    ]
    for section, record in summary["sections"].items():
        for check in record["checks"]:
            if check["status"] == "passed":
                detail = ", ".join(
                    f"{name} {_format_figure(value)}"
                    for name, value in check["figures"].items()
                    if value is not None and not name.startswith(("min_", "max_", "repeats", "steps_"))
                )
            else:
                detail = (
                    (check.get("error") or check.get("reason") or "").replace("|", "/").replace("\n", " ")
                )
            wall = _cell(check.get("wall_s"), 1)
            lines.append(f"| {section} | {check['name']} | {check['status']} | {wall} | {detail} |")
    return lines


def _markdown_tables(summary: Mapping[str, Any]) -> list[str]:
    repeats = summary["profile"]["repeats"]
    lines = [
        "",
        f"## Inference latency (batch 1, median of {repeats} after warm-up)",
        "",
        "| size | variant | median ms | vs fp32 | PSNR vs true fp32 (dB) | peak GPU MiB | compile + warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["latency"]:
        ratio = (
            f"{100 * row['share_of_fp32']:.1f}% of fp32" if row.get("share_of_fp32")
            else _cell(row["speedup_vs_fp32"], 2, "x")
        )  # fmt: skip
        lines.append(
            f"| {row['size']} | {row['variant']} | {_cell(row['median_ms'], 2)} | {ratio} | "
            f"{_psnr_cell(row) if row['variant'] != 'DCP masks' else ''} | "
            f"{_cell(row['peak_memory_mib'], 0)} | {_cell(row['compile_and_warmup_s'], 1)} |"
        )
    lines += [
        "",
        "## Training step throughput (plain loop: Adam, L1, EMA; batches already on the device)",
        "",
        "| precision | batch x crop | samples/s | median step ms | vs fp32 | peak GPU MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["training"]:
        lines.append(
            f"| {row['precision']} | {row['batch']} x {row['crop']}^2 | {_cell(row['samples_per_s'], 1)} | "
            f"{_cell(row['median_step_ms'], 1)} | {_cell(row['vs_fp32'], 2, 'x')} | "
            f"{_cell(row['peak_memory_mib'], 0)} |"
        )
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    lines = _markdown_header(summary) + _markdown_tables(summary) + _markdown_checks(summary)
    if summary["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- {f['section']} / {f['check']}: {f['error']}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _budget(text: str) -> tuple[str, float]:
    section, _, seconds = text.partition("=")
    if section not in SECTIONS:
        raise argparse.ArgumentTypeError(
            f"unknown section {section!r} in {text!r}; choose from {', '.join(SECTIONS)}"
        )
    try:
        value = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want SECTION=SECONDS, e.g. compile=240") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return section, value


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model at tiny sizes (seconds on a CPU)"
    )
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile section")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")  # fmt: skip
    parser.add_argument("--budget", type=_budget, action="append", default=[], metavar="SECTION=SECONDS",
                        help="override a section's time budget")  # fmt: skip
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"the whole run's time limit (default {DEFAULT_DEADLINE_S:.0f})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="for gpu-check.json and .md (default: $OUT, else .hdm/gpu-check)")  # fmt: skip
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """``name`` as a device with an index on CUDA; ``ValueError`` saying what is missing."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: {error}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: this check runs on cuda or cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "CUDA is not available on this machine (torch "
            f"{torch.__version__}); without a GPU run: bash scripts/gpu-check.sh --device cpu --quick"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(__file__).resolve().parent.parent / ".hdm" / "gpu-check"


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    profile = QUICK if arguments.quick else PAPER
    try:
        device = resolve_device(arguments.device)
    except ValueError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    if arguments.section:
        run_section(arguments.section, device, profile, arguments.result)
        return 0
    options = RunOptions(
        device=device,
        profile=profile,
        sections=tuple(s for s in SECTIONS if s in (arguments.only or SECTIONS)),
        skip_compile=arguments.skip_compile,
        budgets_s={**profile.budgets_s, **dict(arguments.budget)},
        deadline_s=arguments.deadline_s,
        out=arguments.out or _default_out(),
    )
    environment = describe_environment(device)
    print(f"gpu-check on {device_label(environment)} ({device}), profile {profile.name}, "
          f"deadline {options.deadline_s:.0f} s", flush=True)  # fmt: skip
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    started = time.monotonic()
    sections = run_sections(options)
    summary = build_summary(options, sections, environment, started_at, time.monotonic() - started)
    options.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(options.out / RESULT_JSON, summary)
    markdown = options.out / RESULT_MARKDOWN
    temporary = markdown.with_name(f".{markdown.name}.{os.getpid()}.tmp")
    temporary.write_text(render_markdown(summary))
    os.replace(temporary, markdown)
    counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in summary["counts"].items())
    print(f"gpu-check {'passed' if summary['passed'] else 'FAILED'} in {summary['wall_s']:.0f} s "
          f"({counts}); wrote {options.out / RESULT_JSON} and {markdown}", flush=True)  # fmt: skip
    for failure in summary["failures"]:
        print(f"  failed: {failure['section']} / {failure['check']}: {failure['error']}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
