"""The authors' published network as the tests know it, independently of ``hdm_model``.

Written from ``shared/design/hdm-published-checkpoint.md`` (and the facts of
``hdm-reference.md`` it builds on), not from this project's modules: the file's key names
and shapes, a fake published file of random weights under those names, and a plain
functional forward of ``DR_Net_phy`` that reads the weights by their published names, with
its own modulated deformable convolution (bilinear sampling by ``grid_sample``, no
torchvision op) and a per-image loop for the region block's dynamic kernels.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MEAN",
    "STD",
    "deform_conv_reference",
    "published_shapes",
    "random_published_state",
    "reference_forward",
    "save_published_file",
]

MEAN = torch.tensor([0.64, 0.6, 0.58]).view(1, 3, 1, 1)
STD = torch.tensor([0.14, 0.15, 0.152]).view(1, 3, 1, 1)
GROUPS, BLOCKS, REGIONS, CHANNELS = 3, 9, 5, 64


def _conv(shapes: dict[str, list[int]], name: str, out: int, inp: int, size: int) -> None:
    shapes[f"{name}.weight"] = [out, inp, size, size]
    shapes[f"{name}.bias"] = [out]


def published_shapes() -> dict[str, list[int]]:
    """Every key of ``hdm_haze_sots.pk``'s state dict (without ``module.``) and its shape."""
    shapes: dict[str, list[int]] = {}
    _conv(shapes, "conv0.0", 64, 3, 5)
    for name in ("conv1.0", "conv1.1", "conv2.0", "conv2.1"):
        _conv(shapes, name, 64, 64, 3)
    for group in range(GROUPS):
        for block in range(BLOCKS):
            prefix = f"FAB.{group}.gp.{block}"
            _conv(shapes, f"{prefix}.conv1", 64, 64, 3)
            _conv(shapes, f"{prefix}.conv2", 64, 64, 3)
            _conv(shapes, f"{prefix}.calayer.ca.0", 8, 64, 1)
            _conv(shapes, f"{prefix}.calayer.ca.2", 64, 8, 1)
            _conv(shapes, f"{prefix}.palayer.pa.0", 8, 64, 1)
            _conv(shapes, f"{prefix}.palayer.pa.2", 1, 8, 1)
        _conv(shapes, f"FAB.{group}.gp.{BLOCKS}", 64, 64, 3)
    for name in ("deconv1.0", "deconv2.0"):
        _conv(shapes, name, 64, 64, 4)
    _conv(shapes, "output.0", 64, 64, 5)
    _conv(shapes, "output.1", 64, 64, 5)
    _conv(shapes, "output.2", 3, 64, 5)
    for name in ("drconv", "drconv_phy"):
        _conv(shapes, f"{name}.conv_kernel.1", 25, 64, 1)
        _conv(shapes, f"{name}.conv_kernel.3", 20480, 5, 1)
    _conv(shapes, "drconv.conv_guide", 5, 64, 3)
    _conv(shapes, "dcn_block.dcn", 64, 64, 3)
    _conv(shapes, "dcn_block.dcn.conv_offset_mask", 27, 64, 3)
    for index in range(1, 5):
        shapes[f"mix{index}.w"] = [1]
    return shapes


def _random_tensor(name: str, shape: list[int], generator: torch.Generator) -> Tensor:
    if name.endswith(".w"):
        return torch.randn(shape, generator=generator)
    if name.endswith(".bias"):
        scale = 0.7 if "conv_offset_mask" in name else 0.05
        # Outputs around mid-grey, so that clamping to [0, 1] hides little of them.
        centre = 0.5 if name == "output.2.bias" else 0.0
        return centre + torch.randn(shape, generator=generator) * scale
    fan_in = math.prod(shape[1:])
    # Scaled so that activations neither vanish nor saturate the Tanh through 27 blocks,
    # and the predicted offsets are about a pixel: a test that can see every layer.
    gains = {"conv_kernel.3": 0.04, "conv_offset_mask": 0.3, "output.2": 5.0}
    gain = next((value for part, value in gains.items() if part in name), 0.8)
    return torch.randn(shape, generator=generator) * gain / math.sqrt(fan_in)


def random_published_state(seed: int = 0) -> collections.OrderedDict[str, Tensor]:
    """Random weights under the published names, as ``DataParallel(net).state_dict()``
    would hold them (``module.`` prefix, an OrderedDict with ``_metadata``)."""
    generator = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict(
        (f"module.{name}", _random_tensor(name, shape, generator))
        for name, shape in published_shapes().items()
    )
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return state


def save_published_file(path: Path, state: dict[str, Tensor], *, legacy: bool = False) -> Path:
    """``torch.save({"model": state, ...})`` as the authors' training script saved it;
    ``legacy`` writes the pre-1.6 format of their PyTorch 1.4."""
    document = {"model": state, "step": 140000, "max_psnr": 38.56, "psnrs": [37.9, 38.56]}
    torch.save(document, path, _use_new_zipfile_serialization=not legacy)
    return path


def deform_conv_reference(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """DCNv2's modulated 3x3 deformable conv (stride 1, padding 1): tap k = (i, j) of output
    pixel (y, x) samples ``x`` bilinearly at (y - 1 + i + dy_k, x - 1 + j + dx_k), zero
    outside, with (dy_k, dx_k) at offset channels (2k, 2k + 1), times ``mask[:, k]``."""
    _, channels, height, width = x.shape
    rows = torch.arange(height, dtype=x.dtype).view(1, height, 1)
    cols = torch.arange(width, dtype=x.dtype).view(1, 1, width)
    sampled = []
    for tap in range(9):
        i, j = divmod(tap, 3)
        y = rows + (i - 1) + offset[:, 2 * tap]
        x_ = cols + (j - 1) + offset[:, 2 * tap + 1]
        # align_corners=True: -1 and 1 are the centres of the first and last pixels.
        grid = torch.stack([2 * x_ / (width - 1) - 1, 2 * y / (height - 1) - 1], dim=-1)
        values = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        sampled.append(values * mask[:, tap : tap + 1])
    columns = torch.stack(sampled, dim=2)  # [B, C, 9, H, W]
    out = torch.einsum("bckhw,ock->bohw", columns, weight.reshape(weight.shape[0], channels, 9))
    return out + bias.view(1, -1, 1, 1)


def _c(w: dict[str, Tensor], name: str, x: Tensor, **kwargs) -> Tensor:
    return F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], **kwargs)


def _block(w: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    res = F.relu(_c(w, f"{prefix}.conv1", x, padding=1)) + x
    res = _c(w, f"{prefix}.conv2", res, padding=1)
    pooled = F.adaptive_avg_pool2d(res, 1)
    res = res * torch.sigmoid(_c(w, f"{prefix}.calayer.ca.2", F.relu(_c(w, f"{prefix}.calayer.ca.0", pooled))))
    res = res * torch.sigmoid(_c(w, f"{prefix}.palayer.pa.2", F.relu(_c(w, f"{prefix}.palayer.pa.0", res))))
    return res + x


def _dcn(w: dict[str, Tensor], x: Tensor) -> Tensor:
    o1, o2, m = _c(w, "dcn_block.dcn.conv_offset_mask", x, padding=1).chunk(3, dim=1)
    return deform_conv_reference(
        x, torch.cat([o1, o2], dim=1), torch.sigmoid(m), w["dcn_block.dcn.weight"], w["dcn_block.dcn.bias"]
    )


def _drconv_phy(w: dict[str, Tensor], x: Tensor, masks: Tensor) -> Tensor:
    pooled = F.adaptive_avg_pool2d(x, 3)
    kernels = _c(w, "drconv_phy.conv_kernel.3", torch.sigmoid(_c(w, "drconv_phy.conv_kernel.1", pooled)), groups=REGIONS)
    outputs = []
    for image in range(x.shape[0]):
        # [r * out * in, 3, 3] per image -> r * out filters over the image's own features.
        filters = kernels[image].reshape(REGIONS * CHANNELS, CHANNELS, 3, 3)
        response = F.conv2d(x[image : image + 1], filters, padding=1)
        response = response.view(1, REGIONS, CHANNELS, *x.shape[-2:])
        outputs.append((response * masks[image : image + 1]).sum(dim=1))
    return torch.cat(outputs)


def _mix(weight: Tensor, skip: Tensor, x: Tensor) -> Tensor:
    factor = torch.sigmoid(weight)
    return skip * factor + x * (1 - factor)


def _up(w: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    x = F.conv_transpose2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=2, padding=1)
    return F.relu(F.avg_pool2d(F.pad(x, (1, 0, 1, 0), mode="reflect"), 2, stride=1))


@torch.no_grad()
def reference_forward(state: dict[str, Tensor], image: Tensor, masks: Tensor) -> Tensor:
    """``DR_Net_phy.forward(normalize(image), masks)``: the Tanh output, unclamped.

    ``state`` may carry the ``module.`` prefix; ``image`` is ``[B, 3, H, W]`` in [0, 1] with
    H, W multiples of 4; ``masks`` ``[B, 5, 1, H/4, W/4]``.
    """
    w = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    x = (image - MEAN) / STD
    x = F.relu(_c(w, "conv0.0", x, padding=2))
    x = F.relu(_c(w, "conv1.1", _c(w, "conv1.0", x, padding=1), stride=2, padding=1))
    half_skip = x
    x = F.relu(_c(w, "conv2.1", _c(w, "conv2.0", x, padding=1), stride=2, padding=1))
    quarter_skip = x
    for group in range(GROUPS):
        y = x
        for block in range(BLOCKS):
            y = _block(w, f"FAB.{group}.gp.{block}", y)
        x = _c(w, f"FAB.{group}.gp.{BLOCKS}", y, padding=1) + x
    x = F.relu(x)
    for _ in range(2):  # the same deformable and region modules, twice
        x = _drconv_phy(w, _dcn(w, x), masks)
    x = _up(w, "deconv1.0", _mix(w["mix1.w"], quarter_skip, x))
    x = _up(w, "deconv2.0", _mix(w["mix2.w"], half_skip, x))
    x = _c(w, "output.2", _c(w, "output.1", _c(w, "output.0", x, padding=2), padding=2), padding=2)
    return torch.tanh(x)
