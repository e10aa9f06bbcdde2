"""The driver: checks an experiment, runs it as a Ray ``TorchTrainer``, exports and registers.

``fit(config)`` is what ``hdm train`` calls, on the local Ray or the cluster at
``RAY_ADDRESS``:

1. :func:`preflight` rejects what would fail later (no dataset, a batch that does not split
   over the workers, missing VGG weights) before any Ray resource starts.
2. The MLflow run of this Ray run (same storage path and name) is opened or reopened, and
   the resolved config is logged as params with the git commit and package version.
3. The ``TorchTrainer`` runs :func:`~hdm_platform.train.loop.train_loop_per_worker` on N
   workers with the Ray Data train/val datasets. Ray Train persists checkpoints to
   ``RunConfig(storage_path, name)`` (best K by validation PSNR plus the latest), restarts
   the worker group up to ``run.max_failures`` times, and resumes a re-run of the same name
   from the latest checkpoint.
4. The latest checkpoint's exported model (the EMA weights) goes to MLflow under
   ``model/`` and is registered as a new version of ``hdm-<task>`` with the configured alias.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs
import ray
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.data import DataContext
from ray.data.dataset import MaterializedDataset
from ray.train.torch import TorchTrainer

from hdm_model.losses import VGG_WEIGHTS_HELP
from hdm_platform.config import ConfigError, ExperimentConfig
from hdm_platform.console import is_verbose, ray_init_options, route_ray_data_logs
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.pipeline import build_dataset
from hdm_platform.data.storage import open_filesystem
from hdm_platform.tracking.mlflow_run import TrackedRun, source_tags
from hdm_platform.tracking.registry import register_model
from hdm_platform.train.training_state import exported_model_dir
from hdm_platform.train.loop import FaultInjection, LoopSettings, train_loop_per_worker
from hdm_platform.train.progress import progress_display

__all__ = [
    "CHECKPOINT_SCORE",
    "TrainingOutcome",
    "build_trainer",
    "export_model",
    "fit",
    "preflight",
    "ray_storage",
]

#: The reported metric Ray Train ranks checkpoints by (kept: the best K, plus the latest).
CHECKPOINT_SCORE = "val_psnr"
_REGISTERED_STEP_TAG = "hdm.registered_step"
_REGISTERED_VERSION_TAG = "hdm.registered_version"

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    """Where a finished training run left its results."""

    run_name: str
    storage_path: str
    checkpoint_path: str | None
    mlflow_run_id: str
    model_uri: str | None
    registered_model: str | None
    registered_version: str | None
    metrics: dict[str, Any]


def preflight(config: ExperimentConfig) -> int:
    """Check what can be checked before Ray starts; returns the steps per epoch.

    Raises:
        ConfigError: naming the field (or the dataset) that makes the run impossible.
    """
    train, scaling, data = config.train, config.scaling, config.data
    if train.batch_size % scaling.num_workers:
        raise ConfigError(
            f"train.batch_size ({train.batch_size}) must be a multiple of "
            f"scaling.num_workers ({scaling.num_workers}): it is the global batch"
        )
    if config.model.to_hdm_config().mask_source == "external":
        raise ConfigError(
            "model.mask_source 'external' needs a guide map per image, which datasets do not "
            "carry; train with 'dcp' or 'learned'"
        )
    if config.loss.perceptual_weight > 0:
        weights = config.loss.vgg_weights
        if weights is None or not Path(weights).expanduser().is_file():
            raise ConfigError(
                f"loss.vgg_weights: perceptual_weight is {config.loss.perceptual_weight} but the "
                f"VGG16 weights file {weights!r} does not exist on this machine. {VGG_WEIGHTS_HELP}"
            )
    options = config.storage.storage_options()
    try:
        manifest = Manifest.load(data.uri, storage_options=options)
    except FileNotFoundError as error:
        raise ConfigError(f"data.uri: {error}") from None
    for field, split in (("data.train_split", data.train_split), ("data.val_split", data.val_split)):
        if split not in manifest.splits or manifest.splits[split].rows == 0:
            raise ConfigError(
                f"{field}: dataset {data.uri} has no rows in split {split!r} "
                f"(it has {sorted(manifest.splits)})"
            )
    per_worker_rows = manifest.splits[data.train_split].rows // scaling.num_workers
    steps = per_worker_rows // (train.batch_size // scaling.num_workers)
    if steps == 0:
        raise ConfigError(
            f"train.batch_size: {manifest.splits[data.train_split].rows} training pairs over "
            f"{scaling.num_workers} workers do not fill one batch of {train.batch_size}"
        )
    return steps


def ray_storage(
    storage_path: str, storage_options: dict[str, Any] | None = None
) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``RunConfig(storage_path, storage_filesystem)`` for a local folder or any fsspec URI.

    Object stores go through fsspec (wrapped for pyarrow), so the config's ``storage:``
    endpoint and region apply to checkpoints exactly as they do to datasets.
    """
    protocol, _ = fsspec.core.split_protocol(storage_path)
    if protocol in (None, "file", "local"):
        return str(Path(fsspec.core.strip_protocol(storage_path)).resolve()), None
    filesystem, path = open_filesystem(storage_path, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


def build_trainer(
    config: ExperimentConfig,
    *,
    steps_per_epoch: int,
    mlflow_tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    fault_injection: FaultInjection | None = None,
    callbacks: Sequence[UserCallback] = (),
    progress_channel: str | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of an experiment (datasets, scaling, storage, checkpoint policy).

    ``callbacks`` go to the run's ``RunConfig``: a Tune trial passes ``TuneReportCallback``.
    """
    data, train, scaling = config.data, config.train, config.scaling
    options = config.storage.storage_options()
    datasets = {
        "train": build_dataset(
            data.uri,
            data.train_split,
            crop_size=data.crop_size,
            train=True,
            seed=train.seed,
            storage_options=options,
            augment=data.augment,
            # A small training set is decoded once per run and only cropped each epoch, by
            # the workers, so an epoch starts without a burst of decoding or any Ray task
            # (an ITS-sized one streams).
            keep_decoded=True,
        ),
        "val": build_dataset(
            data.uri,
            data.val_split,
            crop_size=data.val_crop_size,
            train=False,
            storage_options=options,
            # Validated every epoch: a small set is decoded once per run, not per validation.
            keep_decoded=True,
        ),
    }
    # A kept training split goes whole to every worker (each takes its rows of each global
    # batch): a streaming split would run a coordinating actor and an execution per epoch.
    kept_train_split = isinstance(datasets["train"], MaterializedDataset)
    settings = LoopSettings(
        experiment=config.model_dump(mode="json"),
        steps_per_epoch=steps_per_epoch,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_run_id=mlflow_run_id,
        fault_injection=vars(fault_injection) if fault_injection is not None else None,
        progress_channel=progress_channel,
        kept_train_split=kept_train_split,
    )
    storage_path, storage_filesystem = ray_storage(config.run.resolved_storage_path(), options)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run_name(),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        # Ray's split drops rows to give every worker the same count; validation must see
        # every image, so each worker reads the whole val set and measures its share of it.
        dataset_config=DataConfig(datasets_to_split=[] if kept_train_split else ["train"]),
    )


def local_ray_resources(config: ExperimentConfig) -> dict[str, Any]:
    """``ray.init`` arguments: none for a cluster (``RAY_ADDRESS``), CPUs for a local Ray.

    Ray Data's decode tasks need a CPU beside the training workers. A laptop with as many
    cores as workers would otherwise give the workers every CPU and the input pipeline none,
    and training would wait forever for its first batch. Logical CPUs only schedule work;
    each worker's torch threads still follow ``scaling.cpus_per_worker``.
    """
    # Worker output reaches the console through the driver's progress display, and
    # everything with -v.
    workers = math.ceil(config.scaling.num_workers * config.scaling.cpus_per_worker)
    return ray_init_options(local_cpus=max(os.cpu_count() or 1, workers + 1))


def fit(config: ExperimentConfig, *, fault_injection: FaultInjection | None = None) -> TrainingOutcome:
    """Train (or resume) the experiment, then export and register its model."""
    steps_per_epoch = preflight(config)
    if not ray.is_initialized():
        ray.init(**local_ray_resources(config))
    storage_path = config.run.resolved_storage_path()
    tracking_uri = config.mlflow.resolved_tracking_uri()
    tracked = TrackedRun.start_or_resume(
        tracking_uri=tracking_uri,
        experiment=config.mlflow.experiment,
        run_name=config.run_name(),
        storage_path=storage_path,
        tags={**source_tags(), "hdm.task": config.task},
    )
    tracked.log_params(config.flat())
    DataContext.get_current().enable_progress_bars = is_verbose()
    route_ray_data_logs()
    try:
        with progress_display() as channel:
            trainer = build_trainer(
                config,
                steps_per_epoch=steps_per_epoch,
                mlflow_tracking_uri=tracking_uri,
                mlflow_run_id=tracked.run_id,
                fault_injection=fault_injection,
                progress_channel=channel,
            )
            result = trainer.fit()
    except BaseException:
        tracked.finish(failed=True)
        raise
    outcome = export_model(
        config, tracked, result.checkpoint, dict(result.metrics or {}), alias=config.mlflow.alias
    )
    tracked.finish()
    return outcome


def export_model(
    config: ExperimentConfig,
    tracked: TrackedRun,
    checkpoint: Any,
    metrics: dict[str, Any],
    *,
    alias: str | None,
) -> TrainingOutcome:
    """Log a checkpoint's model to ``tracked`` and register it with ``alias`` (once per step).

    ``metrics`` are the ones reported with ``checkpoint``; their ``step`` makes a repeated
    export of the same checkpoint (a resumed run that had already finished) a no-op.
    """
    common = dict(
        run_name=config.run_name(),
        storage_path=config.run.resolved_storage_path(),
        mlflow_run_id=tracked.run_id,
        metrics=metrics,
    )
    if checkpoint is None:
        _logger.warning("run %s reported no checkpoint; nothing to export", config.run_name())
        return TrainingOutcome(
            checkpoint_path=None, model_uri=None, registered_model=None, registered_version=None,
            **common,
        )  # fmt: skip
    tags = tracked.client.get_run(tracked.run_id).data.tags
    step = str(metrics.get("step"))
    model_uri = f"{tracked.artifact_uri()}/model"
    name = config.registered_model_name() if config.mlflow.register_model else None
    version = tags.get(_REGISTERED_VERSION_TAG) if tags.get(_REGISTERED_STEP_TAG) == step else None
    if version is None:
        numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
        with checkpoint.as_directory() as directory:
            model_uri = tracked.log_model_folder(exported_model_dir(directory), metrics=numeric)
        if name is not None:
            registered = register_model(
                tracked.client,
                name=name,
                source=model_uri,
                run_id=tracked.run_id,
                alias=alias,
                tags={"task": config.task},
            )
            version = str(registered.version)
            tracked.set_tags({_REGISTERED_STEP_TAG: step, _REGISTERED_VERSION_TAG: version})
    return TrainingOutcome(
        checkpoint_path=checkpoint.path,
        model_uri=model_uri,
        registered_model=name,
        registered_version=version,
        **common,
    )
