"""``hdm train``, ``hdm evaluate``, ``hdm compare`` and ``hdm models promote|list``."""

from __future__ import annotations

import typing

import click

from hdm_platform.config import ConfigError, MLflowConfig, Task, load_config

__all__ = ["compare", "evaluate", "models", "train"]

_TASKS = list(typing.get_args(Task))


def _default_tracking_uri(explicit: str | None) -> str:
    # The same lookup as an experiment's mlflow.tracking_uri: flag, $MLFLOW_TRACKING_URI, SQLite.
    return MLflowConfig(tracking_uri=explicit).resolved_tracking_uri()


@click.command()
@click.option(
    "--config", "config_path", required=True, metavar="YAML",
    help="Experiment file (path or URI), e.g. jobs/configs/dehaze-reside-its.yaml.",
)  # fmt: skip
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config field, e.g. --set train.lr=1e-4 (repeatable).",
)  # fmt: skip
def train(config_path: str, overrides: tuple[str, ...]) -> None:
    """Train on the local Ray, or on the cluster at RAY_ADDRESS; re-running a name resumes it.

    The config is validated (and the dataset and VGG weights checked) before Ray starts.
    """
    from hdm_platform.train.driver import fit

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


@click.command()
@click.option(
    "--model", "model_uri", required=True,
    help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint folder (path or URI), 'dcp' (classic "
    "dark channel prior) or 'input' (the degraded input itself).",
)  # fmt: skip
@click.option("--data", "data_uri", required=True, help="Dataset folder (holding manifest.json).")
@click.option("--split", default="test", show_default=True)
@click.option("--out", "out_csv", default=None, help="Per-image CSV to write (path or URI).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--tile", type=int, default=None, help="Tile side (multiple of 4); default: whole images up to 1 MPixel, 512 tiles above; 0 never tiles.")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, show_default=True)
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--experiment", default="hdm-evaluation", show_default=True)
def evaluate(
    model_uri: str,
    data_uri: str,
    split: str,
    out_csv: str | None,
    device: str,
    precision: str,
    tile: int | None,
    use_mlflow: bool,
    tracking_uri: str | None,
    experiment: str,
) -> None:
    """PSNR / SSIM (RGB and Y) per image and on average, comparable with the paper's tables."""
    from hdm_platform import evaluate as evaluation

    tracking = _default_tracking_uri(tracking_uri)
    try:
        result = evaluation.evaluate(
            model_uri, data_uri, split=split, tracking_uri=tracking, device=device,
            precision=precision, tile=tile, progress=True,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if out_csv:
        evaluation.write_csv(result, out_csv)
        click.echo(f"wrote {len(result.rows)} rows to {out_csv}")
    click.echo(result.summary())
    if result.perfect_images:
        click.echo(f"{result.perfect_images} images equal their targets (infinite PSNR, not averaged)")
    if use_mlflow:
        run_id = evaluation.log_evaluation(result, tracking_uri=tracking, experiment=experiment)
        click.echo(f"MLflow run id: {run_id}")


def _labelled(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    models: dict[str, str] = {}
    for value in values:
        label, separator, reference = value.partition("=")
        if not separator or "://" in label:  # a bare reference labels itself
            label, reference = value, value
        if label in models:
            raise click.BadParameter(f"label {label!r} given twice", param_hint="--model")
        models[label] = reference
    return models


@click.command()
@click.option(
    "--model", "models", multiple=True, required=True, callback=_labelled, metavar="[LABEL=]REFERENCE",
    help="A model to compare (repeatable; the first is the one measured against the others): "
    "http://HOST:PORT/v1/enhance/TASK (served), models:/..., a checkpoint folder, 'dcp' or 'input'.",
)  # fmt: skip
@click.option("--data", "data_uri", required=True, help="Dataset folder (holding manifest.json).")
@click.option("--split", default="test", show_default=True)
@click.option("--table", "table_path", type=click.Path(dir_okay=False), help="Write the Markdown table here.")
@click.option("--picture", "picture_path", type=click.Path(dir_okay=False), help="Write the before/after picture (PNG) here.")
@click.option("--picture-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
def compare(
    models: dict[str, str],
    data_uri: str,
    split: str,
    table_path: str | None,
    picture_path: str | None,
    picture_images: int,
    tracking_uri: str | None,
) -> None:
    """PSNR/SSIM of several models on one split, a table of them and a before/after picture."""
    from pathlib import Path

    from hdm_platform import compare as comparison
    from hdm_platform.enhancers import HTTPEnhancerError

    tracking = _default_tracking_uri(tracking_uri)
    try:
        results = comparison.compare_models(models, data_uri, split=split, tracking_uri=tracking)
        picture = (
            comparison.comparison_picture(models, data_uri, split=split, images=picture_images, tracking_uri=tracking)
            if picture_path
            else None
        )
    except (FileNotFoundError, ValueError, HTTPEnhancerError) as error:
        raise click.ClickException(str(error)) from None
    table = comparison.comparison_table(results)
    click.echo(table)
    first = next(iter(models))
    for label, margin in comparison.margins(results).items():
        verdict = "beats" if margin > 0 else "does NOT beat"
        click.echo(f"{first} {verdict} {label} by {margin:+.2f} dB PSNR")
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(table + "\n")
        click.echo(f"table:   {table_path}")
    if picture is not None and picture_path:
        Path(picture_path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(picture_path)
        click.echo(f"picture: {picture_path}")


@click.group()
def models() -> None:
    """Registered models: one per task (hdm-dehaze, hdm-derain, hdm-lowlight)."""


@models.command()
@click.argument("task", type=click.Choice(_TASKS))
@click.argument("version", type=int)
@click.option("--alias", default="champion", show_default=True)
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--name", default=None, help="Registered model name (default: hdm-TASK).")
def promote(task: str, version: int, alias: str, tracking_uri: str | None, name: str | None) -> None:
    """Point ALIAS (default champion) at VERSION of the task's registered model."""
    from hdm_platform.tracking.registry import registry_client, set_alias

    model_name = name or f"hdm-{task}"
    client = registry_client(_default_tracking_uri(tracking_uri))
    try:
        promoted = set_alias(client, name=model_name, version=version, alias=alias)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{model_name}@{alias} -> version {promoted.version} (run {promoted.run_id})")


@models.command(name="list")
@click.argument("task", type=click.Choice(_TASKS))
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--name", default=None, help="Registered model name (default: hdm-TASK).")
def list_models(task: str, tracking_uri: str | None, name: str | None) -> None:
    """Versions of the task's registered model, newest first, with their aliases."""
    from hdm_platform.tracking.registry import list_versions, registry_client

    model_name = name or f"hdm-{task}"
    versions = list_versions(registry_client(_default_tracking_uri(tracking_uri)), model_name)
    if not versions:
        click.echo(f"{model_name}: no versions registered")
        return
    for version in versions:
        aliases = ",".join(sorted(version.aliases)) or "-"
        click.echo(f"{model_name} v{version.version}  aliases={aliases}  run={version.run_id}")
