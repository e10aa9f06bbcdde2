"""Ray job entry point: train one experiment on the cluster this job runs in.

``hdm submit train --config jobs/configs/X.yaml --set key=value`` runs this as
``python jobs/train.py --config jobs/configs/X.yaml --set key=value``; it can also be given
to ``ray job submit --working-dir . -- python jobs/train.py ...`` directly.
"""

from __future__ import annotations

import click

from hdm_platform.config import ConfigError, load_config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, help="Experiment YAML (path or URI).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
def main(config_path: str, overrides: tuple[str, ...]) -> None:
    """Train the experiment in CONFIG with Ray Train and track it in MLflow."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    # Imported after validation so a bad config fails without loading Ray Train.
    from hdm_platform.train.driver import fit

    outcome = fit(config)
    click.echo(f"run {outcome.run_name}: checkpoint {outcome.checkpoint_path}")
    click.echo(f"mlflow run {outcome.mlflow_run_id}: model {outcome.model_uri}")
    if outcome.registered_model:
        click.echo(f"registered {outcome.registered_model} version {outcome.registered_version}")
    if "val_psnr" in outcome.metrics:
        click.echo(f"val_psnr {outcome.metrics['val_psnr']:.2f} dB")


if __name__ == "__main__":
    main()
