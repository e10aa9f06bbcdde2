"""Several models on one split, side by side: a PSNR/SSIM table and a before/after picture.

``hdm compare`` (and the quickstart's last step) measures each model with
:func:`hdm_platform.evaluate.evaluate` (any reference :mod:`hdm_platform.model_refs`
resolves: a served endpoint, a registered model, a checkpoint, ``dcp``, ``input``) and says
by how much the first model beats each of the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image

from hdm_platform.model_refs import load_enhancer
from hdm_platform.evaluate import EvaluationResult, evaluate, iter_split_pairs

__all__ = ["comparison_picture", "comparison_table", "compare_models", "margins"]

_LABEL_HEIGHT = 16
_MARGIN = 4


def compare_models(
    models: Mapping[str, str], data: str, *, split: str = "test", tracking_uri: str | None = None
) -> dict[str, EvaluationResult]:
    """Each labelled model reference evaluated on every pair of ``split``."""
    return {
        label: evaluate(reference, data, split=split, tracking_uri=tracking_uri)
        for label, reference in models.items()
    }


def margins(results: Mapping[str, EvaluationResult]) -> dict[str, float]:
    """PSNR of the first model minus that of each other one (positive: the first is better)."""
    first, *others = results
    return {label: results[first].means["psnr"] - results[label].means["psnr"] for label in others}


def comparison_table(results: Mapping[str, EvaluationResult]) -> str:
    """A Markdown table: one row per model, mean PSNR/SSIM on RGB and on Y."""
    any_result = next(iter(results.values()))
    lines = [
        f"{any_result.split} split of {any_result.data}, {len(any_result.rows)} images:",
        "",
        "| model | PSNR | SSIM | PSNR (Y) | SSIM (Y) |",
        "|---|---|---|---|---|",
    ]
    for label, result in results.items():
        means = result.means
        lines.append(
            f"| {label} | {means['psnr']:.2f} | {means['ssim']:.4f} | "
            f"{means['psnr_y']:.2f} | {means['ssim_y']:.4f} |"
        )
    return "\n".join(lines)


def comparison_picture(
    models: Mapping[str, str],
    data: str,
    *,
    split: str = "test",
    images: int = 4,
    tracking_uri: str | None = None,
) -> Image.Image:
    """The first ``images`` pairs of ``split``, one row each: input, every model, target.

    An ``input`` model is left out: the first column already shows the input.
    """
    enhancers = {
        label: load_enhancer(reference, tracking_uri=tracking_uri)
        for label, reference in models.items()
        if reference != "input"
    }
    rows = []
    for _, source, target in itertools.islice(iter_split_pairs(data, split), images):
        degraded = torch.from_numpy(source.copy()).permute(2, 0, 1).float().div(255)
        outputs = [enhancer(degraded.unsqueeze(0))[0] for enhancer in enhancers.values()]
        rows.append([to_pil_image(source), *map(to_pil_image, outputs), to_pil_image(target)])
    if not rows:
        raise ValueError(f"split {split!r} of {data} has no pairs to show")
    labels = ["input", *enhancers, "target"]
    cell_width = max(image.width for row in rows for image in row)
    cell_height = max(image.height for row in rows for image in row)
    picture = Image.new(
        "RGB",
        (_MARGIN + len(labels) * (cell_width + _MARGIN), _LABEL_HEIGHT + _MARGIN + len(rows) * (cell_height + _MARGIN)),
        "white",
    )
    draw = ImageDraw.Draw(picture)
    for column, label in enumerate(labels):
        draw.text((_MARGIN + column * (cell_width + _MARGIN), 2), label, fill="black")
    for row_index, row in enumerate(rows):
        top = _LABEL_HEIGHT + _MARGIN + row_index * (cell_height + _MARGIN)
        for column, image in enumerate(row):
            picture.paste(image, (_MARGIN + column * (cell_width + _MARGIN), top))
    return picture
