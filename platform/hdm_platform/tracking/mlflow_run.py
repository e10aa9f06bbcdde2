"""One MLflow run per training run, found again by the Ray run's name when training resumes.

Only rank 0 of a training run talks to MLflow. A Ray run is identified by its storage path
and name; the MLflow run carries both as tags, so re-running (or a worker-group restart
after a failure) logs into the same MLflow run instead of opening a new one. The run id is
also stored in every training checkpoint's JSON, which is the first place resume looks.

Nothing here pickles: the model goes to MLflow as ``model.safetensors`` + ``config.json``
written by :func:`hdm_model.save_checkpoint`, never through ``mlflow.pytorch``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from hdm_platform import __version__

__all__ = [
    "MODEL_ARTIFACT_PATH",
    "RAY_RUN_NAME_TAG",
    "RAY_STORAGE_PATH_TAG",
    "find_latest_run",
    "TrackedRun",
    "git_commit",
    "image_grid",
    "local_artifact_location",
    "source_tags",
]

#: Artifact folder of a run that holds the exported model (weights + config + metrics).
MODEL_ARTIFACT_PATH = "model"
RAY_RUN_NAME_TAG = "hdm.ray_run_name"
RAY_STORAGE_PATH_TAG = "hdm.ray_storage_path"

_logger = logging.getLogger(__name__)


def git_commit(directory: str | Path | None = None) -> str | None:
    """The commit checked out where this package's source lives, or None outside git."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Provenance tags: MLflow's standard git-commit tag and the package version."""
    tags = {"hdm.package_version": __version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def image_grid(inputs: Tensor, outputs: Tensor, targets: Tensor | None = None) -> Image.Image:
    """A before/after grid: one row per image, columns input | output | target, 8-bit RGB.

    Images of different sizes are not supported here: the caller crops or resizes to a
    common size first (validation logs the first few images of one size).
    """
    columns = [inputs, outputs] if targets is None else [inputs, outputs, targets]
    rows = torch.stack([column.detach().float().cpu().clamp(0, 1) for column in columns], dim=1)
    grid = make_grid(rows.flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)
    array = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def find_latest_run(client: MlflowClient, experiment: str, tags: Mapping[str, str]) -> Run | None:
    """The newest run of ``experiment`` carrying every one of ``tags``, or ``None``.

    How a restarted training run or sweep finds the MLflow run it started, by the tags
    naming its Ray run (name and storage path) or its sweep.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=" AND ".join(f"tags.`{key}` = {json.dumps(value)}" for key, value in tags.items()),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


class TrackedRun:
    """Rank 0's handle on the MLflow run of one training run.

    Use :meth:`start_or_resume`; the constructor only wraps an existing run id. A handle
    made with ``background=True`` (the training loop's) logs metrics through MLflow's
    asynchronous logging and uploads image grids from a thread of its own, each with one
    call in flight, so that training steps do not wait for the tracking store (a database
    write or an HTTP round trip per call); :meth:`flush` waits for both.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, background: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.background = background
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdm-mlflow") if background else None
        self._metrics_in_flight: RunOperations | None = None
        self._image_in_flight: Future[None] | None = None

    @classmethod
    def for_run(cls, tracking_uri: str | None, run_id: str, *, background: bool = False) -> TrackedRun:
        """A handle on an existing run (what rank 0 gets from the driver)."""
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return cls(client, run_id, background=background)

    @classmethod
    def start_or_resume(
        cls,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        storage_path: str,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> TrackedRun:
        """Reopen ``run_id`` or the run tagged with this Ray run, else create one.

        A resumed run is set back to RUNNING; its earlier metrics stay and new steps are
        appended, so the curves of a restarted run are continuous.
        """
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if run_id is None:
            found = find_latest_run(
                client, experiment, {RAY_RUN_NAME_TAG: run_name, RAY_STORAGE_PATH_TAG: storage_path}
            )
            run_id = found.info.run_id if found is not None else None
        existing = run_id
        if existing is not None:
            client.update_run(existing, status=RunStatus.to_string(RunStatus.RUNNING))
            if tags:
                client.log_batch(existing, tags=_tag_list(tags))
            _logger.info("resuming MLflow run %s for Ray run %s", existing, run_name)
            return cls(client, existing)
        all_tags = {RAY_RUN_NAME_TAG: run_name, RAY_STORAGE_PATH_TAG: storage_path}
        all_tags.update(tags or {})
        return cls.create(
            tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, tags=all_tags
        )

    @classmethod
    def create(
        cls,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> TrackedRun:
        """A new run in ``experiment`` (created on first use)."""
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment, local_artifact_location(tracking_uri))
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the resolved config; on resume, keep the first values and tag any change.

        MLflow params are immutable, so a resumed run with, say, more epochs records the
        new value as a ``param_change.<key>`` tag instead of failing.
        """
        logged = self.client.get_run(self.run_id).data.params
        new: list[Param] = []
        changed: dict[str, str] = {}
        for key, value in params.items():
            text = _param_text(value)
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:
                changed[f"param_change.{key}"] = text
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            self.client.log_batch(self.run_id, tags=_tag_list(changed))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        timestamp = _now_ms()
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        if not self.background:
            self.client.log_batch(self.run_id, metrics=batch)
            return
        self._wait_for_metrics()
        self._metrics_in_flight = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=_tag_list(tags))

    def log_image_grid(self, grid: Image.Image, *, name: str) -> None:
        """Store ``grid`` as ``images/<name>.png`` in the run's artifacts."""
        artifact_file = f"images/{name}.png"
        if self._uploads is None:
            self.client.log_image(self.run_id, grid, artifact_file=artifact_file)
            return
        self._wait_for_image()
        self._image_in_flight = self._uploads.submit(
            self.client.log_image, self.run_id, grid, artifact_file=artifact_file
        )

    def flush(self) -> None:
        """Wait for the metrics and images still being logged; raises the error of a failed one."""
        self._wait_for_metrics()
        self._wait_for_image()

    def _wait_for_metrics(self) -> None:
        in_flight, self._metrics_in_flight = self._metrics_in_flight, None
        if in_flight is not None:
            in_flight.wait()

    def _wait_for_image(self) -> None:
        in_flight, self._image_in_flight = self._image_in_flight, None
        if in_flight is not None:
            in_flight.result()

    def log_model_folder(
        self, folder: str | Path, *, metrics: Mapping[str, float] | None = None
    ) -> str:
        """Upload an ``hdm_model`` checkpoint folder (weights + config) and ``metrics.json``.

        Returns the artifact URI of the run's ``model/`` folder, the registry's source.
        """
        from hdm_model.checkpoint import CONFIG_FILE, WEIGHTS_FILE

        with tempfile.TemporaryDirectory(prefix="hdm-model-") as staging:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                source = Path(folder) / name
                if not source.is_file():
                    raise FileNotFoundError(f"model folder {folder} lacks {name}")
                shutil.copyfile(source, Path(staging) / name)
            (Path(staging) / "metrics.json").write_text(
                json.dumps(dict(metrics or {}), indent=2, sort_keys=True)
            )
            self.client.log_artifacts(self.run_id, staging, MODEL_ARTIFACT_PATH)
        return f"{self.artifact_uri()}/{MODEL_ARTIFACT_PATH}"

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def finish(self, *, failed: bool = False) -> None:
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store, an ``mlartifacts`` folder beside the database file.

    Without it MLflow would put artifacts in ``./mlruns`` of whatever the working directory
    happens to be. Tracking servers choose their own artifact store (None here).
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    return (database.parent / "mlartifacts").resolve().as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def _tag_list(tags: Mapping[str, str]) -> list[RunTag]:
    return [RunTag(key, str(value)) for key, value in tags.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
