"""The dark channel prior (He, Sun and Tang, TPAMI 2011) in batched torch.

HDM uses these pieces to build its region masks (paper section 3.3, ``hdm_model.masks``),
and the classic DCP dehazer below is the paper's non-learned "DCP" column in Table 1.
Every function takes ``[B, C, H, W]`` tensors in [0, 1] on any device and keeps no graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_filter",
    "grey",
    "dark_channel",
    "atmospheric_light",
    "transmission",
    "guided_filter",
    "dehaze",
]

_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def box_filter(x: Tensor, radius: int) -> Tensor:
    """Mean over a ``(2r+1) x (2r+1)`` window, clipped at the borders, in O(1) per pixel.

    Summed-area tables keep the cost independent of the radius, which matters for the
    guided filter's radius of 60 pixels.
    """
    if radius <= 0:
        return x
    height, width = x.shape[-2:]
    # Float64 sums: a float32 table of a 12-megapixel image reaches ~1e7, where its rounding
    # step (~1) wrecks small windows (errors of 0.15 on a radius-1 mean of values in [0, 1]).
    integral = F.pad(x.double(), (1, 0, 1, 0)).cumsum(-1).cumsum(-2)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    top = (rows - radius).clamp(min=0)
    bottom = (rows + radius + 1).clamp(max=height)
    left = (cols - radius).clamp(min=0)
    right = (cols + radius + 1).clamp(max=width)
    window_sum = (
        integral[..., bottom, :][..., right]
        - integral[..., top, :][..., right]
        - integral[..., bottom, :][..., left]
        + integral[..., top, :][..., left]
    )
    area = (bottom - top)[:, None] * (right - left)[None, :]
    return (window_sum / area).to(x.dtype)


def grey(image: Tensor) -> Tensor:
    """ITU-R BT.601 luma of an RGB batch, shaped ``[B, 1, H, W]``."""
    weights = image.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (image * weights).sum(dim=1, keepdim=True)


@torch.no_grad()
def dark_channel(image: Tensor, patch_size: int = 15) -> Tensor:
    """Minimum over colour channels, then over a square patch: ``[B, 1, H, W]``."""
    per_pixel_min = image.amin(dim=1, keepdim=True)
    if patch_size <= 1:
        return per_pixel_min
    pad = patch_size // 2
    padded = F.pad(per_pixel_min, (pad, pad, pad, pad), mode="replicate")
    return -F.max_pool2d(-padded, kernel_size=patch_size, stride=1)


@torch.no_grad()
def atmospheric_light(image: Tensor, dark: Tensor, top_fraction: float = 0.001) -> Tensor:
    """Per-image airlight ``A`` as ``[B, 3, 1, 1]``.

    The mean colour of the pixels whose dark-channel value is in the brightest
    ``top_fraction`` (0.1% in He et al.), which is more stable than the single brightest
    pixel on noisy photos.
    """
    batch, channels = image.shape[:2]
    flat_dark = dark.reshape(batch, -1)
    count = max(1, int(flat_dark.shape[1] * top_fraction))
    indices = flat_dark.topk(count, dim=1).indices
    flat_image = image.reshape(batch, channels, -1)
    brightest = flat_image.gather(2, indices[:, None, :].expand(-1, channels, -1))
    return brightest.mean(dim=2).view(batch, channels, 1, 1).clamp(min=1e-3)


@torch.no_grad()
def transmission(
    image: Tensor, airlight: Tensor, omega: float = 0.95, patch_size: int = 15
) -> Tensor:
    """Coarse transmission ``t = 1 - omega * dark(I / A)``: ``[B, 1, H, W]``."""
    return 1.0 - omega * dark_channel((image / airlight).clamp(0.0, 1.0), patch_size)


@torch.no_grad()
def guided_filter(guide: Tensor, source: Tensor, radius: int, eps: float) -> Tensor:
    """Edge-preserving smoothing of ``source`` by a one-channel ``guide`` (He et al., ECCV 2010)."""
    mean_guide = box_filter(guide, radius)
    mean_source = box_filter(source, radius)
    covariance = box_filter(guide * source, radius) - mean_guide * mean_source
    variance = box_filter(guide * guide, radius) - mean_guide * mean_guide
    a = covariance / (variance + eps)
    b = mean_source - a * mean_guide
    return box_filter(a, radius) * guide + box_filter(b, radius)


@torch.no_grad()
def dehaze(
    image: Tensor,
    *,
    patch_size: int = 15,
    omega: float = 0.95,
    top_fraction: float = 0.001,
    radius: int = 60,
    eps: float = 1e-3,
    min_transmission: float = 0.1,
) -> Tensor:
    """Classic single-image dehazing by the dark channel prior, guided-filter refined.

    Recovers ``J = (I - A) / max(t, t0) + A`` from the scattering model
    ``I = J t + A (1 - t)``. This is the non-learned baseline of the paper's Table 1.
    """
    image = image.float()
    airlight = atmospheric_light(image, dark_channel(image, patch_size), top_fraction)
    coarse = transmission(image, airlight, omega, patch_size)
    refined = guided_filter(grey(image), coarse, radius, eps).clamp(min=min_transmission)
    return ((image - airlight) / refined + airlight).clamp(0.0, 1.0)
