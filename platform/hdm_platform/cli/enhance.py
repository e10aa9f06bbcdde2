"""``hdm enhance`` (run a checkpoint, or the classic DCP dehazer, over image files) and
``hdm explain`` (the DCP priors and region masks of one image, as in the paper's Figure 1)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import click

from hdm_model.config import DCP_MASK_MODES, DEFAULT_TILE, FEATURE_STRIDE, UNTILED_MAX_PIXELS, HDMConfig

if TYPE_CHECKING:
    import torch

__all__ = ["collect_inputs", "enhance", "explain"]

_OUTPUT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def collect_inputs(inputs: tuple[Path, ...]) -> list[Path]:
    """Files as given; folders expanded to their image files (by suffix), sorted, not recursive."""
    from hdm_platform.imageio import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(
                sorted(
                    child
                    for child in path.iterdir()
                    if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            files.append(path)
    return files


def _resolve_device(device: str | None) -> torch.device:
    from hdm_model.inference import resolve_device

    try:
        return resolve_device(device)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None


def _check_multiple_of_stride(_: click.Context, __: click.Parameter, size: int | None) -> int | None:
    if size is not None and size % FEATURE_STRIDE:
        raise click.BadParameter(f"must be a multiple of {FEATURE_STRIDE}, got {size}")
    return size


def _output_path(source: Path, output_dir: Path, output_format: str) -> Path:
    return output_dir / f"{source.stem}{_OUTPUT_SUFFIXES[output_format]}"


@click.command()
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the results (created if missing); one file per input, same stem.",
)
@click.option(
    "--checkpoint",
    required=True,
    help="A checkpoint folder (path or URI), models:/NAME@ALIAS from the MLflow registry, "
    "or 'dcp' for the classic dark-channel-prior dehazer.",
)
@click.option(
    "--tile",
    type=click.IntRange(min=0),
    callback=_check_multiple_of_stride,
    help=f"Tile side (multiple of 4) to bound memory; 0 never tiles. Default: whole images "
    f"up to {UNTILED_MAX_PIXELS} pixels, {DEFAULT_TILE}-pixel tiles above. Ignored by 'dcp'.",
)
@click.option(
    "--tile-overlap",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    callback=_check_multiple_of_stride,
    help="Pixels shared by neighbouring tiles, blended to hide seams (multiple of 4).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on GPUs with bf16 and CPUs with AMX, where it is faster; fp32 "
    "elsewhere. Ignored by 'dcp'.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    help="Default: cuda when available, else cpu.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(sorted(_OUTPUT_SUFFIXES)),
    default="png",
    show_default=True,
)
def enhance(
    inputs: tuple[Path, ...],
    output_dir: Path,
    checkpoint: str,
    tile: int | None,
    tile_overlap: int,
    precision: str,
    device: str | None,
    output_format: str,
) -> None:
    """Enhance image files, or the images in folders, with an HDM checkpoint or classic DCP.

    A file that cannot be read or enhanced is reported and skipped; the exit status is 1
    when any file failed.
    """
    from tqdm import tqdm

    from hdm_platform.imageio import read_image, write_image
    from hdm_platform.model_refs import load_enhancer

    if tile and tile <= tile_overlap:
        raise click.BadParameter(
            f"--tile {tile} must exceed --tile-overlap {tile_overlap}", param_hint="--tile"
        )
    files = collect_inputs(inputs)
    if not files:
        raise click.UsageError("no image files found in the given inputs")
    try:
        run = load_enhancer(
            checkpoint,
            device=_resolve_device(device),
            precision=precision,
            tile=tile,
            tile_overlap=tile_overlap,
        )
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load {checkpoint}: {error}") from error
    output_dir.mkdir(parents=True, exist_ok=True)
    claimed: dict[Path, Path] = {}
    failures: list[tuple[Path, str]] = []
    started = time.perf_counter()
    for source in tqdm(files, desc="enhance", unit="image", file=sys.stderr):
        target = _output_path(source, output_dir, output_format)
        try:
            if target.resolve() == source.resolve():
                raise ValueError(f"the output {target} would overwrite the input")
            if target in claimed:
                raise ValueError(f"the output {target} is already written for {claimed[target]}")
            image = read_image(source)
            result = run(image.unsqueeze(0))[0]
            write_image(result, target, format=output_format)
            claimed[target] = source
        # ImageError is a ValueError; RuntimeError covers device failures such as running
        # out of memory; none of them should stop the rest of the batch.
        except (ValueError, RuntimeError, OSError) as error:
            failures.append((source, str(error)))
            tqdm.write(f"FAILED {source}: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    done = len(files) - len(failures)
    click.echo(f"enhanced {done} of {len(files)} images into {output_dir} in {elapsed:.1f} s")
    if failures:
        click.echo(f"{len(failures)} failed:", err=True)
        for source, reason in failures:
            click.echo(f"  {source}: {reason}", err=True)
        click.get_current_context().exit(1)


def _explain_config(
    checkpoint: str | None, num_regions: int | None, mask_mode: str | None
) -> HDMConfig:
    if checkpoint is None:
        overrides = {"num_regions": num_regions, "dcp_mask_mode": mask_mode}
        return HDMConfig(**{key: value for key, value in overrides.items() if value is not None})
    from hdm_platform.model_refs import load_model

    for option, value in (("--num-regions", num_regions), ("--mask-mode", mask_mode)):
        if value is not None:
            raise click.UsageError(f"{option} comes from the checkpoint; do not pass both")
    try:
        config = load_model(checkpoint).config
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot read checkpoint {checkpoint}: {error}") from error
    if config.mask_source != "dcp":
        raise click.ClickException(
            f"checkpoint {checkpoint} uses mask_source={config.mask_source!r}; "
            "'hdm explain' shows dark-channel-prior masks"
        )
    return config


@click.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Figure file (.png; .jpg and .webp also work).",
)
@click.option(
    "--checkpoint",
    help="Take the number of regions, the mask mode and the DCP settings from this model: "
    "a checkpoint folder (path or URI) or models:/NAME@ALIAS.",
)
@click.option("--num-regions", type=click.IntRange(min=2), help="Default: 5 (the paper).")
@click.option(
    "--mask-mode",
    type=click.Choice(DCP_MASK_MODES),
    help="Bin the refined transmission (released code, default) or the dark channel (paper text).",
)
def explain(
    image_path: Path,
    output: Path,
    checkpoint: str | None,
    num_regions: int | None,
    mask_mode: str | None,
) -> None:
    """Draw IMAGE's dark channel, transmission and DCP region masks (paper Figure 1)."""
    from torchvision.transforms.functional import pil_to_tensor

    from hdm_platform.explain import explain_figure
    from hdm_platform.imageio import ImageError, read_image, write_image

    config = _explain_config(checkpoint, num_regions, mask_mode)
    try:
        image = read_image(image_path)
    except ImageError as error:
        raise click.ClickException(str(error)) from error
    figure = explain_figure(image, config)
    try:
        write_image(pil_to_tensor(figure).float() / 255.0, output)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot write {output}: {error}") from error
    click.echo(
        f"wrote {output}: input, dark channel, transmission and {config.num_regions} regions "
        f"({config.dcp_mask_mode})"
    )
