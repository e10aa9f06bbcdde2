"""Fast and memory-bounded HDM inference.

The fast path runs under ``torch.inference_mode`` in channels_last layout, optionally under
bfloat16 autocast (the deformable conv stays in float32, see ``hdm_model.structure``). The
tiled path bounds memory on large photos: overlapping tiles are blended with linear ramps,
and the DCP region masks are computed once on the whole image and cropped per tile, so every
tile sees the same airlight and the same normalisation range.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from hdm_model.hdm import FEATURE_STRIDE, HDM, pad_to_multiple

__all__ = ["DEFAULT_TILE", "enhance", "prepare_for_inference"]

DEFAULT_TILE = 512
"""Tile side that keeps a 12-megapixel photo well under 3 GiB on CPU (bench/memory.py)."""

Precision = Literal["fp32", "bf16"]


def prepare_for_inference(model: HDM, *, device: str | torch.device) -> HDM:
    """``model`` in eval mode, channels_last, on ``device``."""
    return model.to(device=device, memory_format=torch.channels_last).eval()


@torch.inference_mode()
def enhance(
    model: HDM,
    images: Tensor,
    *,
    precision: Precision = "fp32",
    tile: int | None = None,
    tile_overlap: int = 32,
    guide: Tensor | None = None,
) -> Tensor:
    """Enhance ``images`` ``[B, 3, H, W]`` in [0, 1]; returns float32 in [0, 1] on the model's device.

    ``tile`` (a multiple of 4) bounds memory by running ``tile x tile`` crops that overlap by
    ``tile_overlap`` pixels (a multiple of 4). ``guide`` is the ``[B, 1, H, W]`` map of a
    model whose ``mask_source`` is "external".
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float batch [B, C, H, W] in [0, 1], got {images.dtype} {list(images.shape)}"
        )
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    if guide is not None:
        guide = guide.to(device=device, dtype=torch.float32)
    if tile is None:
        return _forward(model, images, precision=precision, masks=None, guide=guide)
    _check_tiling(tile, tile_overlap)
    return _enhance_tiled(
        model, images, precision=precision, tile=tile, overlap=tile_overlap, guide=guide
    )


def _forward(
    model: HDM, images: Tensor, *, precision: Precision, masks: Tensor | None, guide: Tensor | None
) -> Tensor:
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        device_type=images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
    ):
        out = model(images, masks=masks, guide=guide)
    return out.float().clamp(0.0, 1.0)


def _check_tiling(tile: int, overlap: int) -> None:
    if tile <= 0 or tile % FEATURE_STRIDE:
        raise ValueError(f"tile must be a positive multiple of {FEATURE_STRIDE}, got {tile}")
    if overlap < 0 or overlap % FEATURE_STRIDE or overlap >= tile:
        raise ValueError(
            f"tile_overlap must be a multiple of {FEATURE_STRIDE} in [0, tile={tile}), got {overlap}"
        )


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, overlap: int, *, device: torch.device) -> Tensor:
    """1 in the middle, rising linearly over ``overlap`` pixels at both ends, never 0."""
    if overlap == 0:
        return torch.ones(length, device=device)
    position = torch.arange(length, device=device, dtype=torch.float32)
    distance_to_edge = torch.minimum(position + 1, length - position)
    return (distance_to_edge / (overlap + 1)).clamp(max=1.0)


def _enhance_tiled(
    model: HDM,
    images: Tensor,
    *,
    precision: Precision,
    tile: int,
    overlap: int,
    guide: Tensor | None,
) -> Tensor:
    height, width = images.shape[-2:]
    # Whole-image statistics (airlight, min-max range) for all tiles alike.
    masks = model.region_masks(images, guide=guide) if model.needs_image_masks else None
    padded = pad_to_multiple(images)
    padded_height, padded_width = padded.shape[-2:]
    tile_height, tile_width = min(tile, padded_height), min(tile, padded_width)
    window = _ramp(tile_height, overlap, device=images.device)[:, None] * _ramp(
        tile_width, overlap, device=images.device
    )
    blended = torch.zeros(
        images.shape[0], model.config.in_channels, padded_height, padded_width, device=images.device
    )
    weight = torch.zeros(padded_height, padded_width, device=images.device)
    stride = tile - overlap
    for top in _tile_starts(padded_height, tile_height, stride):
        for left in _tile_starts(padded_width, tile_width, stride):
            rows = slice(top, top + tile_height)
            cols = slice(left, left + tile_width)
            tile_masks = None
            if masks is not None:
                tile_masks = masks[
                    ...,
                    top // FEATURE_STRIDE : (top + tile_height) // FEATURE_STRIDE,
                    left // FEATURE_STRIDE : (left + tile_width) // FEATURE_STRIDE,
                ]
            out = _forward(model, padded[..., rows, cols], precision=precision, masks=tile_masks, guide=None)
            blended[..., rows, cols] += out * window
            weight[rows, cols] += window
    # In place: on a 12-megapixel photo every full-size copy costs 144 MB.
    return blended.div_(weight)[..., :height, :width].clamp_(0.0, 1.0)
