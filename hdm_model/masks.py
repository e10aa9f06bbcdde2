"""DCP-guided region masks (paper section 3.3, Fig. 2).

The input is downscaled to the feature grid (1/4), its transmission (or, in the paper's
simpler variant, its dark channel) is normalised per image to [0, 1] and split into N equal
intervals; each interval is one region, as one-hot masks ``[B, N, 1, h, w]``. Least degraded
first: region 1 holds the highest transmission, region N the lowest. Nothing here keeps a
graph, and everything runs batched on the input's device. Mode "published" is the authors'
test script step for step (``hdm_model.published_masks``), the masks the published weights
were scored with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hdm_model.config import DCP_MASK_MODES
from hdm_model.priors import atmospheric_light, dark_channel, grey, guided_filter, transmission
from hdm_model.published_masks import script_priors, script_region_masks

__all__ = ["DCPMaps", "bin_into_regions", "compute_dcp_maps", "dcp_region_masks", "downscale"]

_RANGE_FLOOR = 1e-6
#: The DCP settings' defaults; mode "published" has the script's constants and takes no others.
_SCRIPT_SETTINGS = {
    "patch_size": 15, "omega": 0.95, "top_fraction": 0.001, "guided_radius": 60, "guided_eps": 1e-4,
}  # fmt: skip


@dataclass(frozen=True)
class DCPMaps:
    """The priors behind a set of region masks, all at the mask scale, for visualisation.

    ``dark_channel`` and ``transmission`` are ``[B, 1, h, w]`` (raw, not normalised; the
    transmission is the guided-filter-refined one), ``masks`` is one-hot ``[B, N, 1, h, w]``.
    """

    dark_channel: Tensor
    transmission: Tensor
    masks: Tensor


def downscale(image: Tensor, scale: int) -> Tensor:
    """Area-average ``image`` down by ``scale`` to ``ceil(H/scale) x ceil(W/scale)``."""
    if scale == 1:
        return image
    size = (math.ceil(image.shape[-2] / scale), math.ceil(image.shape[-1] / scale))
    return F.interpolate(image, size=size, mode="area")


@torch.no_grad()
def bin_into_regions(values: Tensor, num_regions: int) -> Tensor:
    """One-hot masks ``[B, N, 1, h, w]`` from a ``[B, 1, h, w]`` map in [0, 1].

    N equal intervals: ``values >= (N-1)/N`` is region 1 (index 0), ``values < 1/N`` is
    region N (index N-1).
    """
    if values.dim() != 4 or values.shape[1] != 1:
        raise ValueError(f"values must be shaped [B, 1, h, w], got {list(values.shape)}")
    if num_regions < 2:
        raise ValueError(f"num_regions must be >= 2, got {num_regions}")
    interval = (values.float().clamp(0.0, 1.0) * num_regions).floor().long()
    index = (num_regions - 1 - interval).clamp(0, num_regions - 1)
    one_hot = F.one_hot(index[:, 0], num_regions).permute(0, 3, 1, 2)
    return one_hot.unsqueeze(2).to(values.dtype if values.is_floating_point() else torch.float32)


def _normalise_per_image(values: Tensor) -> Tensor:
    flat = values.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1)
    return (values - low) / (high - low).clamp(min=_RANGE_FLOOR)


def _check_rgb(image: Tensor, mode: str) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be an RGB batch [B, 3, H, W], got {list(image.shape)}")
    if mode not in DCP_MASK_MODES:
        raise ValueError(f"mode must be one of {', '.join(DCP_MASK_MODES)}, got {mode!r}")


def _published_maps(image: Tensor, num_regions: int, scale: int, settings: dict[str, float]) -> DCPMaps:
    changed = sorted(name for name, value in settings.items() if value != _SCRIPT_SETTINGS[name])
    if changed:
        raise ValueError(
            f"mode 'published' runs the authors' script with its own constants; "
            f"{', '.join(changed)} cannot be changed with it"
        )
    dark, refined = script_priors(image, scale=scale)
    dtype = image.dtype if image.is_floating_point() else torch.float32
    return DCPMaps(
        dark_channel=dark.to(dtype),
        transmission=refined.to(dtype),
        masks=script_region_masks(refined, num_regions).to(dtype),
    )


@torch.no_grad()
def compute_dcp_maps(
    image: Tensor,
    *,
    num_regions: int = 5,
    mode: str = "transmission",
    scale: int = 4,
    patch_size: int = 15,
    omega: float = 0.95,
    top_fraction: float = 0.001,
    guided_radius: int = 60,
    guided_eps: float = 1e-4,
) -> DCPMaps:
    """Dark channel, refined transmission and region masks of ``image`` at ``1/scale``.

    ``mode="transmission"`` is the released code (``t = 1 - omega * dark(I/A)`` refined by a
    guided filter on the grey image, normalised, binned); ``mode="dark_channel"`` is the
    paper's description (bins of the normalised dark channel, inverted so that region 1 is
    again the least hazy); ``mode="published"`` is the authors' test script exactly, at
    ``H // scale x W // scale`` (its dark channel is that of ``I / A``).
    """
    _check_rgb(image, mode)
    if mode == "published":
        settings = {
            "patch_size": patch_size, "omega": omega, "top_fraction": top_fraction,
            "guided_radius": guided_radius, "guided_eps": guided_eps,
        }  # fmt: skip
        return _published_maps(image, num_regions, scale, settings)
    small = downscale(image.float(), scale).clamp(0.0, 1.0)
    dark = dark_channel(small, patch_size)
    airlight = atmospheric_light(small, dark, top_fraction)
    coarse = transmission(small, airlight, omega, patch_size)
    refined = guided_filter(grey(small), coarse, guided_radius, guided_eps)
    if mode == "transmission":
        clarity = _normalise_per_image(refined)
    else:
        clarity = 1.0 - _normalise_per_image(dark)
    return DCPMaps(
        dark_channel=dark, transmission=refined, masks=bin_into_regions(clarity, num_regions)
    )


@torch.no_grad()
def dcp_region_masks(
    image: Tensor,
    *,
    num_regions: int = 5,
    mode: str = "transmission",
    scale: int = 4,
    patch_size: int = 15,
    omega: float = 0.95,
    top_fraction: float = 0.001,
    guided_radius: int = 60,
    guided_eps: float = 1e-4,
) -> Tensor:
    """One-hot DCP region masks ``[B, N, 1, ceil(H/scale), ceil(W/scale)]`` of an RGB batch
    (``H // scale x W // scale`` in mode "published", as the script)."""
    _check_rgb(image, mode)
    if mode == "dark_channel":
        # Only the transmission needs the airlight and the guided filter; skip them.
        small = downscale(image.float(), scale).clamp(0.0, 1.0)
        clarity = 1.0 - _normalise_per_image(dark_channel(small, patch_size))
        return bin_into_regions(clarity, num_regions)
    return compute_dcp_maps(
        image,
        num_regions=num_regions,
        mode=mode,
        scale=scale,
        patch_size=patch_size,
        omega=omega,
        top_fraction=top_fraction,
        guided_radius=guided_radius,
        guided_eps=guided_eps,
    ).masks
