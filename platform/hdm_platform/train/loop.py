"""The per-worker training loop that Ray Train runs on every worker (paper section 4 recipe).

Adam (0.9, 0.999), lr 2e-4 annealed by a cosine over the planned run (``epochs`` x steps
per epoch; ``max_steps`` stops early without changing the schedule, so a run stopped and
resumed follows the same learning-rate curve as one that never stopped), L1 + weighted
VGG perceptual loss, DDP across the workers, optional bfloat16 autocast, gradient clipping
and an exponential moving average of the weights, whose copy is the one validated,
checkpointed for export and registered.

Every validation (each ``val_every_epochs`` epochs or ``val_every_steps`` steps, and at the
end) measures PSNR/SSIM (RGB and Y) of the EMA model on full validation images, sums them
over the workers with ``all_reduce``, and reports a checkpoint to Ray Train, which keeps
the best K by validation PSNR plus the latest. On a restart (a re-run with the same run
name, or a worker-group restart after a failure) the loop resumes from the latest
checkpoint at the same step. Rank 0 logs to the MLflow run the driver opened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Adam
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms.v2.functional import center_crop

from hdm_model import HDM, build_hdm
from hdm_model.losses import EnhancementLoss
from hdm_model.inference import resolve_precision
from hdm_model.metrics import image_metrics
from hdm_platform.config import ExperimentConfig
from hdm_platform.data.pipeline import PairCrop, iter_pairs
from hdm_platform.tracking.mlflow_run import TrackedRun, image_grid
from hdm_platform.train.progress import report_progress
from hdm_platform.train.training_state import (
    TrainingState,
    load_rng_state,
    load_training_state,
    save_rng_state,
    save_training_state,
)

__all__ = [
    "FaultInjection",
    "LoopSettings",
    "PSNR_CAP_DB",
    "ReplayedBatches",
    "VALIDATION_CACHE_MAX_BYTES",
    "Throughput",
    "VAL_METRICS",
    "staged_checkpoint_directory",
    "train_loop_per_worker",
]

#: Validation metrics, in the order they are summed across workers (``l1``: the L1 loss).
VAL_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "l1")
#: An output identical to its target has infinite PSNR; it counts as this in averages.
PSNR_CAP_DB = 100.0
#: A worker keeps its share of the validation batches (float32 tensors on its device) after
#: the first validation when they take at most this much memory.
VALIDATION_CACHE_MAX_BYTES = 256 * 2**20

@dataclass
class Throughput:
    """Global training samples per second over the steps timed since this worker started."""

    samples: int = 0
    seconds: float = 0.0

    def add(self, *, samples: int, seconds: float) -> None:
        self.samples += samples
        self.seconds += seconds

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def staged_checkpoint_directory() -> Iterator[str]:
    """A fresh local folder for one checkpoint. Once reported, it belongs to Ray Train (which
    deletes it after the upload); if saving or reporting fails, it is deleted here, so a
    failed report leaves no copy of the model in the temporary folder."""
    directory = tempfile.mkdtemp(prefix="hdm-checkpoint-")
    try:
        yield directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


class ReplayedBatches:
    """Tensor batches from ``read()``, kept after the first full pass and replayed by the
    later ones when they take at most ``max_bytes``; read anew on every pass otherwise."""

    def __init__(self, read: Callable[[], Iterable[tuple[Tensor, Tensor]]], *, max_bytes: int) -> None:
        self.read = read
        self.max_bytes = max_bytes
        self.kept: list[tuple[Tensor, Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[tuple[Tensor, Tensor]] | None = []
        kept_bytes = 0
        for inputs, targets in self.read():
            if kept is not None:
                kept_bytes += inputs.nbytes + targets.nbytes
                if kept_bytes <= self.max_bytes:
                    kept.append((inputs, targets))
                else:
                    kept = None
            yield inputs, targets
        self.kept = kept


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: worker ``rank`` exits abruptly after ``step``, once (``marker`` records it).

    Before dying it waits until Ray Train has registered every checkpoint reported so far
    (the controller collects reports on its health-check poll), so the restart point is
    the latest checkpoint, deterministically.
    """

    rank: int
    step: int
    marker: str

    def maybe_crash(self, *, rank: int, step: int, tracker: TrackedRun | None = None) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        ray.train.get_all_reported_checkpoints(timeout_s=120)
        # What was logged before the crash is in MLflow, as a synchronous log would have it.
        if tracker is not None:
            tracker.flush()
        Path(self.marker).write_text(f"worker {rank} crashed after step {step}\n")
        os._exit(1)


@dataclass(frozen=True)
class LoopSettings:
    """What the driver passes to every worker, as plain values (``to_dict`` / ``from_dict``)."""

    experiment: dict[str, Any]
    steps_per_epoch: int
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    fault_injection: dict[str, Any] | None = None
    progress_channel: str | None = None
    #: The train dataset is a split kept decoded (full-size pairs), given whole to every
    #: worker: each takes its rows of every global batch and crops them.
    kept_train_split: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopSettings:
        return cls(**values)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``config`` is :meth:`LoopSettings.to_dict`."""
    settings = LoopSettings.from_dict(config)
    _Trainer(settings).run()


class _Trainer:
    """One worker's training state; the methods are the steps of the loop."""

    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        self.experiment = ExperimentConfig.model_validate(settings.experiment)
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        train = self.experiment.train
        self.per_worker_batch = train.batch_size // self.world_size
        self.steps_per_epoch = settings.steps_per_epoch
        self.total_steps = train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, train.max_steps or self.total_steps)
        self.fault = FaultInjection(**settings.fault_injection) if settings.fault_injection else None

        torch.set_num_threads(max(1, int(self.experiment.scaling.cpus_per_worker)))
        torch.manual_seed(train.seed + self.rank)
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(train.precision, self.device)
        # channels_last, as inference runs it: the deformable conv gathers rows of channels_last
        # maps, and oneDNN's convs prefer them; CPU steps 1.2-1.3x faster (bench/RESULTS.md).
        self.model: HDM = build_hdm(self.experiment.model.to_hdm_config()).to(
            self.device, memory_format=torch.channels_last
        )
        self.ema = (
            AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay), use_buffers=True
            )
            if train.ema_decay is not None
            else None
        )
        self.optimizer = Adam(
            self.model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
        )
        self.scheduler = CosineAnnealingLR(self.optimizer, T_max=self.total_steps, eta_min=train.min_lr)
        loss = self.experiment.loss
        self.loss = EnhancementLoss(
            l1_weight=loss.l1_weight,
            perceptual_weight=loss.perceptual_weight,
            vgg_weights=loss.vgg_weights,
        ).to(self.device)
        self.state = TrainingState(mlflow_run_id=settings.mlflow_run_id)
        self.throughput = Throughput()
        self.resumed_from: int | None = None
        self.validated_step = -1
        data = self.experiment.data
        self.train_crop = (
            PairCrop(crop_size=data.crop_size, random_crop=True, augment=data.augment, seed=train.seed)
            if settings.kept_train_split
            else None
        )
        # This rank's share of the validation set, read once when it fits on the device: a
        # validation every epoch then runs no Ray Data execution.
        self.validation_batches = ReplayedBatches(self._read_validation_batches, max_bytes=VALIDATION_CACHE_MAX_BYTES)
        # Seconds outside the steps, logged with the next validation: where an epoch's wall
        # time goes besides training (the first batch of an epoch waits for the dataset's
        # new execution).
        self.overhead_seconds: dict[str, float] = {}
        self._restore()
        # DDP after restoring: its construction broadcasts rank 0's (restored) weights.
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        self.tracker = (
            TrackedRun.for_run(settings.mlflow_tracking_uri, settings.mlflow_run_id, background=True)
            if self.rank == 0 and settings.mlflow_run_id
            else None
        )

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights that are validated and exported: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        # A private copy per worker: Checkpoint.as_directory shares one download folder
        # between the workers of a node, and its locking races when they resume together.
        with tempfile.TemporaryDirectory(prefix=f"hdm-resume-rank{self.rank}-") as directory:
            checkpoint.to_directory(directory)
            restored = load_training_state(
                directory,
                model=self.model,
                ema=self.ema,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
            )
            load_rng_state(directory, rank=self.rank)
        restored.mlflow_run_id = self.settings.mlflow_run_id or restored.mlflow_run_id
        self.state = restored
        # Every checkpoint is written right after a validation of its step.
        self.resumed_from = self.validated_step = restored.step

    def run(self) -> None:
        try:
            self._run()
        finally:
            # Rank 0 logs in the background: all of it is in MLflow when the worker ends.
            if self.tracker is not None:
                self.tracker.flush()

    def _run(self) -> None:
        if self.tracker is not None and self.resumed_from is not None:
            self.tracker.log_metrics({"resumed_from_step": self.resumed_from}, step=self.resumed_from)
        train_shard = ray.train.get_dataset_shard("train")
        while self.state.step < self.stop_step:
            self.state.epoch = self.state.step // self.steps_per_epoch
            self._train_epoch(train_shard, self.state.epoch)
            epoch_end = self.state.step % self.steps_per_epoch == 0
            if epoch_end and self._validation_due(epoch_end=True):
                self._validate_and_checkpoint()
        if self.validated_step != self.state.step:
            self._validate_and_checkpoint()

    def _validation_due(self, *, epoch_end: bool) -> bool:
        train, step = self.experiment.train, self.state.step
        by_steps = train.val_every_steps is not None and step % train.val_every_steps == 0
        by_epochs = epoch_end and (step // self.steps_per_epoch) % train.val_every_epochs == 0
        return by_steps or by_epochs

    def _train_epoch(self, shard: Any, epoch: int) -> None:
        train = self.experiment.train
        steps_left_in_epoch = self.steps_per_epoch - self.state.step % self.steps_per_epoch
        window: list[dict[str, float]] = []
        window_started = last_step_end = time.perf_counter()
        for batch_index, (inputs, targets) in enumerate(self._batches(shard, epoch)):
            if batch_index == steps_left_in_epoch or self.state.step >= self.stop_step:
                break
            if batch_index == 0:
                self.overhead_seconds["first_batch_seconds"] = time.perf_counter() - window_started
            terms = self._step(inputs, targets)
            self.state.step += 1
            if self.fault is not None:
                self.fault.maybe_crash(rank=self.rank, step=self.state.step, tracker=self.tracker)
            now = time.perf_counter()
            if batch_index > 0:  # the first step of an epoch also waits for the pipeline to start
                self.throughput.add(samples=train.batch_size, seconds=now - last_step_end)
            window.append(terms)
            # MLflow logging counts towards the next step's time: it is platform overhead.
            last_step_end = now
            if self.state.step % train.log_every_steps == 0:
                self._log_training(window, now - window_started)
                window, window_started = [], now
            epoch_end = self.state.step % self.steps_per_epoch == 0  # run() validates those
            if not epoch_end and self._validation_due(epoch_end=False):
                self._validate_and_checkpoint()
                window_started = last_step_end = time.perf_counter()

    def _batches(self, shard: Any, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        data = self.experiment.data
        # A kept split comes whole to every worker, in one order: each takes its rows of
        # the global batches. A streamed one is split between them and shuffled per worker.
        share = (self.rank, self.world_size) if self.settings.kept_train_split else (0, 1)
        rows_per_batch = self.per_worker_batch * share[1]
        buffer = data.shuffle_buffer_size if data.shuffle_buffer_size >= rows_per_batch else None
        return iter_pairs(
            shard,
            batch_size=self.per_worker_batch,
            device=self.device,
            local_shuffle_buffer_size=buffer,
            seed=self._shuffle_seed(epoch, per_rank=share[1] == 1),
            drop_last=True,
            crop=self.train_crop,
            epoch=epoch,
            share=share,
        )

    def _shuffle_seed(self, epoch: int, *, per_rank: bool) -> int:
        """A different local shuffle per (seed, epoch) and, unless the workers share one
        order, rank; the same on every rerun."""
        seed = self.experiment.train.seed
        sequence = np.random.SeedSequence([seed, epoch, self.rank] if per_rank else [seed, epoch])
        return int(sequence.generate_state(1)[0])

    def _step(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        self.ddp_model.train()
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = targets.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            terms = self.loss(self.ddp_model(inputs).float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        clip = self.experiment.train.grad_clip_norm
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip) if clip is not None else None
        )
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        values = {
            "train_loss": terms.total.item(),
            "train_l1": terms.l1.item(),
            "train_perceptual": terms.perceptual.item(),
        }
        if grad_norm is not None:
            values["grad_norm"] = grad_norm.item()
        return values

    def _log_training(self, window: list[dict[str, float]], seconds: float) -> None:
        if self.tracker is None or not window:
            return
        metrics = {key: sum(item[key] for item in window) / len(window) for key in window[0]}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["epoch"] = self.state.step / self.steps_per_epoch
        metrics["samples_per_second"] = len(window) * self.experiment.train.batch_size / seconds
        self.tracker.log_metrics(metrics, step=self.state.step)

    def _validate_and_checkpoint(self) -> None:
        started = time.perf_counter()
        metrics = self._validate()
        validated = time.perf_counter()
        self.overhead_seconds["validation_seconds"] = validated - started
        metrics.update(
            step=self.state.step,
            epoch=self.state.epoch,
            lr=self.scheduler.get_last_lr()[0],
            train_samples_per_second=self.throughput.per_second,
        )
        self.state.metrics = {key: float(value) for key, value in metrics.items()}
        self.validated_step = self.state.step
        if self.rank == 0:
            report_progress(
                self.settings.progress_channel,
                f"epoch {self.state.step / self.steps_per_epoch:.1f}/{self.experiment.train.epochs} "
                f"step {self.state.step}/{self.stop_step}: val PSNR {metrics['val_psnr']:.2f} dB, "
                f"SSIM {metrics['val_ssim']:.4f}, {self.throughput.per_second:.1f} samples/s",
            )
        # Ray Train copies the directory to run.storage_path (and then deletes it) in a
        # background thread: the next steps do not wait for the upload.
        with staged_checkpoint_directory() as directory:
            if self.rank == 0:
                save_training_state(
                    directory,
                    model=self.model,
                    ema=self.ema,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    state=self.state,
                    metadata={"task": self.experiment.task, "experiment": self.experiment.name},
                )
            save_rng_state(directory, rank=self.rank)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint-step-{self.state.step:08d}",
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            )
        self.overhead_seconds["checkpoint_seconds"] = time.perf_counter() - validated
        if self.tracker is not None:
            self.tracker.log_metrics(self.overhead_seconds, step=self.state.step)
        self.overhead_seconds = {}

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        model = self.evaluated_model.eval()
        data = self.experiment.data
        sums = torch.zeros(len(VAL_METRICS) + 1, dtype=torch.float64, device=self.device)
        shown: list[tuple[Tensor, Tensor, Tensor]] = []
        wanted = self.experiment.train.logged_val_images if self.tracker is not None else 0
        for inputs, targets in self.validation_batches:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                outputs = model(inputs).float()
            values = image_metrics(outputs, targets)
            values["l1"] = (outputs - targets).abs().flatten(1).mean(dim=1)
            values["psnr"] = values["psnr"].clamp(max=PSNR_CAP_DB)
            values["psnr_y"] = values["psnr_y"].clamp(max=PSNR_CAP_DB)
            for position, name in enumerate(VAL_METRICS):
                sums[position] += values[name].sum().to(sums)
            sums[-1] += len(inputs)
            for triple in zip(inputs, outputs, targets, strict=True):
                if len(shown) < wanted:
                    shown.append(tuple(image.cpu() for image in triple))  # type: ignore[arg-type]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        count = sums[-1].item()
        if count == 0:
            raise RuntimeError(
                f"validation split {data.val_split!r} of {data.uri} gave no images to the workers"
            )
        metrics = {f"val_{name}": sums[index].item() / count for index, name in enumerate(VAL_METRICS)}
        metrics["val_images"] = count
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.state.step)
            if shown:
                self.tracker.log_image_grid(_grid(shown), name=f"val-step-{self.state.step:08d}")
        return metrics

    def _read_validation_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the validation set from its Ray dataset, in batches of at most
        a training batch's pixels.

        The whole val set comes to every worker (not split); pair i belongs to rank
        i mod world_size, so every image is measured exactly once. Full images (no
        ``val_crop_size``) may differ in size, so they come one at a time and consecutive
        ones of one size are stacked: one forward pass for several small images is much
        cheaper than one each.
        """
        data = self.experiment.data
        shard = ray.train.get_dataset_shard("val")
        if data.val_crop_size is not None:
            batches = iter_pairs(shard, batch_size=self.per_worker_batch, device=self.device)
            yield from (batch for index, batch in enumerate(batches) if index % self.world_size == self.rank)
            return
        pixel_budget = self.per_worker_batch * data.crop_size**2
        pending: list[tuple[Tensor, Tensor]] = []
        for index, (inputs, targets) in enumerate(iter_pairs(shard, batch_size=1, device=self.device)):
            if index % self.world_size != self.rank:
                continue
            if pending and (
                inputs.shape != pending[0][0].shape or (len(pending) + 1) * inputs[0, 0].numel() > pixel_budget
            ):
                yield _stacked(pending)
                pending = []
            pending.append((inputs, targets))
        if pending:
            yield _stacked(pending)


def _stacked(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([inputs for inputs, _ in pairs]), torch.cat([targets for _, targets in pairs])


def _grid(triples: list[tuple[Tensor, Tensor, Tensor]]) -> Any:
    """Before/after grid of validation images, centre-cropped to their common size."""
    height = min(image.shape[-2] for image, _, _ in triples)
    width = min(image.shape[-1] for image, _, _ in triples)
    columns = [
        torch.stack([center_crop(triple[column], [height, width]) for triple in triples])
        for column in range(3)
    ]
    return image_grid(*columns)
