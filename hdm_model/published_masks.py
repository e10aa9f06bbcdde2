"""The region masks of the authors' SOTS test script, exactly, in batched torch.

The published weights (``hdm_model.published``) were trained and scored with masks made by
``test_hdm_sots.py`` and its helpers (``dehaze.py``), which differ from this project's own
DCP masks (``hdm_model.masks``, mode "transmission") in every step. This module redoes
those steps bit for bit where they are integer arithmetic and in float64 elsewhere, on the
input's device (design note ``hdm-published-checkpoint.md``, "The region masks"):

1. the 8-bit image shrunk to ``(W // 4, H // 4)`` by Pillow's Lanczos filter, in Pillow's
   own fixed-point arithmetic (22-bit coefficients, horizontal pass first, each pass
   rounded to 8 bits); ``I = small / 255``;
2. one grey airlight ``a``: the channel minimum refined by a guided filter (guide: itself;
   input: its 223x223 erosion; 111x111 boxes, eps 1e-3), a 2000-bin histogram of it as
   ``numpy.histogram`` bins it, and the largest channel mean of ``I`` among the pixels at or
   above the left edge of the last bin whose cumulative fraction is at most 0.999;
3. ``t0 = 1 - 0.95 * erode15(min_c I / a)``;
4. ``t`` = guided filter of ``t0`` (60x60 boxes, eps 1e-4) guided by OpenCV's BGR->grey of
   the RGB array (so 0.114 R + 0.587 G + 0.299 B, in OpenCV's 15-bit fixed point) / 255;
5. ``t`` min-max normalised and cut at 0.8, 0.6, 0.4, 0.2 (``k / N`` for N regions).

Where the script's outcome is rounding noise (a map that is constant up to rounding, from
an erosion whose every window holds the same minimum, or a flat image), the map is taken
as exactly constant and the script's behaviour for that case applies; see
``_histogram_threshold`` and ``script_region_masks``.

"Box" means OpenCV's ``boxFilter``: a window of that side anchored at ``side // 2``,
borders mirrored without repeating the edge (BORDER_REFLECT_101); "erode" is OpenCV's
``erode``, a minimum over the window clipped to the image.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pillow_lanczos_downscale", "script_grey", "script_priors", "script_region_masks"]

_LANCZOS_SUPPORT = 3.0
#: Pillow's 8-bit resampling keeps coefficients in 32 - 8 - 2 fraction bits.
_PRECISION_BITS = 22
#: OpenCV's 8-bit RGB->grey weights (B, G, R order of its input) in 15-bit fixed point.
_GREY_WEIGHTS_BGR = (3735, 19235, 9798)
_GREY_SHIFT = 15

_AIRLIGHT_EROSION = 223
_AIRLIGHT_BOX = 111
_AIRLIGHT_EPS = 1e-3
_HISTOGRAM_BINS = 2000
_HISTOGRAM_CUT = 0.999
#: A range this small is rounding noise around a constant (see _histogram_threshold).
_FLAT_RANGE = 1e-9
_DARK_PATCH = 15
_OMEGA = 0.95
_TRANSMISSION_BOX = 60
_TRANSMISSION_EPS = 1e-4


def _lanczos(x: float) -> float:
    """Pillow's ``lanczos_filter``: a sinc windowed by a 3-lobe sinc."""

    def sinc(value: float) -> float:
        if value == 0.0:
            return 1.0
        value = value * math.pi
        return math.sin(value) / value

    return sinc(x) * sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


@functools.lru_cache(maxsize=64)
def _pillow_coefficients(in_size: int, out_size: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """First input index and fixed-point Lanczos weights of every output pixel, as Pillow's
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` make them (C doubles are Python
    floats, and both call the C library's ``sin``)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filter_scale
    inverse_scale = 1.0 / filter_scale
    starts, weights = [], []
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = [_lanczos((index - center + 0.5) * inverse_scale) for index in range(first, stop)]
        total = sum(taps)
        if total != 0.0:
            taps = [tap / total for tap in taps]
        starts.append(first)
        weights.append(
            tuple(int(tap * (1 << _PRECISION_BITS) + (0.5 if tap >= 0 else -0.5)) for tap in taps)
        )
    return tuple(starts), tuple(weights)


def _resample_last_dim(levels: Tensor, out_size: int) -> Tensor:
    """One Pillow pass along the last dimension of int32 8-bit ``levels`` (32-bit sums, as
    Pillow's, which its two spare bits keep from overflowing)."""
    starts, weights = _pillow_coefficients(levels.shape[-1], out_size)
    taps = max(map(len, weights))
    device = levels.device
    start = torch.tensor(starts, device=device)
    kernel = torch.zeros(out_size, taps, dtype=torch.int32)
    for row, row_weights in enumerate(weights):
        kernel[row, : len(row_weights)] = torch.tensor(row_weights, dtype=torch.int32)
    kernel = kernel.to(device)
    last = levels.shape[-1] - 1
    total = torch.full(
        (*levels.shape[:-1], out_size), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=device
    )
    for tap in range(taps):
        # Past a row's own taps the weight is 0, so any valid index will do.
        index = (start + tap).clamp(max=last)
        total += levels.index_select(-1, index) * kernel[:, tap]
    return torch.div(total, 1 << _PRECISION_BITS, rounding_mode="floor").clamp_(0, 255)


def pillow_lanczos_downscale(levels: Tensor, size: tuple[int, int]) -> Tensor:
    """``PIL.Image.resize((w, h), Image.LANCZOS)`` of 8-bit images ``[B, C, H, W]``.

    ``levels`` holds integers 0..255 (any integer or float dtype); the result is int32 with
    the very values Pillow returns: the horizontal pass first, then the vertical one, each
    rounded to 8 bits as Pillow's fixed-point code does. Horizontal first is the order of
    Pillow's ``ImagingResampleInner`` the authors ran; the Pillow 13 installed here picks
    the order per shape instead and so differs by a level on some shapes, none of them the
    shapes of the real samples (all bit-exact, ``tests/test_masks.py``).
    """
    height, width = size
    levels = levels.to(torch.int32)
    if width != levels.shape[-1]:
        levels = _resample_last_dim(levels, width)
    if height != levels.shape[-2]:
        levels = _resample_last_dim(levels.transpose(-1, -2), height).transpose(-1, -2)
    return levels.contiguous()


def script_grey(levels: Tensor) -> Tensor:
    """``cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY) / 255`` of integer RGB levels ``[B, 3, h, w]``.

    The script hands OpenCV an RGB array as if it were BGR, so red gets blue's weight.
    """
    red, green, blue = levels.unbind(dim=1)
    weight_red, weight_green, weight_blue = _GREY_WEIGHTS_BGR
    fixed = red * weight_red + green * weight_green + blue * weight_blue + (1 << (_GREY_SHIFT - 1))
    return (fixed >> _GREY_SHIFT).unsqueeze(1).double() / 255


def _reflect_101(length: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source index of every position of a line padded by OpenCV's BORDER_REFLECT_101."""
    position = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(position)
    period = 2 * (length - 1)
    position = position.remainder(period)
    return torch.where(position >= length, period - position, position)


def _box_mean(x: Tensor, side: int) -> Tensor:
    """``cv2.boxFilter(x, cv2.CV_64F, (side, side))`` of ``[B, 1, h, w]`` float64."""
    before = side // 2
    for dim in (-1, -2):
        length = x.shape[dim]
        padded = x.index_select(dim, _reflect_101(length, before, side - 1 - before, x.device))
        sums = padded.cumsum(dim)
        sums = torch.cat([torch.zeros_like(sums.narrow(dim, 0, 1)), sums], dim)
        x = sums.narrow(dim, side, length) - sums.narrow(dim, 0, length)
    return x / (side * side)


def _erode(x: Tensor, side: int) -> Tensor:
    """``cv2.erode`` by a ``side x side`` square (odd side): the minimum over the window
    clipped to the image, as two 1-D passes."""
    pad = side // 2
    x = -F.max_pool2d(-x, (1, side), stride=1, padding=(0, pad))
    return -F.max_pool2d(-x, (side, 1), stride=1, padding=(pad, 0))


def _guided_filter(guide: Tensor, source: Tensor, side: int, eps: float) -> Tensor:
    """He et al.'s guided filter over ``side x side`` boxes, in the script's order of operations."""
    mean_guide = _box_mean(guide, side)
    mean_source = _box_mean(source, side)
    covariance = _box_mean(guide * source, side) - mean_guide * mean_source
    variance = _box_mean(guide * guide, side) - mean_guide * mean_guide
    a = covariance / (variance + eps)
    b = mean_source - a * mean_guide
    return _box_mean(a, side) * guide + _box_mean(b, side)


def _histogram_threshold(values: Tensor) -> Tensor:
    """Per image ``[B]``: the left edge of bin ``lmax`` of ``numpy.histogram(v, 2000)``, the
    last bin (searched from 1999 down to 1, as the script's loop) whose cumulative fraction
    is at most 0.999; 1 when none is.

    When every 223x223 window holds the same minimum (small images, or black pixels all
    over), ``v`` is constant up to rounding: the script then takes every pixel when ``v`` is
    exactly constant, picks pixels by rounding noise when it is not (so OpenCV's summation
    order decides), or stops where numpy cannot cut so small a range into 2000 bins. Every
    pixel is taken for all three (-inf).
    """
    flat = values.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    # numpy.linspace: start + k * step, the last edge set to stop.
    step = (high - low) / _HISTOGRAM_BINS
    steps = torch.arange(_HISTOGRAM_BINS + 1, dtype=torch.float64, device=values.device)
    edges = steps * step[:, None] + low[:, None]
    edges[:, -1] = high
    # numpy puts v in bin k when edges[k] <= v < edges[k + 1]; the maximum in the last bin.
    bins = torch.searchsorted(edges[:, 1:-1].contiguous(), flat.contiguous(), right=True)
    counts = torch.zeros(flat.shape[0], _HISTOGRAM_BINS, dtype=torch.int64, device=values.device)
    counts.scatter_add_(1, bins, torch.ones_like(bins))
    fraction = counts.cumsum(dim=1).double() / flat.shape[1]
    candidates = torch.arange(1, _HISTOGRAM_BINS, device=values.device)
    lmax = torch.where(fraction[:, 1:] <= _HISTOGRAM_CUT, candidates, 1).amax(dim=1)
    threshold = edges.gather(1, lmax[:, None])[:, 0]
    return torch.where(high - low <= _FLAT_RANGE, float("-inf"), threshold)


def _airlight(image: Tensor) -> Tensor:
    """The script's single grey airlight value per image, ``[B, 1, 1, 1]``."""
    channel_min = image.amin(dim=1, keepdim=True)
    refined = _guided_filter(
        channel_min, _erode(channel_min, _AIRLIGHT_EROSION), _AIRLIGHT_BOX, _AIRLIGHT_EPS
    )
    threshold = _histogram_threshold(refined).view(-1, 1, 1, 1)
    brightness = image.mean(dim=1, keepdim=True)
    candidates = torch.where(refined >= threshold, brightness, float("-inf"))
    return candidates.amax(dim=(1, 2, 3), keepdim=True)


def _levels(image: Tensor) -> Tensor:
    """Integer 8-bit levels of ``image``: uint8 as is, floats in [0, 1] times 255, rounded."""
    if image.dtype == torch.uint8:
        return image.to(torch.int32)
    # k / 255 in float32 times 255 is within an ulp of k: rounding recovers k exactly.
    return image.float().mul(255).round().clamp(0, 255).to(torch.int32)


def script_priors(image: Tensor, *, scale: int = 4) -> tuple[Tensor, Tensor]:
    """The script's dark channel ``erode15(min_c I / a)`` and refined transmission ``t``
    (not normalised), float64 ``[B, 1, H // scale, W // scale]``.

    ``image`` is an RGB batch ``[B, 3, H, W]``: uint8, or floats in [0, 1] that hold 8-bit
    values (a decoded 8-bit file divided by 255), which are read back as 8 bits.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be an RGB batch [B, 3, H, W], got {list(image.shape)}")
    size = (image.shape[-2] // scale, image.shape[-1] // scale)
    if min(size) < 1:
        raise ValueError(f"image {list(image.shape[-2:])} is too small to shrink {scale}x")
    small = pillow_lanczos_downscale(_levels(image), size)
    normalised = small.double() / 255
    dark = _erode((normalised / _airlight(normalised)).amin(dim=1, keepdim=True), _DARK_PATCH)
    coarse = 1 - _OMEGA * dark
    return dark, _guided_filter(script_grey(small), coarse, _TRANSMISSION_BOX, _TRANSMISSION_EPS)


def script_region_masks(transmission: Tensor, num_regions: int = 5) -> Tensor:
    """One-hot masks ``[B, N, 1, h, w]`` (float32) of the min-max normalised ``transmission``:
    region i (from 0) holds ``(N-1-i)/N <= t < (N-i)/N``, region 0 everything from
    ``(N-1)/N`` up. A constant ``t`` normalises to 0/0, NaN, which no region holds: all masks
    are 0, as in the script. A ``t`` constant up to rounding (a flat image) is taken as
    constant, where the script's regions would follow its rounding noise.
    """
    if num_regions < 2:
        raise ValueError(f"num_regions must be >= 2, got {num_regions}")
    flat = transmission.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1)
    span = torch.where(high - low <= _FLAT_RANGE, math.nan, high - low)
    clarity = ((transmission - low) / span).unsqueeze(1)
    bounds = [(num_regions - region) / num_regions for region in range(num_regions + 1)]
    lower = torch.tensor(bounds[1:], dtype=clarity.dtype, device=clarity.device).view(1, -1, 1, 1, 1)
    upper = torch.tensor([math.inf, *bounds[1:-1]], dtype=clarity.dtype, device=clarity.device)
    inside = (clarity >= lower) & (clarity < upper.view(1, -1, 1, 1, 1))
    return inside.float()
