"""The DCP priors and region masks of an image as one picture (the paper's Figure 1).

``hdm explain`` writes it to a file and the HTTP server's ``POST /v1/explain/{task}``
answers it; both draw it here.
"""

from __future__ import annotations

import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from hdm_model.config import HDMConfig
from hdm_model.config import FEATURE_STRIDE
from hdm_model.masks import compute_dcp_maps

__all__ = ["LABEL_HEIGHT", "MARGIN", "PANEL_LONG_SIDE", "explain_figure"]

#: Figure layout: panels scaled to this long side, a label strip above each, and a margin
#: around and between panels.
PANEL_LONG_SIDE = 256
LABEL_HEIGHT = 16
MARGIN = 4

_OUTSIDE_REGION_BRIGHTNESS = 0.2


def _panel_size(height: int, width: int) -> tuple[int, int]:
    scale = PANEL_LONG_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(image: Tensor, size: tuple[int, int], *, mode: str) -> Tensor:
    """``[C, h, w]`` -> ``[C, *size]``; 'nearest' keeps mask edges hard."""
    batch = image.unsqueeze(0).float()
    if mode == "nearest":
        return F.interpolate(batch, size=size, mode="nearest")[0]
    return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _region_label(index: int, num_regions: int) -> str:
    if index == 0:
        return "region 1 (clearest)"
    if index == num_regions - 1:
        return f"region {num_regions} (haziest)"
    return f"region {index + 1}"


def explain_figure(image: Tensor, config: HDMConfig) -> Image.Image:
    """Input, dark channel, refined transmission and the N region masks, side by side.

    ``image`` is ``[3, H, W]`` in [0, 1]; the priors use ``config``'s DCP settings at the
    feature scale (1/4), the way HDM computes its masks. Each region panel shows the input
    where the region is and darkens it elsewhere.
    """
    maps = compute_dcp_maps(image.unsqueeze(0), scale=FEATURE_STRIDE, **config.dcp_mask_settings())
    size = _panel_size(*image.shape[-2:])
    small_input = _resize(image, size, mode="bilinear").clamp(0.0, 1.0)
    panels = [
        ("input", small_input),
        ("dark channel", _resize(maps.dark_channel[0], size, mode="bilinear").expand(3, -1, -1)),
        ("transmission", _resize(maps.transmission[0], size, mode="bilinear").expand(3, -1, -1)),
    ]
    for index in range(config.num_regions):
        inside = _resize(maps.masks[0, index], size, mode="nearest")
        shade = inside + (1.0 - inside) * _OUTSIDE_REGION_BRIGHTNESS
        panels.append((_region_label(index, config.num_regions), small_input * shade))

    panel_height, panel_width = size
    canvas = Image.new(
        "RGB",
        (
            len(panels) * (panel_width + MARGIN) + MARGIN,
            LABEL_HEIGHT + panel_height + 2 * MARGIN,
        ),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for position, (label, pixels) in enumerate(panels):
        left = MARGIN + position * (panel_width + MARGIN)
        draw.text((left, MARGIN), label, fill="black", font=font)
        canvas.paste(to_pil_image(pixels.clamp(0.0, 1.0)), (left, MARGIN + LABEL_HEIGHT))
    return canvas
