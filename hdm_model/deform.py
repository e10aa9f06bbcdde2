"""The modulated 3x3 deformable convolution of the structure level (DCNv2, paper section 3.2).

Two implementations of one function, ``torchvision.ops.deform_conv2d(x, offset, weight,
bias, padding=1, mask=mask)`` for a 3x3 kernel, stride 1, dilation 1, one offset group:

* ``"torchvision"``: the library's op, the reference. Its CPU kernel is a scalar im2col
  loop in float32 or float64 only (no bfloat16, no channels_last), and its backward
  recomputes the columns per input.
* ``"gather"``: ours. Every output pixel's nine taps sample four neighbours each; those
  are rows of the channels_last feature map, so the whole sampling is one
  ``F.embedding_bag`` (gather four rows, weighted sum) whose per-sample weights are the
  bilinear weights times the modulation, followed by one matrix product with the kernel.
  The sampled columns are built a few hundred pixels at a time, so they stay in cache
  between the gather and the product. Autograd differentiates it exactly as torchvision's
  hand-written backward does (corners outside the image are zeros; the slope at integer
  positions is the one towards the next pixel).

Which one runs is chosen per device type from measurements (``IMPLEMENTATION_BY_DEVICE``);
``implementation=`` overrides it.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d

__all__ = [
    "IMPLEMENTATION_BY_DEVICE",
    "Implementation",
    "gather_deform_conv3x3",
    "implementation_for",
    "modulated_deform_conv3x3",
]

Implementation = Literal["torchvision", "gather"]

IMPLEMENTATION_BY_DEVICE: dict[str, Implementation] = {
    # 2-core AMD EPYC VM (AVX2), torch 2.14.1, 2 threads (bench/deform.py): forward at
    # 64 channels x 128x128 (a 512x512 image) 7.0x torchvision's (30.5 vs 213.5 ms),
    # forward + backward on 8 x 64 x 64 x 64 7.2x (396 vs 2843 ms); bench/RESULTS.md,
    # "Session 8: the gather deformable conv".
    "cpu": "gather",
}
"""The faster implementation per ``torch.device.type``, as measured; devices not listed
(CUDA: torchvision's native kernel, not measured here) run the reference."""

_KERNEL = 3
_TAPS = _KERNEL * _KERNEL
_CORNERS = 4
_PAD = 2
_COLUMN_BYTES_PER_CHUNK = 1 << 20
"""Sampled columns built per step: about 1 MiB (455 pixels at 64 float32 channels) stays in
a core's L2 cache from the gather to the matrix product; 1.6x faster than one pass."""


def implementation_for(device: torch.device | str) -> Implementation:
    """The implementation ``modulated_deform_conv3x3`` runs on ``device`` by default."""
    return IMPLEMENTATION_BY_DEVICE.get(torch.device(device).type, "torchvision")


def modulated_deform_conv3x3(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    implementation: Implementation | None = None,
) -> Tensor:
    """DCNv2 with a 3x3 kernel, "same" padding, stride 1: ``x`` ``[B, C, H, W]``,
    ``offset`` ``[B, 18, H, W]`` ((dy, dx) per tap, taps in row-major order), ``mask``
    ``[B, 9, H, W]``, ``weight`` ``[C_out, C, 3, 3]``, ``bias`` ``[C_out]``.

    ``implementation`` defaults to ``implementation_for(x.device)``.
    """
    _check_shapes(x, offset, mask, weight, bias)
    chosen = implementation or implementation_for(x.device)
    if chosen == "gather":
        return gather_deform_conv3x3(x, offset, mask, weight, bias)
    if chosen == "torchvision":
        return deform_conv2d(
            x.contiguous(), offset.contiguous(), weight, bias, padding=1, mask=mask.contiguous()
        )
    raise ValueError(
        f"implementation must be one of {', '.join(get_args(Implementation))}, got {chosen!r}"
    )


def _check_shapes(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {list(x.shape)}")
    batch, channels, height, width = x.shape
    expected = {
        "offset": (offset, [batch, 2 * _TAPS, height, width]),
        "mask": (mask, [batch, _TAPS, height, width]),
        "weight": (weight, [weight.shape[0], channels, _KERNEL, _KERNEL]),
    }
    if bias is not None:
        expected["bias"] = (bias, [weight.shape[0]])
    for name, (tensor, shape) in expected.items():
        if list(tensor.shape) != shape:
            raise ValueError(
                f"{name} must be shaped {shape} for x {list(x.shape)}, got {list(tensor.shape)}"
            )


def gather_deform_conv3x3(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``modulated_deform_conv3x3`` as gathers of channels_last rows and one matrix
    product (see the module docstring); returns channels_last ``[B, C_out, H, W]``."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    corners, corner_weights = _bilinear_taps(offset, mask, height, width)
    table = F.pad(x, (_PAD,) * 4).permute(0, 2, 3, 1).reshape(-1, channels)
    corner_weights = corner_weights.to(x.dtype)
    # Columns in (tap, channel) order per pixel: the kernel as [9 * C, C_out] to match.
    kernel = weight.to(x.dtype).permute(2, 3, 1, 0).reshape(_TAPS * channels, out_channels)
    bias = bias.to(x.dtype) if bias is not None else None
    pixels = batch * height * width
    step = max(1, _COLUMN_BYTES_PER_CHUNK // (_TAPS * channels * x.element_size()))
    chunks = []
    for start in range(0, pixels, step):
        rows = slice(start * _TAPS, min(pixels, start + step) * _TAPS)
        columns = F.embedding_bag(
            corners[rows], table, per_sample_weights=corner_weights[rows], mode="sum"
        ).view(-1, _TAPS * channels)
        chunks.append(columns @ kernel if bias is None else torch.addmm(bias, columns, kernel))
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    # [B * H * W, C_out] is channels_last memory of [B, C_out, H, W].
    return out.view(batch, height, width, out_channels).permute(0, 3, 1, 2)


def _bilinear_taps(offset: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rows of the padded table and their weights: ``[B * H * W * 9, 4]`` each, in
    (batch, row, column, tap) order; the weights are bilinear times the modulation."""
    batch = offset.shape[0]
    device = offset.device
    # Float32 positions whatever the features' dtype: bfloat16 cannot address 128 pixels.
    position_dtype = torch.promote_types(offset.dtype, torch.float32)
    shifts = offset.to(position_dtype).permute(0, 2, 3, 1).reshape(batch, height, width, _TAPS, 2)
    tap = torch.arange(_TAPS, device=device)
    rows = torch.arange(height, device=device).view(height, 1, 1) + (tap // _KERNEL - 1)
    cols = torch.arange(width, device=device).view(1, width, 1) + (tap % _KERNEL - 1)
    # Two zero rows and columns around the image stand for every sample outside it, down
    # to the one-sided slope at exactly one pixel out (torchvision's); positions further
    # out are clamped to two pixels out, where all four corners are zeros.
    y = (shifts[..., 0] + rows).clamp(-_PAD, height)
    x = (shifts[..., 1] + cols).clamp(-_PAD, width)
    top, left = y.floor(), x.floor()
    # floor has no gradient: the slope flows through the fractions, towards the next pixel.
    down, right = y - top, x - left
    modulation = mask.to(position_dtype).permute(0, 2, 3, 1)
    lower = down * modulation
    upper = modulation - lower
    corner_weights = torch.stack(
        (upper - upper * right, upper * right, lower - lower * right, lower * right), dim=-1
    )
    padded_width = width + 2 * _PAD
    image_rows = (height + 2 * _PAD) * padded_width
    first = (
        (top.long() + _PAD) * padded_width
        + (left.long() + _PAD)
        + torch.arange(batch, device=device).view(batch, 1, 1, 1) * image_rows
    )
    corners = first.unsqueeze(-1) + torch.tensor(
        [0, 1, padded_width, padded_width + 1], device=device
    )
    return corners.reshape(-1, _CORNERS), corner_weights.reshape(-1, _CORNERS)
