"""Region-level dynamics (paper section 3.3, Eq. 6): per-region, per-image 3x3 filters.

A filter generation network makes, for every image, N sets of 3x3 kernels C->C from its own
features (DRConv): adaptive average pool to 3x3, 1x1 conv C->N*N, sigmoid, grouped 1x1 conv
N*N->N*C*C. All N filters run over the whole feature map as one grouped convolution over
the batch, and one-hot region masks pick, per pixel, the response of its region's filter.
Without gradients and with one-hot masks, each pixel runs only its own region's filter
(``region_filters_by_pixel``): one filter's work instead of N. Masks come from the dark
channel prior (HDM), from a guide map, or are learned from the features by a 3x3 guide conv
as in DRConv (HDM-F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FilterGenerator",
    "RegionDynamicBlock",
    "learned_region_masks",
    "region_filters_by_pixel",
]

_KERNEL_SIZE = 3
_TAPS = _KERNEL_SIZE * _KERNEL_SIZE
_COLUMN_BYTES_PER_CHUNK = 1 << 20
"""Columns gathered per step, as in ``hdm_model.deform``: they stay in cache until multiplied."""


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
        if not torch.is_grad_enabled() and _is_one_hot(masks):
            return region_filters_by_pixel(x, masks.argmax(dim=1).squeeze(1), kernels)
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


def _is_one_hot(masks: Tensor) -> bool:
    return bool(((masks == 0) | (masks == 1)).all() and (masks.sum(dim=1) == 1).all())


def region_filters_by_pixel(x: Tensor, regions: Tensor, kernels: Tensor) -> Tensor:
    """``conv(x[b], kernels[b, regions[b, p]])`` at every pixel ``p``: each pixel's 3x3
    window (zero padded) times its region's kernel, gathered region by region.

    ``x`` ``[B, C, h, w]``, ``regions`` ``[B, h, w]`` integer, ``kernels``
    ``[B, N, C, C, 3, 3]``. Equal to the masked sum of all N responses for one-hot masks, at
    1/N of the work; returns channels_last ``[B, C, h, w]``.
    """
    batch, channels, height, width = x.shape
    device_type = x.device.type
    # Under autocast the products run in its dtype, as the convolutions they replace would.
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    x, kernels = x.to(dtype), kernels.to(dtype)
    padded_width = width + 2
    # Rows of the zero-padded channels_last map: pixel (i, j) tap (di, dj) is row
    # (i + di) * (w + 2) + (j + dj).
    table = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(batch, -1, channels)
    tap = torch.arange(_TAPS, device=x.device)
    tap_rows = (tap // _KERNEL_SIZE) * padded_width + tap % _KERNEL_SIZE
    pixel = torch.arange(height * width, device=x.device)
    window_rows = ((pixel // width) * padded_width + pixel % width).unsqueeze(1) + tap_rows
    # [B, N, C_out, C_in, 3, 3] -> [B, N, 9 * C_in, C_out], columns in (tap, channel) order.
    matrices = kernels.permute(0, 1, 4, 5, 3, 2).reshape(
        batch, kernels.shape[1], _TAPS * channels, channels
    )
    step = max(1, _COLUMN_BYTES_PER_CHUNK // (_TAPS * channels * x.element_size()))
    out = x.new_empty(batch, height * width, channels)
    with torch.autocast(device_type=device_type, enabled=False):
        _gather_by_region(table, window_rows, regions, matrices, out, step)
    return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


def _gather_by_region(
    table: Tensor, window_rows: Tensor, regions: Tensor, matrices: Tensor, out: Tensor, step: int
) -> None:
    """``out[b, p] = table[b, window_rows[p]] @ matrices[b, regions[b, p]]``, ``step`` pixels
    at a time."""
    batch, num_regions, columns_per_pixel, _ = matrices.shape
    for image in range(batch):
        flat_regions = regions[image].reshape(-1)
        order = torch.argsort(flat_regions, stable=True)
        counts = torch.bincount(flat_regions, minlength=num_regions).tolist()
        for region, pixels in enumerate(order.split(counts)):
            for chunk in pixels.split(step):
                columns = table[image].index_select(0, window_rows[chunk].view(-1))
                out[image].index_copy_(
                    0, chunk, columns.view(-1, columns_per_pixel) @ matrices[image, region]
                )
