"""Structure-level dynamics (paper section 3.2, Eq. 5): a modulated deformable convolution.

DCNv2 as in the released code: a plain 3x3 conv predicts, per output pixel, 2x9 sampling
offsets and 9 modulation scalars (sigmoid) for the 3x3 deformable conv. The parameters are
those of torchvision's ``DeformConv2d``; the convolution is ``hdm_model.deform``'s, which runs
torchvision's ``deform_conv2d`` (in place of the code's compiled CUDA extension) or, where
measured faster (CPU), an equal gather-and-matmul version.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from hdm_model.deform import Implementation, modulated_deform_conv3x3

__all__ = ["DeformableBlock"]

_KERNEL_SIZE = 3


class DeformableBlock(nn.Module):
    """Modulated 3x3 deformable conv C->C with its offset-and-modulation predictor.

    ``implementation`` picks ``hdm_model.deform``'s kernel; None: the device's measured choice.
    """

    def __init__(self, channels: int, *, implementation: Implementation | None = None) -> None:
        super().__init__()
        self.implementation = implementation
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
            return modulated_deform_conv3x3(
                x.float(),
                offset.float(),
                torch.sigmoid(modulation.float()),
                self.deform_conv.weight.float(),
                self.deform_conv.bias.float() if self.deform_conv.bias is not None else None,
                implementation=self.implementation,
            )
