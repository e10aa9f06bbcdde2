"""``hdm enhance`` (run a checkpoint, or the classic DCP dehazer, over image files) and
``hdm explain`` (the DCP priors and region masks of one image, as in the paper's Figure 1)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hdm_model.config import (
    DCP_MASK_MODES,
    DEFAULT_TILE,
    DEFAULT_TILE_OVERLAP,
    FEATURE_STRIDE,
    UNTILED_MAX_PIXELS,
    HDMConfig,
)

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


def _model_references(checkpoints: tuple[str, ...], tasks: str | None) -> list[str]:
    """The models to apply, in order: one per ``--tasks`` entry (its ``--checkpoint TASK=REF``,
    else the task's registered champion), or the ``--checkpoint`` references as given."""
    from hdm_platform.vocabulary import TASKS, registered_model_name

    if not tasks:
        if not checkpoints:
            raise click.UsageError("give --checkpoint REF (or --tasks)")
        return list(checkpoints)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if unknown := sorted(set(names) - set(TASKS)):
        raise click.BadParameter(
            f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}", param_hint="--tasks"
        )
    per_task: dict[str, str] = {}
    for checkpoint in checkpoints:
        task, separator, reference = checkpoint.partition("=")
        if not separator or task not in names:
            raise click.BadParameter(
                f"{checkpoint!r}: with --tasks, give each model as TASK=REF for one of {', '.join(names)}",
                param_hint="--checkpoint",
            )
        per_task[task] = reference
    return [per_task.get(name, f"models:/{registered_model_name(name)}@champion") for name in names]


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://").removeprefix("local://"))


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="SRC...")
@click.option(
    "-o",
    "--output",
    "output_dir",
    required=True,
    metavar="DEST",
    help="Folder or prefix for the results (any fsspec URI; created if missing); each input "
    "keeps its path relative to its SRC and its stem.",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    metavar="[TASK=]REF",
    help="A checkpoint folder (path or URI), models:/NAME@ALIAS from the MLflow registry, "
    "'dcp' for the classic dark-channel-prior dehazer, 'input' or a served endpoint. Repeat "
    "it to apply several models in turn; with --tasks, TASK=REF picks each task's model.",
)
@click.option(
    "--tasks",
    metavar="TASK,...",
    help="Apply these tasks' models in turn (e.g. derain,dehaze: the paper's recipe for real "
    "rainy photos); a task without --checkpoint TASK=REF uses models:/hdm-TASK@champion.",
)
@click.option(
    "--tile",
    type=click.IntRange(min=0),
    callback=_check_multiple_of_stride,
    help=f"Tile side (multiple of 4) to bound memory; 0 never tiles. Default: the model's own "
    f"inference_tile if it has one, else whole images up to {UNTILED_MAX_PIXELS} pixels and "
    f"{DEFAULT_TILE}-pixel tiles above. Ignored by 'dcp'.",
)
@click.option(
    "--tile-overlap",
    type=click.IntRange(min=0),
    default=None,
    callback=_check_multiple_of_stride,
    help="Pixels shared by neighbouring tiles, blended to hide seams (multiple of 4). Default: "
    f"the model's own inference_tile_overlap for its own tile, else {DEFAULT_TILE_OVERLAP}.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on GPUs with bf16 and CPUs with AMX or AMD AVX512_BF16, where it is faster; fp32 "
    "elsewhere. Ignored by 'dcp'.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    help="Default: cuda when available, else cpu (on Ray: GPUs when the cluster has them).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(sorted(_OUTPUT_SUFFIXES)),
    default="png",
    show_default=True,
)
@click.option(
    "--ray",
    "on_ray",
    is_flag=True,
    help="Run on Ray Data (the default for remote SRC/DEST, --split or a set RAY_ADDRESS).",
)
@click.option("--split", help="Each SRC is a dataset (hdm data); enhance this split's inputs (on Ray).")
@click.option("--overwrite", is_flag=True, help="On Ray: redo inputs whose output exists (default: skip them).")
@click.option(
    "--max-pixels", type=click.IntRange(min=1), help="On Ray: refuse larger inputs (default: PIL's limit)."
)
@click.option("--actors", type=click.IntRange(min=1), help="On Ray: model replicas [default: from the cluster].")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="On Ray: images per model call (same-size images stacked) [default: 1 on CPU, 8 on GPU].",
)
def enhance(
    inputs: tuple[str, ...],
    output_dir: str,
    checkpoints: tuple[str, ...],
    tasks: str | None,
    tile: int | None,
    tile_overlap: int | None,
    precision: str,
    device: str | None,
    output_format: str,
    on_ray: bool,
    split: str | None,
    overwrite: bool,
    max_pixels: int | None,
    actors: int | None,
    batch_size: int | None,
) -> None:
    """Enhance image files, folders, bucket prefixes or dataset splits with HDM models or DCP.

    Local files run in this process; remote SRC/DEST (s3://, gs://, ...), --ray, --split or
    RAY_ADDRESS run on Ray Data, resumably. An input that cannot be read or enhanced is
    reported and skipped; the exit status is 1 when any failed.
    """
    from hdm_platform.data.storage import is_remote

    if tile and tile_overlap is not None and tile <= tile_overlap:
        raise click.BadParameter(
            f"--tile {tile} must exceed --tile-overlap {tile_overlap}", param_hint="--tile"
        )
    references = _model_references(checkpoints, tasks)
    if on_ray or split or os.environ.get("RAY_ADDRESS") or any(map(is_remote, (*inputs, output_dir))):
        _enhance_on_ray(
            inputs, output_dir, references, suffix=_OUTPUT_SUFFIXES[output_format], split=split,
            overwrite=overwrite, precision=precision, tile=tile, tile_overlap=tile_overlap, device=device,
            max_pixels=max_pixels, actors=actors, batch_size=batch_size,
        )  # fmt: skip
        return
    _enhance_locally(inputs, output_dir, references, tile=tile, tile_overlap=tile_overlap,
                     precision=precision, device=device, output_format=output_format)  # fmt: skip


def _enhance_locally(
    inputs: tuple[str, ...], output_dir: str, references: list[str], *, tile: int | None, tile_overlap: int | None,
    precision: str, device: str | None, output_format: str,
) -> None:  # fmt: skip
    """The one-process loop: each file read, enhanced by every model in turn, and written."""
    from tqdm import tqdm

    from hdm_platform.imageio import read_image, write_image
    from hdm_platform.model_refs import load_enhancer

    for given in inputs:
        if not _local_path(given).exists():
            raise click.BadParameter(f"{given!r} does not exist", param_hint="SRC")
    files = collect_inputs(tuple(map(_local_path, inputs)))
    if not files:
        raise click.UsageError("no image files found in the given inputs")
    output = _local_path(output_dir)
    try:
        models = [
            load_enhancer(
                reference,
                device=_resolve_device(device),
                precision=precision,
                tile=tile,
                tile_overlap=tile_overlap,
            )
            for reference in references
        ]
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load {', '.join(references)}: {error}") from error
    output.mkdir(parents=True, exist_ok=True)
    claimed: dict[Path, Path] = {}
    failures: list[tuple[Path, str]] = []
    started = time.perf_counter()
    for source in tqdm(files, desc="enhance", unit="image", file=sys.stderr):
        target = _output_path(source, output, output_format)
        try:
            if target.resolve() == source.resolve():
                raise ValueError(f"the output {target} would overwrite the input")
            if target in claimed:
                raise ValueError(f"the output {target} is already written for {claimed[target]}")
            result = read_image(source).unsqueeze(0)
            for model in models:
                result = model(result)
            write_image(result[0], target, format=output_format)
            claimed[target] = source
        # ImageError is a ValueError; RuntimeError covers device failures such as running
        # out of memory; none of them should stop the rest of the batch.
        except (ValueError, RuntimeError, OSError) as error:
            failures.append((source, str(error)))
            tqdm.write(f"FAILED {source}: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    done = len(files) - len(failures)
    click.echo(f"enhanced {done} of {len(files)} images into {output} in {elapsed:.1f} s")
    if failures:
        click.echo(f"{len(failures)} failed:", err=True)
        for source, reason in failures:
            click.echo(f"  {source}: {reason}", err=True)
        click.get_current_context().exit(1)


def _enhance_on_ray(inputs: tuple[str, ...], output_dir: str, references: list[str], **settings: Any) -> None:
    """The batch path (hdm_platform.batch_enhance): check the models here, then run the job."""
    from hdm_platform import batch_enhance
    from hdm_platform.model_refs import load_enhancer

    try:
        references = [batch_enhance.pin_reference(reference) for reference in references]
        for reference in references:  # fail now, not in every actor
            load_enhancer(reference, tile_overlap=settings["tile_overlap"])
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load {', '.join(references)}: {error}") from error
    click.echo(f"models, in order: {', '.join(references)}", err=True)
    batch_enhance.connect_ray()
    try:
        summary = batch_enhance.enhance_on_ray(inputs, output_dir, references, **settings)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(summary.line(output_dir))
    if summary.failures:
        listed = f"{output_dir.rstrip('/')}/{batch_enhance.FAILURES_NAME}"
        click.echo(f"{len(summary.failures)} failed (listed in {listed}):", err=True)
        for failure in summary.failures:
            click.echo(f"  {failure.source}: {failure.reason}", err=True)
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
