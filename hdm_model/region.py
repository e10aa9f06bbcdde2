"""Region-level dynamics (paper section 3.3, Eq. 6): per-region, per-image 3x3 filters.

A filter generation network makes, for every image, N sets of 3x3 kernels C->C from its own
features (DRConv): adaptive average pool to 3x3, 1x1 conv C->N*N, sigmoid, grouped 1x1 conv
N*N->N*C*C. All N filters run over the whole feature map as one grouped convolution over
the batch, and one-hot region masks pick, per pixel, the response of its region's filter.
Masks come from the dark channel prior (HDM), from a guide map, or are learned from the
features by a 3x3 guide conv as in DRConv (HDM-F).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FilterGenerator", "RegionDynamicBlock", "learned_region_masks"]

_KERNEL_SIZE = 3


class FilterGenerator(nn.Module):
    """Per-image kernels ``[B, N, C, C, 3, 3]`` from features ``[B, C, h, w]``."""

    def __init__(self, channels: int, num_regions: int) -> None:
        super().__init__()
        self.channels = channels
        self.num_regions = num_regions
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(_KERNEL_SIZE),
            nn.Conv2d(channels, num_regions * num_regions, 1),
            nn.Sigmoid(),
            nn.Conv2d(
                num_regions * num_regions,
                num_regions * channels * channels,
                1,
                groups=num_regions,
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        kernels = self.body(x)
        return kernels.view(
            x.shape[0], self.num_regions, self.channels, self.channels, _KERNEL_SIZE, _KERNEL_SIZE
        )


def learned_region_masks(guide_logits: Tensor) -> Tensor:
    """One-hot argmax masks ``[B, N, 1, h, w]`` with DRConv's softmax gradient.

    The forward value is the hard one-hot; the backward pass goes through the softmax
    (a straight-through estimator), which is what DRConv's hand-written backward computes.
    """
    soft = guide_logits.softmax(dim=1)
    hard = F.one_hot(guide_logits.argmax(dim=1), guide_logits.shape[1])
    hard = hard.permute(0, 3, 1, 2).to(soft.dtype)
    return (hard - soft.detach() + soft).unsqueeze(2)


class RegionDynamicBlock(nn.Module):
    """``sum_i mask_i * conv(x, W_i(x))`` over N regions (Eq. 6).

    With ``learn_masks`` a 3x3 guide conv C->N predicts the masks from ``x`` (HDM-F);
    otherwise the caller passes one-hot masks ``[B, N, 1, h, w]``.
    """

    def __init__(self, channels: int, num_regions: int, *, learn_masks: bool = False) -> None:
        super().__init__()
        self.num_regions = num_regions
        self.filter_generator = FilterGenerator(channels, num_regions)
        self.guide_conv = (
            nn.Conv2d(channels, num_regions, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2)
            if learn_masks
            else None
        )

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        if self.guide_conv is not None:
            masks = learned_region_masks(self.guide_conv(x))
        elif masks is None:
            raise ValueError("RegionDynamicBlock needs region masks [B, N, 1, h, w]")
        batch, channels, height, width = x.shape
        if masks.shape != (batch, self.num_regions, 1, height, width):
            raise ValueError(
                f"region masks must be shaped {[batch, self.num_regions, 1, height, width]} "
                f"for features {list(x.shape)}, got {list(masks.shape)}"
            )
        kernels = self.filter_generator(x)
        # One grouped conv per region over the batch: image b's channels only meet image
        # b's kernels. Per-region convs of C outputs each, accumulated under their masks, are
        # 2.5x faster on CPU than one conv of N*C outputs followed by a strided N-way sum.
        grouped_input = x.reshape(1, batch * channels, height, width)
        out = x.new_zeros(())
        for region in range(self.num_regions):
            response = F.conv2d(
                grouped_input,
                kernels[:, region].reshape(batch * channels, channels, _KERNEL_SIZE, _KERNEL_SIZE),
                padding=_KERNEL_SIZE // 2,
                groups=batch,
            ).view(batch, channels, height, width)
            out = out + response * masks[:, region].to(response.dtype)
        return out
