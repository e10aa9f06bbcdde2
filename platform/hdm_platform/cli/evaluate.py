"""``hdm evaluate`` (one model's scores on a split) and ``hdm compare`` (several side by side)."""

from __future__ import annotations

import click

from hdm_platform.config import resolve_tracking_uri

__all__ = ["compare", "evaluate"]


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

    tracking = resolve_tracking_uri(tracking_uri)
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
    from hdm_platform.model_refs import HTTPEnhancerError

    tracking = resolve_tracking_uri(tracking_uri)
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
