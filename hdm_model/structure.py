"""Structure-level dynamics (paper section 3.2, Eq. 5): a modulated deformable convolution.

DCNv2 as in the released code: a plain 3x3 conv predicts, per output pixel, 2x9 sampling
offsets and 9 modulation scalars (sigmoid) for the 3x3 deformable conv. torchvision's
``deform_conv2d`` replaces the code's compiled CUDA extension and runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

__all__ = ["DeformableBlock"]

_KERNEL_SIZE = 3


class DeformableBlock(nn.Module):
    """Modulated 3x3 deformable conv C->C with its offset-and-modulation predictor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = _KERNEL_SIZE * _KERNEL_SIZE
        self.offset_conv = nn.Conv2d(channels, 3 * taps, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2)
        self.deform_conv = DeformConv2d(channels, channels, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2)
        # DCNv2 starts as a plain conv: zero offsets, every tap modulated by sigmoid(0).
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset_and_modulation = self.offset_conv(x)
        taps = _KERNEL_SIZE * _KERNEL_SIZE
        offset, modulation = offset_and_modulation.split((2 * taps, taps), dim=1)
        # torchvision has no bfloat16 CPU kernel for deform_conv2d (and float32 keeps the
        # bilinear sampling exact), so it runs in float32 even inside an autocast region.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.deform_conv(
                x.float().contiguous(),
                offset.float().contiguous(),
                mask=torch.sigmoid(modulation.float()).contiguous(),
            )
