"""Sweeps with Ray Tune, where every trial is a distributed Ray Train run.

:func:`run_sweep` is what ``hdm tune`` calls:

1. The search space is checked against the experiment (every key and candidate value
   through the schema and training's preflight) before Ray starts.
2. The sweep's MLflow parent run is created (or reopened to resume).
3. ``ray.tune.Tuner`` runs :func:`run_trial` per trial, Ray's Train-in-Tune pattern: the
   trainable is a driver *function* that builds the experiment's ``TorchTrainer`` with
   ``TuneReportCallback`` and fits it, so each trial has its own worker group, checkpoints
   and child MLflow run, and Train's validation reports reach Tune and ASHA.
4. The results table, a PSNR plot and the best trial's experiment YAML are written; the best
   trial's model is registered as the ``challenger`` of the task's registered model.

Storage, under the experiment's ``run.storage_path``::

    <storage>/<sweep>/                          Tune's experiment (restore point)
    <storage>/<sweep>/trial-runs/trial-<id>/    each trial's Ray Train run and checkpoints

A crashed driver resumes with ``Tuner.restore`` on the sweep's folder: finished trials are
kept, unfinished ones restart and their Train runs resume from their latest checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from hdm_platform.console import is_verbose, ray_init_options
from hdm_platform.config import ConfigError, ExperimentConfig, apply_overrides, local_home, validate_config
from hdm_platform.tracking.mlflow_run import TrackedRun
from hdm_platform.train.driver import CHECKPOINT_SCORE, build_trainer, export_model, preflight, ray_storage
from hdm_platform.tune.ablations import PAPER_TABLES, check_paper_table, render_paper_table
from hdm_platform.tune.progress import SweepProgress
from hdm_platform.tune.report import (
    TrialRow,
    best_row,
    collect_rows,
    format_table,
    plot_val_psnr,
    write_best_config,
    write_csv,
)
from hdm_platform.tune.space import SearchSpace, planned_validations
from hdm_platform.tune.tracking import (
    CHALLENGER_ALIAS,
    close_trial_runs,
    log_sweep_files,
    open_sweep_run,
    open_trial_run,
)

__all__ = [
    "DATA_PIPELINE_CPUS",
    "TRIAL_DRIVER_CPUS",
    "SweepOutcome",
    "SweepPlan",
    "local_sweep_resources",
    "max_concurrent_trials",
    "run_sweep",
    "run_trial",
]

#: What a trial itself holds: it runs only the Train driver function, which waits on Train's
#: controller (an actor with no CPU); the training workers reserve their own resources.
TRIAL_DRIVER_CPUS = 0.01
#: CPUs kept free for Ray Data's read and decode tasks, which need one CPU each. Without
#: them, trials could take every CPU and their input pipelines would wait forever.
DATA_PIPELINE_CPUS = 1
#: A trial is retried once after a failure, then reported failed; the sweep goes on.
TRIAL_MAX_FAILURES = 1

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPlan:
    """What every trial gets from the sweep (through ``tune.with_parameters``)."""

    base: dict[str, Any]
    sweep_name: str
    trial_runs_path: str
    tracking_uri: str
    parent_run_id: str

    def trial_config(self, trial_id: str, params: Mapping[str, Any]) -> ExperimentConfig:
        """The base experiment with the trial's values; its Train run is named after the trial."""
        raw = apply_overrides(
            copy.deepcopy(self.base),
            [*params.items(), ("run.name", f"trial-{trial_id}"), ("run.storage_path", self.trial_runs_path)],
        )
        return validate_config(raw, source=f"trial {trial_id}")


def run_trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """Tune's trainable: one trial is one Ray Train run of the experiment with ``params``."""
    trial_id = ray.tune.get_context().get_trial_id()
    config = plan.trial_config(trial_id, params)
    steps_per_epoch = preflight(config)
    tracked = open_trial_run(
        config,
        tracking_uri=plan.tracking_uri,
        parent_run_id=plan.parent_run_id,
        sweep_name=plan.sweep_name,
        trial_id=trial_id,
    )
    trainer = build_trainer(
        config,
        steps_per_epoch=steps_per_epoch,
        mlflow_tracking_uri=plan.tracking_uri,
        mlflow_run_id=tracked.run_id,
        # Forwards each validation report (val_psnr, checkpoint path) to Tune and ASHA.
        callbacks=[TuneReportCallback()],
    )
    # The run's name and storage are the trial's, so a retried or resumed trial continues
    # its Train run from the latest checkpoint instead of starting over.
    trainer.fit()


def max_concurrent_trials(
    experiment: ExperimentConfig, cluster: Mapping[str, float], cap: int | None = None
) -> int:
    """How many trials the cluster runs at once without one waiting for resources.

    Each trial needs ``scaling.num_workers`` workers (one GPU each with ``use_gpu``, plus
    ``cpus_per_worker`` CPUs) and a sliver of CPU for its driver function; one CPU stays free
    for the data pipelines. At least 1 (an autoscaler may add nodes), at most ``cap``.
    """
    scaling = experiment.scaling
    cpus_per_trial = scaling.num_workers * scaling.cpus_per_worker + TRIAL_DRIVER_CPUS
    fits = [(cluster.get("CPU", 0.0) - DATA_PIPELINE_CPUS) / cpus_per_trial]
    if scaling.use_gpu:
        fits.append(cluster.get("GPU", 0.0) / scaling.num_workers)
    count = math.floor(min(fits) + 1e-9)
    if count < 1:
        _logger.warning(
            "the cluster (%s) has no room for one trial (%s workers, %s CPUs each%s); "
            "running one at a time, which waits for an autoscaler to add nodes",
            dict(cluster), scaling.num_workers, scaling.cpus_per_worker,
            ", 1 GPU each" if scaling.use_gpu else "",
        )  # fmt: skip
    return max(1, min(count, cap) if cap is not None else count)


def local_sweep_resources(experiment: ExperimentConfig) -> dict[str, Any]:
    """``ray.init`` arguments: the console settings, and CPUs for a local Ray (none for a
    cluster at ``RAY_ADDRESS``).

    A local Ray gets at least the CPUs of one trial plus the data pipeline's, so that the
    smallest sweep runs on a laptop with fewer cores (logical CPUs only schedule work).
    """
    # The trials' output reaches the console through the sweep's display, and all of it
    # with -v.
    scaling = experiment.scaling
    one_trial = math.ceil(scaling.num_workers * scaling.cpus_per_worker + TRIAL_DRIVER_CPUS)
    return ray_init_options(local_cpus=max(os.cpu_count() or 1, one_trial + DATA_PIPELINE_CPUS))


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep left behind."""

    sweep_name: str
    experiment_path: str
    parent_run_id: str
    rows: list[TrialRow]
    table: str
    paper_table: str | None
    files: dict[str, Path]
    best_trial: str | None
    best_config: ExperimentConfig | None
    registered_model: str | None
    registered_version: str | None


def run_sweep(
    experiment: ExperimentConfig,
    space: SearchSpace,
    *,
    sweep_name: str | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep of ``space`` over ``experiment``.

    Raises:
        ConfigError: for a space or experiment that cannot run, before any trial starts.
    """
    # The settings the experiment file gave (not every default): trials apply their values
    # to these, and the best config is written from them.
    base = _absolute_local_paths(experiment.model_dump(mode="json", exclude_unset=True))
    experiment = space.check(base)
    if space.paper_table is not None:
        table = PAPER_TABLES[space.paper_table]
        check_paper_table(table, space.candidate_configs(base, table.key))
    name = sweep_name or f"{experiment.name}-{space.name}"
    location = _locate_sweep(experiment, name, resume=resume)

    if not ray.is_initialized():
        ray.init(**local_sweep_resources(experiment))
    parent = open_sweep_run(experiment, space, sweep_name=name, experiment_path=location.uri, resume=resume)
    plan = SweepPlan(
        base=base,
        sweep_name=name,
        trial_runs_path=f"{location.uri}/trial-runs",
        tracking_uri=experiment.mlflow.resolved_tracking_uri(),
        parent_run_id=parent.run_id,
    )
    tuner = _tuner(plan, space, experiment, location, parent, resume=resume)
    try:
        results = tuner.fit()
    except BaseException:
        parent.finish(failed=True)
        raise
    return _finish(
        results,
        space=space,
        experiment=experiment,
        plan=plan,
        parent=parent,
        location=location,
        out_dir=Path(out_dir) if out_dir is not None else local_home() / "sweeps" / name,
    )


@dataclass(frozen=True)
class _SweepLocation:
    """Where a sweep's Tune experiment lives: ``uri`` as the experiment names it, ``path``
    under ``storage_path`` on ``filesystem`` as Ray opens it."""

    uri: str
    storage_path: str
    path: str
    filesystem: Any


def _locate_sweep(experiment: ExperimentConfig, name: str, *, resume: bool) -> _SweepLocation:
    """The sweep's folder under ``run.storage_path``; a new sweep must not exist there yet,
    a resumed one must."""
    storage_uri = experiment.run.resolved_storage_path().rstrip("/")
    storage_path, filesystem = ray_storage(storage_uri, experiment.storage.storage_options())
    location = _SweepLocation(f"{storage_uri}/{name}", storage_path, f"{storage_path}/{name}", filesystem)
    restorable = tune.Tuner.can_restore(location.path, storage_filesystem=filesystem)
    if restorable and not resume:
        raise ConfigError(
            f"sweep {name} already exists at {location.uri}: pass --resume to continue it, "
            f"or --name to start another"
        )
    if resume and not restorable:
        raise ConfigError(f"no sweep {name} to resume at {location.uri}")
    return location


def _tuner(
    plan: SweepPlan,
    space: SearchSpace,
    experiment: ExperimentConfig,
    location: _SweepLocation,
    parent: TrackedRun,
    *,
    resume: bool,
) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), {"CPU": TRIAL_DRIVER_CPUS}
    )
    if resume:
        # Finished trials stay finished; unfinished and failed ones run again.
        return tune.Tuner.restore(
            location.path,
            trainable=trainable,
            resume_errored=True,
            storage_filesystem=location.filesystem,
        )
    concurrency = max_concurrent_trials(experiment, ray.cluster_resources(), space.max_concurrent_trials)
    parent.set_tags({"hdm.max_concurrent_trials": str(concurrency)})
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=CHECKPOINT_SCORE,
            mode="max",
            # The searcher holds the concurrency limit (Tune's max_concurrent_trials only
            # applies to searchers it wraps itself).
            search_alg=space.search_algorithm(max_concurrent=concurrency),
            scheduler=_scheduler(space, experiment),
            num_samples=space.num_samples,
        ),
        run_config=tune.RunConfig(
            name=plan.sweep_name,
            storage_path=location.storage_path,
            storage_filesystem=location.filesystem,
            failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
            # One display: the sweep's table; Tune's own status output only with -v.
            verbose=None if is_verbose() else 0,
            callbacks=[SweepProgress(list(space.params))],
        ),
    )


def _scheduler(space: SearchSpace, experiment: ExperimentConfig) -> ASHAScheduler | FIFOScheduler:
    if space.asha is None:
        return FIFOScheduler()  # every trial runs its planned epochs (the ablation tables)
    # Each validation is one Tune iteration; metric and mode come from TuneConfig.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=space.asha_max_t(experiment),
        grace_period=space.asha.grace_period,
        reduction_factor=space.asha.reduction_factor,
    )


def _finish(
    results: tune.ResultGrid,
    *,
    space: SearchSpace,
    experiment: ExperimentConfig,
    plan: SweepPlan,
    parent: TrackedRun,
    location: _SweepLocation,
    out_dir: Path,
) -> SweepOutcome:
    """Tables, plot, best config, child run statuses, challenger, parent artifacts."""
    keys = list(space.params)
    max_t = space.asha_max_t(experiment) if space.asha is not None else None

    def horizon(trial_id: str, params: Mapping[str, Any]) -> int:
        planned = planned_validations(plan.trial_config(trial_id, params))
        return min(planned, max_t) if max_t is not None else planned

    rows = collect_rows(results, keys, horizon)
    table, paper_table, files = _write_tables(rows, keys, space, experiment, plan, out_dir)
    children = close_trial_runs(parent, rows)
    best = best_row(rows)
    best_config = registered_model = registered_version = None
    if best is not None:
        best_config = write_best_config(
            plan.base,
            best,
            out_dir / "best-config.yaml",
            name=f"{plan.sweep_name}-best",
            header=(
                f"The best trial of sweep {plan.sweep_name} ({space.source}): {best.trial_id}, "
                f"validation PSNR {best.best_psnr:.2f} dB, SSIM {best.best_ssim:.4f}.\n"
                f"Train it: hdm train --config {out_dir / 'best-config.yaml'}"
            ),
        )
        files["best_config"] = out_dir / "best-config.yaml"
        if best.trial_id in children and best.best_metrics.get(CHECKPOINT_PATH_KEY):
            registered_model, registered_version = _register_challenger(
                best, TrackedRun(parent.client, children[best.trial_id]), plan, location.filesystem
            )
        parent.log_metrics({"best_val_psnr": best.best_psnr, "best_val_ssim": best.best_ssim or 0.0}, step=0)
        parent.set_tags({"hdm.best_trial": best.trial_id, "hdm.challenger_version": str(registered_version)})
    log_sweep_files(parent, files)
    parent.finish()
    return SweepOutcome(
        sweep_name=plan.sweep_name,
        experiment_path=location.uri,
        parent_run_id=parent.run_id,
        rows=rows,
        table=table,
        paper_table=paper_table,
        files=files,
        best_trial=best.trial_id if best is not None else None,
        best_config=best_config,
        registered_model=registered_model,
        registered_version=registered_version,
    )


def _write_tables(
    rows: list[TrialRow],
    keys: list[str],
    space: SearchSpace,
    experiment: ExperimentConfig,
    plan: SweepPlan,
    out_dir: Path,
) -> tuple[str, str | None, dict[str, Path]]:
    """The results CSV, plot and table, and the paper's table where the space reproduces
    one; returns the table, the paper table and the files by name."""
    files = {
        "results": write_csv(rows, keys, out_dir / "results.csv"),
        "plot": plot_val_psnr(rows, keys, out_dir / "val_psnr.png", title=f"sweep {plan.sweep_name}"),
        "table": out_dir / "results.txt",
    }
    table = format_table(rows, keys)
    files["table"].write_text(table + "\n", encoding="utf-8")
    if space.paper_table is None:
        return table, None, files
    configs = {row.trial_id: plan.trial_config(row.trial_id, row.params) for row in rows}
    paper_table = render_paper_table(
        PAPER_TABLES[space.paper_table], rows, configs,
        data_label=f"{experiment.data.uri}, split {experiment.data.val_split}",
    )  # fmt: skip
    files["paper_table"] = out_dir / f"{space.paper_table}.txt"
    files["paper_table"].write_text(paper_table + "\n", encoding="utf-8")
    return table, paper_table, files


def _register_challenger(
    best: TrialRow, run: TrackedRun, plan: SweepPlan, filesystem: Any
) -> tuple[str | None, str | None]:
    """Exports the best trial's best checkpoint into its own MLflow run and registers it
    with the challenger alias; returns the registered model and version."""
    checkpoint = ray.train.Checkpoint(path=best.best_metrics[CHECKPOINT_PATH_KEY], filesystem=filesystem)
    exported = export_model(
        plan.trial_config(best.trial_id, best.params),
        run,
        checkpoint,
        best.best_metrics,
        alias=CHALLENGER_ALIAS,
    )
    return exported.registered_model, exported.registered_version


def _absolute_local_paths(base: dict[str, Any]) -> dict[str, Any]:
    """Relative local dataset and VGG paths made absolute: trials run in their own folders."""
    raw = copy.deepcopy(base)
    for section, key in (("data", "uri"), ("loss", "vgg_weights")):
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            raw[section][key] = str(Path(value).expanduser().resolve())
    return raw
