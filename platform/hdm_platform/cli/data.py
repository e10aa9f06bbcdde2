"""``hdm data``: ingest benchmarks, synthesise pairs and inspect datasets.

Usage::

    hdm data ingest --layout sots SRC DEST_URI
    hdm data ingest --layout paired --task derain --input-dir rainy --target-dir clean \\
        --pair-pattern '(?P<key>\\d+)_.*' SRC s3://bucket/datasets/mine
    hdm data ingest --layout unpaired --task dehaze photos/ datasets/real-hazy
    hdm data synth --task dehaze --count 500 --seed 0 --size 256 builtin datasets/synth-haze
    hdm data synth --task dehaze --count 480 --size 96 builtin-scenes datasets/scene-haze
    hdm data inspect datasets/sots --contact-sheet sots.png
    hdm data export datasets/sots --split test --side input -o hazy/
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

from hdm_platform.data.layouts import LAYOUTS, LayoutOptions
from hdm_platform.vocabulary import SPLITS, TASKS

__all__ = ["data"]

class ByteSize(click.ParamType):
    """A size such as ``256MB``, ``64MiB`` or ``1000000``, parsed by pydantic's ``ByteSize``."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from pydantic import ByteSize as PydanticByteSize
        from pydantic import TypeAdapter, ValidationError

        try:
            size = int(TypeAdapter(PydanticByteSize).validate_python(value))
        except ValidationError:
            size = 0
        if size < 1:
            self.fail(f"{value!r} is not a size such as 256MB, 64MiB or 1000000", param, ctx)
        return size


class CropSize(click.ParamType):
    """``256`` (square), ``320x240`` (width x height) or ``full`` (whole photos)."""

    name = "size"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int] | None:
        if value is None or isinstance(value, tuple):
            return value
        text = str(value).strip().lower()
        if text == "full":
            return None
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
        if match is None or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
            self.fail(f"{value!r} is not a size such as 256, 320x240 or full", param, ctx)
        return int(match[1]), int(match[2] or match[1])


def _storage_options(
    config: str | None, endpoint_url: str | None, region: str | None, pairs: tuple[str, ...]
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if config is not None:
        from hdm_platform.config import ConfigError, load_config

        try:
            options.update(load_config(config).storage.storage_options())
        except (ConfigError, OSError) as error:
            raise click.BadParameter(str(error), param_hint="--config") from error
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if region:
        options["region"] = region
    return options


def writer_options(*, workers: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of every command that writes a dataset (shard size, parallelism, name)."""
    decorators = [
        click.option(
            "--shard-size",
            type=ByteSize(),
            default="256MiB",  # shard_writer.DEFAULT_SHARD_SIZE (tests/test_cli.py checks the two agree)
            show_default=True,
            help="Encoded image bytes per Parquet shard, e.g. 64MiB.",
        ),
        click.option("--workers", type=click.IntRange(min=1), default=workers, show_default=True),
        click.option("--name", help="Dataset name (default: last part of DEST_URI)."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def storage_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the options that reach object stores (S3 endpoint, region, anything fsspec takes)
    and hands the command one ``storage_options`` dict built from them."""
    decorators = [
        click.option(
            "--config",
            type=click.Path(exists=True, dir_okay=False),
            help="Experiment config whose storage: section (endpoint_url, region) to use.",
        ),
        click.option("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)."),
        click.option("--region", help="S3 region (default: $AWS_DEFAULT_REGION)."),
        click.option(
            "--storage-option",
            "storage_pairs",
            multiple=True,
            metavar="KEY=VALUE",
            help="Extra fsspec filesystem option; repeatable.",
        ),
    ]

    @functools.wraps(command)
    def with_storage_options(
        *args: Any,
        config: str | None,
        endpoint_url: str | None,
        region: str | None,
        storage_pairs: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        options = _storage_options(config, endpoint_url, region, storage_pairs)
        return command(*args, storage_options=options, **kwargs)

    wrapped: Callable[..., Any] = with_storage_options
    for decorator in reversed(decorators):
        wrapped = decorator(wrapped)
    return wrapped


@click.group("data")
def data() -> None:
    """Ingest, synthesise and inspect datasets (Parquet shards + manifest.json)."""


@data.command("ingest")
@click.argument("source")
@click.argument("dest_uri")
@click.option(
    "--layout", required=True, type=click.Choice(list(LAYOUTS)), help="The benchmark's file naming."
)
@click.option(
    "--task", type=click.Choice(TASKS), help="Default from the layout; required for paired/unpaired."
)
@click.option("--split", type=click.Choice(SPLITS), help="Split for pairs whose layout/folders name none.")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of training pairs moved to val (deterministic, by hash).",
)
@click.option(
    "--pair-pattern", help="paired layout: regex with a (?P<key>...) group matched to target stems."
)
@click.option("--input-dir", default="input", show_default=True, help="paired layout: folder of inputs.")
@click.option("--target-dir", default="target", show_default=True, help="paired layout: folder of targets.")
@click.option(
    "--did-input-half",
    type=click.Choice(["left", "right"]),
    default="right",
    show_default=True,
    help="did layout: which half of each image is the rainy input.",
)
@click.option(
    "--on-error",
    type=click.Choice(["raise", "skip"]),
    default="raise",
    show_default=True,
    help="Stop at bad pairs, or skip them and list them in the manifest.",
)
@writer_options(workers=8)
@storage_options
def ingest_command(
    source: str,
    dest_uri: str,
    layout: str,
    task: str | None,
    split: str | None,
    val_fraction: float,
    pair_pattern: str | None,
    input_dir: str,
    target_dir: str,
    did_input_half: str,
    on_error: str,
    shard_size: int,
    workers: int,
    name: str | None,
    no_progress: bool,
    storage_options: dict[str, Any],
) -> None:
    """Ingest the paired benchmark at SOURCE into a dataset at DEST_URI (any fsspec URI)."""
    from hdm_platform.data.ingest import IngestError, IngestOptions, ingest

    try:
        options = IngestOptions(
            layout=layout,
            task=task,  # type: ignore[arg-type]
            pairing=LayoutOptions(
                split=split,  # type: ignore[arg-type]
                pair_pattern=pair_pattern,
                input_dir=input_dir,
                target_dir=target_dir,
                input_half=did_input_half,  # type: ignore[arg-type]
            ),
            val_fraction=val_fraction,
            on_error=on_error,  # type: ignore[arg-type]
            shard_size=shard_size,
            workers=workers,
            name=name,
        )
        result = ingest(source, dest_uri, options, storage_options=storage_options, progress=not no_progress)
    except (IngestError, ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(result.summary())
    for skipped in result.manifest.skipped if not result.unchanged else []:
        click.echo(f"skipped {skipped.input or skipped.target}: {skipped.reason}", err=True)


@data.command("synth")
@click.argument("clean_source")
@click.argument("dest_uri")
@click.option("--task", required=True, type=click.Choice(TASKS), help="Degradation to render.")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True, help="Pairs to render.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical pairs.")
@click.option(
    "--size",
    type=CropSize(),
    default="256",
    show_default=True,
    help="Random crop: 256, 320x240 (width x height) or full.",
)
@click.option(
    "--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True
)
@click.option(
    "--test-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True
)
@writer_options(workers=4)
@storage_options
def synth_command(
    clean_source: str,
    dest_uri: str,
    task: str,
    count: int,
    seed: int,
    size: tuple[int, int] | None,
    val_fraction: float,
    test_fraction: float,
    shard_size: int,
    workers: int,
    name: str | None,
    no_progress: bool,
    storage_options: dict[str, Any],
) -> None:
    """Render degraded/clean pairs from CLEAN_SOURCE into DEST_URI.

    CLEAN_SOURCE is a folder/URI of clean photos, 'builtin' (crops of the photos shipped in
    scikit-image, matplotlib and scikit-learn) or 'builtin-scenes' (dead-leaves scenes
    composed of those photos, with a depth known by construction, to train
    a dehazer on).
    """
    from hdm_platform.data.synth import synthesize

    try:
        result = synthesize(
            clean_source,
            dest_uri,
            task=task,
            count=count,
            seed=seed,
            size=size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            shard_size=shard_size,
            workers=workers,
            name=name,
            storage_options=storage_options,
            progress=not no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(result.summary())


@data.command("inspect")
@click.argument("uri")
@click.option("--contact-sheet", metavar="PNG", help="Write an input | target sheet of a few pairs here.")
@click.option("--sheet-pairs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option(
    "--psnr-pairs",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Pairs per split whose input-vs-target PSNR is measured.",
)
@storage_options
def inspect_command(
    uri: str,
    contact_sheet: str | None,
    sheet_pairs: int,
    psnr_pairs: int,
    storage_options: dict[str, Any],
) -> None:
    """Print counts, sizes and input-vs-target PSNR of the dataset at URI."""
    from hdm_platform.data.inspect import inspect_dataset

    try:
        report = inspect_dataset(
            uri,
            storage_options=storage_options,
            psnr_pairs=psnr_pairs,
            contact_sheet=contact_sheet,
            sheet_pairs=sheet_pairs,
        )
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(report.render())


@data.command("export")
@click.argument("uri")
@click.option("--split", required=True, help="Split to export, e.g. test.")
@click.option("--side", type=click.Choice(["input", "target"]), default="input", show_default=True)
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="At most this many images.")
@storage_options
def export_command(
    uri: str,
    split: str,
    side: str,
    output_dir: str,
    limit: int | None,
    storage_options: dict[str, Any],
) -> None:
    """Write the SIDE images of a split of the dataset at URI to files, byte for byte."""
    from hdm_platform.data.export import export_split

    try:
        written = export_split(
            uri, split, output_dir, side=side, limit=limit, storage_options=storage_options  # type: ignore[arg-type]
        )
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {len(written)} {side} images of [{split}] to {output_dir}")
