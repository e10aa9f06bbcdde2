"""Ray job entry point: evaluate an experiment's model on a split of its dataset.

``hdm submit evaluate --config jobs/configs/X.yaml [--set ...] -- [--model M] [--split S]``
runs this as ``python jobs/evaluate.py --config ... --set ... --model M --split S``. The
experiment supplies what ``hdm evaluate`` takes as flags: the dataset (``data.uri``), its
storage options, the MLflow server and experiment, and the model (by default the version
that training registered under ``mlflow.alias``, e.g. ``models:/hdm-dehaze@challenger``).
When the experiment trains on GPUs, ``hdm submit`` places this job on a GPU node.
"""

from __future__ import annotations

import click
import torch

from hdm_platform import evaluate as evaluation
from hdm_platform.config import ConfigError, ExperimentConfig, load_config


def default_model(config: ExperimentConfig) -> str:
    """The registered version training produced: ``models:/<name>@<alias>``."""
    return f"models:/{config.registered_model_name()}@{config.mlflow.alias or 'champion'}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, help="Experiment YAML (path or URI).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
@click.option(
    "--model",
    default=None,
    help="models:/NAME@ALIAS, a checkpoint folder or 'dcp' [default: the experiment's model].",
)
@click.option("--split", default="test", show_default=True)
@click.option("--out", "out_csv", default=None, help="Per-image CSV to write (path or URI).")
@click.option("--tile", type=int, default=None, help="Tile side for large images (multiple of 4).")
def main(
    config_path: str,
    overrides: tuple[str, ...],
    model: str | None,
    split: str,
    out_csv: str | None,
    tile: int | None,
) -> None:
    """PSNR / SSIM of the experiment's model on SPLIT of its dataset, logged to MLflow."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    model = model or default_model(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tracking_uri = config.mlflow.resolved_tracking_uri()
    storage_options = config.storage.storage_options()
    try:
        result = evaluation.evaluate(
            model, config.data.uri, split=split, tracking_uri=tracking_uri, device=device,
            tile=tile, storage_options=storage_options,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(result.summary())
    if out_csv:
        evaluation.write_csv(result, out_csv, storage_options=storage_options)
        click.echo(f"wrote {len(result.rows)} rows to {out_csv}")
    run_id = evaluation.log_evaluation(
        result, tracking_uri=tracking_uri, experiment=config.mlflow.experiment
    )
    click.echo(f"MLflow run id: {run_id}")


if __name__ == "__main__":
    main()
