"""``hdm train``: one experiment on the local Ray or a cluster, tracked in MLflow."""

from __future__ import annotations

import click

from hdm_platform.cli.options import experiment_option, overrides_option
from hdm_platform.config import ConfigError, load_config

__all__ = ["train"]


@click.command()
@experiment_option("jobs/configs/dehaze-reside-its.yaml")
@overrides_option("train.lr=1e-4")
def train(config_path: str, overrides: tuple[str, ...]) -> None:
    """Train on the local Ray, or on the cluster at RAY_ADDRESS; re-running a name resumes it.

    The config is validated (and the dataset and VGG weights checked) before Ray starts.
    """
    from hdm_platform.console import configure_logging
    from hdm_platform.train.driver import fit

    click.echo(f"logs: {configure_logging('train')} (Ray's worker logs: /tmp/ray/session_latest/logs; -v shows both)")
    try:
        config = load_config(config_path, overrides)
        # fit() runs its preflight checks before it starts Ray.
        outcome = fit(config)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"run name:           {outcome.run_name}")
    click.echo(f"storage path:       {outcome.storage_path}")
    click.echo(f"latest checkpoint:  {outcome.checkpoint_path}")
    click.echo(f"MLflow run id:      {outcome.mlflow_run_id}")
    if outcome.registered_version is not None:
        click.echo(f"registered version: {outcome.registered_model} v{outcome.registered_version}")
    for name in ("val_psnr", "val_ssim", "val_psnr_y", "val_ssim_y"):
        if name in outcome.metrics:
            click.echo(f"{name + ':':<20}{outcome.metrics[name]:.4f}")
