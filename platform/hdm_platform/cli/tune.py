"""``hdm tune``: a hyperparameter sweep or one of the paper's ablations with Ray Tune."""

from __future__ import annotations

import click

from hdm_platform.cli.options import experiment_option, overrides_option
from hdm_platform.config import ConfigError, load_config

__all__ = ["tune"]


@click.command()
@experiment_option("jobs/configs/dehaze-nh-haze.yaml")
@click.option(
    "--space", "space_path", required=True, metavar="YAML",
    help="Search space, e.g. jobs/spaces/loss-lr.yaml or jobs/spaces/table4-orders.yaml.",
)  # fmt: skip
@overrides_option("data.uri=s3://...")
@click.option("--name", "sweep_name", default=None, help="Sweep name; default: <config name>-<space name>.")
@click.option("--resume", is_flag=True, help="Continue the sweep of this name after a crash.")
@click.option(
    "--out", "out_dir", default=None, metavar="DIR",
    help="Where the table, plot and best config go; default: HDM_HOME/sweeps/<sweep name>.",
)  # fmt: skip
def tune(
    config_path: str,
    space_path: str,
    overrides: tuple[str, ...],
    sweep_name: str | None,
    resume: bool,
    out_dir: str | None,
) -> None:
    """Sweep a search space over an experiment; every trial is a distributed training run.

    The space is checked against the experiment before Ray starts. At the end the results
    table is printed (and the paper's table for an ablation space), and the best trial's
    config and model are saved: the config as a ready-to-run YAML, the model as the
    'challenger' of the task's registered model.
    """
    from hdm_platform.console import configure_logging
    from hdm_platform.tune.driver import run_sweep
    from hdm_platform.tune.space import load_space

    click.echo(f"logs: {configure_logging('tune')} (Ray's worker logs: /tmp/ray/session_latest/logs; -v shows both)")
    try:
        experiment = load_config(config_path, overrides)
        space = load_space(space_path)
        outcome = run_sweep(experiment, space, sweep_name=sweep_name, resume=resume, out_dir=out_dir)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    click.echo(outcome.table)
    if outcome.paper_table is not None:
        click.echo("")
        click.echo(outcome.paper_table)
    click.echo("")
    click.echo(f"sweep:              {outcome.sweep_name} ({outcome.experiment_path})")
    click.echo(f"MLflow parent run:  {outcome.parent_run_id}")
    for label, path in outcome.files.items():
        click.echo(f"{label + ':':<20}{path}")
    if outcome.registered_version is not None:
        click.echo(f"challenger:         {outcome.registered_model} v{outcome.registered_version}")
