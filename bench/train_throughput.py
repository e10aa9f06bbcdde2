"""Training throughput of the Ray Train loop against a plain PyTorch loop, one run each.

* platform: ``hdm_platform.train.fit`` — 2 DDP workers x 1 thread, pairs streamed from
  Parquet shards through Ray Data (decode + random crop), EMA, MLflow logging on rank 0.
* baseline: one process x 2 threads, the same model, global batch, crop, optimizer, loss
  and EMA, on images decoded once into memory (no data pipeline at all).

Both leave out the first step (start-up). The platform figure is the loop's own mean over
the timed steps (``train_samples_per_second``, data waits and MLflow logging included);
the baseline takes its median step, which is robust to the load bursts of a shared
machine and therefore, if anything, flatters the baseline; for the long-run ratio it is timed
right before and right after the platform's run and takes the median step of both. The goal is a ratio platform / baseline of at least 0.9. The same run also
times the baseline loop under bfloat16 autocast (on CPUs with bfloat16 instructions; elsewhere
it is emulated), to decide whether ``train.precision=auto`` should pick bf16 on CPU, and the
baseline loop with torchvision's deformable conv in place of the device's measured choice
(``hdm_model.deform``), which is what that op gains training.

Short epochs (issue 14): the quickstart's experiment (``jobs/configs/quickstart-cpu.yaml``:
its model, batch, crop, 2 workers x 1 CPU, validation on the full images, a checkpoint per
epoch) on 480 synthetic 96x96 pairs (5% validation: the quickstart's short epochs until
session 13), ``--epochs`` epochs through ``fit``. An epoch's wall time is the time between two consecutive epochs'
validation metrics in MLflow (their timestamps): its steps, its validation, its checkpoint
and its logging. The baseline is the same number of steps of the same model, batch and crop
in the plain loop (one process x 2 threads, at the precision the run resolved ``auto`` to:
bf16 where ``cpu_has_fast_bf16``), two epochs' worth timed before Ray starts and two after it
stops, and the ratio takes the median of those four epochs against the median of the
platform's (a shared machine's speed drifts by 10-20% over the minutes in between, and a
single plain epoch swung by 25% between runs: RESULTS.md, session 19). Goal: plain /
platform >= 0.9.
``--no-platform`` times only the plain loops.

    .venv/bin/python bench/train_throughput.py [--steps 24] [--batch 8] [--crop 64] [--epochs 5] [--no-platform]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import ray
import torch
from torch.optim import Adam
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hdm_model import HDMConfig, build_hdm
from hdm_model.deform import Implementation, implementation_for
from hdm_model.inference import resolve_precision
from hdm_model.losses import EnhancementLoss
from hdm_platform.config import load_config, validate_config
from hdm_platform.data.synth import synthesize
from hdm_platform.evaluate import iter_split_pairs
from hdm_platform.train.driver import fit, preflight

QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "quickstart-cpu.yaml"
#: scripts/quickstart.sh's dataset size until session 13. Its 2000 pairs now give epochs four
#: times as long, with the same fixed cost per epoch: 480 keeps the stricter case.
SHORT_EPOCH_PAIRS = 480
GOAL_RATIO = 0.9


def plain_loop_step_seconds(
    images: list[tuple[np.ndarray, np.ndarray]], *, model_config: HDMConfig, steps: int, batch: int,
    crop: int, threads: int, bf16: bool, deform: Implementation | None = None, ema_decay: float | None = 0.999,
    grad_clip_norm: float | None = None, seed: int = 0,
) -> list[float]:  # fmt: skip
    """The baseline: a single-process training loop over in-memory random crops, the seconds
    of each step (sampling included); ``deform`` names the deformable conv (default: the
    device's measured choice)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_hdm(model_config).to(memory_format=torch.channels_last).train()
    for block in model.structure or ():
        block.implementation = deform
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        if ema_decay is not None
        else None
    )
    optimizer = Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999))
    loss_fn = EnhancementLoss(l1_weight=1.0, perceptual_weight=0.0)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = [], []
        for index in rng.integers(len(images), size=batch):
            source, target = images[index]
            top = rng.integers(source.shape[0] - crop + 1)
            left = rng.integers(source.shape[1] - crop + 1)
            window = (slice(top, top + crop), slice(left, left + crop))
            inputs.append(torch.from_numpy(source[window].transpose(2, 0, 1).copy()))
            targets.append(torch.from_numpy(target[window].transpose(2, 0, 1).copy()))
        return tuple(
            (torch.stack(images).float() / 255).contiguous(memory_format=torch.channels_last)
            for images in (inputs, targets)
        )

    step_seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        inputs, targets = sample()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = loss_fn(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        step_seconds.append(time.perf_counter() - started)
    return step_seconds


def median_samples_per_second(step_seconds: list[float], batch: int) -> float:
    """Samples/s of the median step after the first: other jobs on a shared 2-core machine
    stall a 2-thread process in bursts (OpenMP barriers), which a mean would charge to the
    baseline."""
    return batch / float(np.median(step_seconds[1:]))


#: What the training loop logs to MLflow with each validation: an epoch's time outside its steps.
OVERHEAD_METRICS = ("first_batch_seconds", "validation_seconds", "checkpoint_seconds")
#: Plain-loop epochs timed before the platform's run, and again after it.
PLAIN_EPOCHS = 2


class ShortEpochs(NamedTuple):
    #: The plain loop's epochs before Ray starts and after it stops: a shared machine's speed
    #: drifts over minutes, and the platform's epochs run in between.
    plain_epoch_seconds: tuple[list[float], list[float]]
    #: The platform's epochs after the first.
    epoch_walls: list[float]
    steps_per_epoch: int
    val_psnr: float
    #: The mean of each of :data:`OVERHEAD_METRICS` over the epochs after the first.
    overheads: dict[str, float]
    #: What the run's precision resolved to, and the plain loop ran at.
    precision: str


def short_epochs(root: Path, epochs: int) -> ShortEpochs:
    """The quickstart's experiment for ``epochs`` (at least 2) epochs, and the plain loop
    over one epoch's steps before and after it."""
    dataset = str(root / "quickstart-ds")
    synthesize("builtin", dataset, task="dehaze", count=SHORT_EPOCH_PAIRS, size=(96, 96),
               val_fraction=0.05, test_fraction=0.05, seed=0, workers=2, progress=False)  # fmt: skip
    tracking_uri = f"sqlite:///{root / 'mlflow-quickstart.db'}"
    config = load_config(QUICKSTART_CONFIG, [
        f"data.uri={dataset}", f"train.epochs={epochs}", f"run.storage_path={root / 'runs-quickstart'}",
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.register_model=false",
    ])  # fmt: skip
    steps_per_epoch = preflight(config)
    images = [(source, target) for _, source, target in iter_split_pairs(dataset, "train")]
    # The precision the platform's run resolves "auto" to (bf16 where cpu_has_fast_bf16).
    precision = resolve_precision(config.train.precision, "cpu")

    def plain_epochs() -> list[float]:
        seconds = plain_loop_step_seconds(
            images, model_config=config.model.to_hdm_config(), steps=PLAIN_EPOCHS * steps_per_epoch + 1,
            batch=config.train.batch_size, crop=config.data.crop_size, threads=2, bf16=precision == "bf16",
            ema_decay=config.train.ema_decay, grad_clip_norm=config.train.grad_clip_norm,
        )[1:]  # fmt: skip
        return [float(np.sum(seconds[start : start + steps_per_epoch]))
                for start in range(0, len(seconds), steps_per_epoch)]  # fmt: skip

    plain_before = plain_epochs()
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        outcome = fit(config)
    finally:
        ray.shutdown()
    plain_after = plain_epochs()
    client = mlflow.MlflowClient(tracking_uri)

    def history(key: str) -> list[Any]:
        return sorted(client.get_metric_history(outcome.mlflow_run_id, key), key=lambda metric: metric.step)

    validations = history("val_psnr")
    overheads = {
        key: float(np.mean([metric.value for metric in history(key) if metric.step > validations[0].step]))
        for key in OVERHEAD_METRICS
    }
    epoch_walls = [
        (later.timestamp - earlier.timestamp) / 1000 for earlier, later in zip(validations, validations[1:])
    ]
    val_psnr = float(outcome.metrics["val_psnr"])
    return ShortEpochs(
        (plain_before, plain_after), epoch_walls, steps_per_epoch, val_psnr, overheads, precision
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--blocks-per-group", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the quickstart's experiment")
    parser.add_argument("--no-platform", action="store_true", help="only the plain loops, no Ray")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (an epoch's wall time is between two validations)")
    capabilities = torch.cpu.get_capabilities()
    time_bf16 = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))

    with tempfile.TemporaryDirectory(prefix="hdm-bench-train-") as workdir:
        root = Path(workdir)
        dataset = str(root / "ds")
        synthesize("builtin", dataset, task="dehaze", count=args.steps * args.batch + 24,
                   size=(96, 96), val_fraction=0.1, workers=2, progress=False)  # fmt: skip
        images = [(source, target) for _, source, target in iter_split_pairs(dataset, "train")]

        config = validate_config({
            "name": "bench", "task": "dehaze",
            "model": {"variant": "HDM", "channels": args.channels, "blocks_per_group": args.blocks_per_group},
            "data": {"uri": dataset, "crop_size": args.crop, "val_crop_size": args.crop},
            "loss": {"perceptual_weight": 0},
            "train": {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch,
                      "precision": "fp32", "logged_val_images": 0},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "run": {"storage_path": str(root / "runs")},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "register_model": False},
        })  # fmt: skip
        common = dict(
            model_config=config.model.to_hdm_config(), steps=args.steps, batch=args.batch,
            crop=args.crop, threads=2,
        )  # fmt: skip
        batch = args.batch
        baseline = median_samples_per_second(plain_loop_step_seconds(images, bf16=False, **common), batch)
        with_torchvision = median_samples_per_second(
            plain_loop_step_seconds(images, bf16=False, deform="torchvision", **common), batch
        )
        baseline_bf16 = (
            median_samples_per_second(plain_loop_step_seconds(images, bf16=True, **common), batch)
            if time_bf16
            else None
        )
        platform = epochs = None
        if not args.no_platform:
            # First, as in the quickstart: the epochs right after another Ray session's
            # training run were up to 20% slower for ~15 s (RESULTS.md, session 16).
            epochs = short_epochs(root, args.epochs)
            # 2 logical CPUs for the workers plus 1 for Ray Data's decode tasks, on 2 cores.
            long_run_before = plain_loop_step_seconds(images, bf16=False, **common)
            ray.init(num_cpus=3, include_dashboard=False)
            try:
                outcome = fit(config)
            finally:
                ray.shutdown()
            platform = outcome.metrics["train_samples_per_second"]
            # The plain loop right before and right after the platform's run, as for the
            # short epochs: the machine's speed drifts by 10-20% over minutes.
            long_run_after = plain_loop_step_seconds(images, bf16=False, **common)
            long_run_baseline = batch / float(np.median(long_run_before[1:] + long_run_after[1:]))

    print(f"model HDM channels={args.channels} K={args.blocks_per_group}, global batch {args.batch}, "
          f"crop {args.crop}, {args.steps} steps (first not timed)")  # fmt: skip
    print(f"baseline  1 process x 2 threads, fp32, in-memory crops: {baseline:8.2f} samples/s"
          f"  (deformable conv {implementation_for('cpu')!r})")  # fmt: skip
    print(f"same, torchvision's deform_conv2d:                     {with_torchvision:8.2f} samples/s"
          f"  (baseline / this = {baseline / with_torchvision:.2f})")  # fmt: skip
    if baseline_bf16 is None:
        print("bf16 autocast: not timed, this CPU has no bfloat16 instructions")
    else:
        print(f"baseline  1 process x 2 threads, bf16 autocast:         {baseline_bf16:8.2f} samples/s"
              f"  (bf16/fp32 = {baseline_bf16 / baseline:.2f})")  # fmt: skip
    if platform is not None:
        print(f"platform  Ray Train 2 workers x 1 thread, Ray Data shards: {platform:8.2f} samples/s"
              f"  (the loop's mean; the plain fp32 loop right before / after it: "
              f"{median_samples_per_second(long_run_before, batch):.2f} / "
              f"{median_samples_per_second(long_run_after, batch):.2f} samples/s)")  # fmt: skip
    if epochs is not None:
        (plain_before, plain_after), epoch_walls, steps_per_epoch, val_psnr, overheads, precision = epochs
        plain_epoch = float(np.median(plain_before + plain_after))
        platform_epoch = float(np.median(epoch_walls))
        print(f"short epochs, the quickstart's experiment ({steps_per_epoch} steps, validation, checkpoint):")
        print(f"  plain loop, the same {steps_per_epoch} steps ({precision}, as the platform's), before the "
              f"platform's run: {' '.join(f'{wall:.2f}' for wall in plain_before)} s, after it: "
              f"{' '.join(f'{wall:.2f}' for wall in plain_after)} s; median {plain_epoch:.2f} s")  # fmt: skip
        print(f"  platform epochs after the first (MLflow timestamps): "
              f"{' '.join(f'{wall:.2f}' for wall in epoch_walls)} s; median {platform_epoch:.2f} s; "
              f"val PSNR {val_psnr:.2f} dB")  # fmt: skip
        print("  of which outside the steps, per epoch (means, as the loop logs them to MLflow): "
              + ", ".join(f"{key.removesuffix('_seconds').replace('_', ' ')} {overheads[key]:.2f} s"
                          for key in OVERHEAD_METRICS))  # fmt: skip
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    if platform is not None:
        print(f"long-run ratio platform/baseline = {platform / long_run_baseline:.2f} (goal >= {GOAL_RATIO}; "
              f"the plain loop's median step over its runs right before and after the platform's)")  # fmt: skip
    if epochs is not None:
        print(f"short-epoch ratio plain/platform = {plain_epoch / platform_epoch:.2f} (goal >= {GOAL_RATIO})")


if __name__ == "__main__":
    main()
