"""MLflow for a sweep: one parent run, a child run per trial, the best model as ``challenger``.

The parent run is the sweep (its base experiment and its search space as params, the
results table, plot and best config as artifacts). Each trial's rank 0 logs its training
into a child run (MLflow's ``mlflow.parentRunId`` tag nests it under the parent), found
again by the trial's Ray run when the trial is retried or the sweep resumes. Trials stopped
by ASHA end without returning, so the sweep sets every child's final status itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from hdm_platform.config import ConfigError, ExperimentConfig
from hdm_platform.tracking.mlflow_run import (
    RAY_RUN_NAME_TAG,
    RAY_STORAGE_PATH_TAG,
    TrackedRun,
    find_latest_run,
    source_tags,
)
from hdm_platform.tune.report import TrialRow
from hdm_platform.tune.space import SearchSpace

__all__ = [
    "CHALLENGER_ALIAS",
    "PARENT_RUN_TAG",
    "SWEEP_TAG",
    "TRIAL_ID_TAG",
    "close_trial_runs",
    "open_sweep_run",
    "open_trial_run",
    "sweep_params",
]

#: MLflow's own tag for nested runs: the UI shows children under their parent.
PARENT_RUN_TAG = "mlflow.parentRunId"
SWEEP_TAG = "hdm.sweep"
TRIAL_ID_TAG = "hdm.trial_id"
#: A sweep's best model is registered for review, never promoted: ``hdm model promote``.
CHALLENGER_ALIAS = "challenger"


def sweep_params(experiment: ExperimentConfig, space: SearchSpace) -> dict[str, Any]:
    """The parent run's params: the base experiment and the space, as dotted keys."""
    params = dict(experiment.flat())
    definition = space.definition()
    searched = definition.pop("params")
    params.update({f"space.{key}": value for key, value in definition.items()})
    params.update({f"space.params.{key}": json.dumps(value) for key, value in searched.items()})
    return params


def open_sweep_run(
    experiment: ExperimentConfig,
    space: SearchSpace,
    *,
    sweep_name: str,
    experiment_path: str,
    resume: bool,
) -> TrackedRun:
    """Create the sweep's parent run, or reopen it to resume (same base config and space).

    Raises:
        ConfigError: when resuming with a base config or space that differs from the one the
            sweep started with, naming the first differing key.
    """
    tracking_uri = experiment.mlflow.resolved_tracking_uri()
    tags = {**source_tags(), "hdm.task": experiment.task, SWEEP_TAG: sweep_name}
    params = sweep_params(experiment, space)
    if resume:
        existing = find_latest_run(
            MlflowClient(tracking_uri=tracking_uri),
            experiment.mlflow.experiment,
            {SWEEP_TAG: sweep_name, RAY_STORAGE_PATH_TAG: experiment_path},
        )
        if existing is not None:
            logged = existing.data.params
            changed = sorted(key for key in params if key in logged and logged[key] != _param_text(params[key]))
            if changed:
                raise ConfigError(
                    f"sweep {sweep_name} started with {changed[0]} = {logged[changed[0]]}, not "
                    f"{params[changed[0]]!r}: resume with the same --config, --space and --set, "
                    f"or start a new sweep with --name"
                )
        tracked = TrackedRun.start_or_resume(
            tracking_uri=tracking_uri,
            experiment=experiment.mlflow.experiment,
            run_name=sweep_name,
            storage_path=experiment_path,
            run_id=existing.info.run_id if existing is not None else None,
            tags=tags,
        )
    else:
        tracked = TrackedRun.create(
            tracking_uri=tracking_uri,
            experiment=experiment.mlflow.experiment,
            run_name=sweep_name,
            tags={**tags, RAY_RUN_NAME_TAG: sweep_name, RAY_STORAGE_PATH_TAG: experiment_path},
        )
    tracked.log_params(params)
    return tracked


def open_trial_run(
    config: ExperimentConfig, *, tracking_uri: str, parent_run_id: str, sweep_name: str, trial_id: str
) -> TrackedRun:
    """The child run of one trial (its Ray Train run's name and storage find it again)."""
    tracked = TrackedRun.start_or_resume(
        tracking_uri=tracking_uri,
        experiment=config.mlflow.experiment,
        run_name=config.run_name(),
        storage_path=config.run.resolved_storage_path(),
        tags={
            **source_tags(),
            "hdm.task": config.task,
            PARENT_RUN_TAG: parent_run_id,
            SWEEP_TAG: sweep_name,
            TRIAL_ID_TAG: trial_id,
        },
    )
    tracked.log_params(config.flat())
    return tracked


def child_run_ids(parent: TrackedRun) -> dict[str, str]:
    """Trial id -> child run id, for every trial that started under ``parent``."""
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    children = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'"
    )
    return {run.data.tags[TRIAL_ID_TAG]: run.info.run_id for run in children if TRIAL_ID_TAG in run.data.tags}


def close_trial_runs(parent: TrackedRun, rows: Iterable[TrialRow]) -> dict[str, str]:
    """Give each child run its trial's outcome and final status; returns trial id -> run id."""
    children = child_run_ids(parent)
    for row in rows:
        run_id = children.get(row.trial_id)
        if run_id is None:  # failed before its child run was opened
            continue
        child = TrackedRun(parent.client, run_id)
        child.set_tags({"hdm.trial_status": row.status, "hdm.epochs_run": str(row.epochs_run)})
        if row.best_psnr is not None:
            step = int(row.best_metrics.get("step", 0))
            child.log_metrics({"best_val_psnr": row.best_psnr, "best_val_ssim": row.best_ssim or 0.0}, step=step)
        status = RunStatus.FAILED if row.failed else RunStatus.FINISHED
        parent.client.set_terminated(run_id, status=RunStatus.to_string(status))
    return children


def log_sweep_files(parent: TrackedRun, files: Mapping[str, Path]) -> None:
    """Upload the sweep's outputs (table, plot, best config) under ``sweep/`` of the parent."""
    for path in files.values():
        parent.client.log_artifact(parent.run_id, str(path), artifact_path="sweep")


def _param_text(value: Any) -> str:
    # How TrackedRun.log_params writes a value, so logged and new params compare as text.
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_VAL_LENGTH]
