"""Fast and memory-bounded HDM inference.

The fast path runs under ``torch.inference_mode`` in channels_last layout with the decoder
head's three convolutions folded into one (``FoldedHead``), optionally under bfloat16
autocast (the deformable conv stays in float32, see ``hdm_model.structure``) and optionally
compiled by inductor with frozen weights. ``precision="auto"`` picks bfloat16 where it is
faster (CUDA GPUs with bfloat16, CPUs with AMX, AMD CPUs with AVX512_BF16) and float32
elsewhere: on Intel AVX-512 CPUs without AMX, oneDNN's bfloat16 convolutions are slower than
its float32 ones. The tiled path bounds memory on large photos: overlapping tiles are blended
with linear ramps, and the DCP region masks are computed once on the whole image and cropped
per tile, so every tile sees the same airlight and the same normalisation range. Small tiles
(a model's own ``inference_tile``, e.g. 64 pixels) go through the network many at a time.
"""

from __future__ import annotations

import functools
import platform
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdm_model.config import DEFAULT_TILE, DEFAULT_TILE_OVERLAP, FEATURE_STRIDE, UNTILED_MAX_PIXELS, HDMConfig
from hdm_model.model import HDM, pad_to_multiple

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_TILE_OVERLAP",
    "FoldedHead",
    "Precision",
    "enhance",
    "UNTILED_MAX_PIXELS",
    "cpu_has_fast_bf16",
    "overlap_for",
    "prepare_for_inference",
    "resolve_device",
    "resolve_precision",
    "tile_for",
]


Precision = Literal["auto", "fp32", "bf16"]


def resolve_precision(precision: Precision, device: str | torch.device) -> Literal["fp32", "bf16"]:
    """The precision ``precision`` stands for on ``device``, for inference and training alike:
    "auto" is bf16 on CUDA GPUs with bfloat16 support and on CPUs with fast bfloat16
    (:func:`cpu_has_fast_bf16`), fp32 elsewhere."""
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions faster than float32 ones: with AMX (tile
    matrix units), or an AMD CPU with AVX512_BF16 (Zen 4 and later: bf16 trains 1.3-1.7x and
    infers 1.6x faster there). An Intel CPU with AVX512_BF16 but no AMX trains at 0.7x in bf16
    (bench/RESULTS.md "Training", sessions 1 and 15)."""
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("amx_bf16", False):
        return True
    return bool(capabilities.get("avx512_bf16", False)) and "AuthenticAMD" in _cpu_vendor()


@functools.cache
def _cpu_vendor() -> str:
    """The CPU's vendor string: ``vendor_id`` in /proc/cpuinfo on Linux, else what
    ``platform.processor()`` says (on Windows it ends with the vendor)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or "auto" is the first CUDA GPU when there is one, else the CPU; a CUDA
    device asked for on a machine without one is a ``ValueError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    return resolved


def tile_for(height: int, width: int, tile: int | None = None, *, model_tile: int | None = None) -> int | None:
    """The tile side every inference path uses for a ``height x width`` image.

    ``tile=None``: the model's own ``inference_tile`` (``model_tile``) for images larger than
    it, else whole up to :data:`UNTILED_MAX_PIXELS` and ``DEFAULT_TILE`` tiles above;
    ``tile=0``: never tiled; any other value is the tile side.
    """
    if tile is not None:
        return tile or None
    if model_tile is not None:
        return model_tile if max(height, width) > model_tile else None
    return DEFAULT_TILE if height * width > UNTILED_MAX_PIXELS else None


def overlap_for(tile: int, config: HDMConfig) -> int:
    """The overlap of ``tile``-pixel tiles when the caller names none: the model's own
    ``inference_tile_overlap`` for its own ``inference_tile``, else :data:`DEFAULT_TILE_OVERLAP`."""
    if tile == config.inference_tile and config.inference_tile_overlap is not None:
        return config.inference_tile_overlap
    return DEFAULT_TILE_OVERLAP


class FoldedHead(nn.Sequential):
    """The decoder head (three 5x5 convs and a Tanh, paper section 3) run in eval mode as
    one 13x13 conv over 2x2 pixel blocks.

    No activation separates the three convs, so they are one linear map: a 13x13 kernel
    C->3, 32k multiply-adds per pixel instead of 209k. A conv with 3 outputs leaves most of
    oneDNN's vector lanes empty, so the folded conv runs on 2x2 pixel blocks packed into
    channels (a 7x7 conv 4*C -> 12, 38k multiply-adds per pixel; on an AVX2 CPU 1.6x faster
    than the plain 13x13 conv and 1.3x faster than 4x4 blocks, bench/RESULTS.md).
    Folding is exact except where the inner convs' zero padding matters, i.e. the outer
    4 pixels of the output, which are recomputed by the plain convs on thin border strips.
    The parameters keep their names; the folded kernel is cached and rebuilt whenever a
    weight changes; in training mode or with gradients enabled the head runs as the plain
    ``nn.Sequential``.
    """

    def __init__(self, head: nn.Sequential) -> None:
        super().__init__(*head)
        *convs, _ = self
        for conv in convs:
            if (
                not isinstance(conv, nn.Conv2d)
                or conv.stride != (1, 1)
                or conv.dilation != (1, 1)
                or conv.groups != 1
                or conv.bias is None
                or conv.kernel_size[0] != conv.kernel_size[1]
                or conv.kernel_size[0] % 2 == 0
                or conv.padding != (conv.kernel_size[0] // 2,) * 2
            ):
                raise ValueError(f"FoldedHead folds 'same'-padded square stride-1 convs, got {conv}")
        self._cached_key: tuple[tuple[int, int], ...] | None = None
        self._cached: tuple[Tensor, Tensor] | None = None

    @property
    def _convs(self) -> list[nn.Conv2d]:
        return list(self)[:-1]

    def folded_conv(self) -> tuple[Tensor, Tensor]:
        """Kernel ``[3, C, k, k]`` and bias of the convs composed (full 2-D convolutions of
        their kernels), valid where no inner conv needs padding."""
        first, *rest = self._convs
        with torch.autocast(device_type=first.weight.device.type, enabled=False):
            weight, bias = first.weight, first.bias
            for conv in rest:
                pad = conv.kernel_size[0] - 1
                bias = conv.bias + conv.weight.sum(dim=(2, 3)) @ bias
                weight = F.conv2d(
                    F.pad(weight.transpose(0, 1), (pad, pad, pad, pad)), conv.weight.flip(-2, -1)
                ).transpose(0, 1)
        return weight, bias

    def blocked_conv(self) -> tuple[Tensor, Tensor]:
        """The folded conv on ``_space_to_depth(x, 4)``, producing ``pixel_unshuffle(y, 4)``
        (cached until a weight changes)."""
        # Tensor._version counts in-place writes; torch has no public counter for them. The
        # only use in the project; test_folded_head_follows_weight_changes fails if it stops.
        key = tuple((parameter.data_ptr(), parameter._version) for parameter in self.parameters())
        if self._cached_key != key:
            weight, bias = self.folded_conv()
            self._cached = _space_to_depth_kernel(weight, bias, _FOLD_BLOCK)
            self._cached_key = key
        return self._cached

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled():
            # The folded kernel is a constant of inference; gradients go through the convs.
            return super().forward(x)
        *convs, activation = self
        ring = sum(conv.padding[0] for conv in convs[1:])
        strip = ring + sum(conv.padding[0] for conv in convs)
        height, width = x.shape[-2:]
        if min(height, width) < 2 * strip or height % _FOLD_BLOCK or width % _FOLD_BLOCK:
            return activation(nn.Sequential(*convs)(x))
        weight, bias = self.blocked_conv()
        out = F.pixel_shuffle(
            F.conv2d(
                _space_to_depth(x, _FOLD_BLOCK),
                weight.to(x.dtype),
                bias.to(x.dtype),
                padding=weight.shape[-1] // 2,
            ),
            _FOLD_BLOCK,
        ).contiguous(memory_format=torch.channels_last)
        # The border ring, where an inner conv's zero padding is not a zero input of the
        # folded kernel: the plain convs on the strips it depends on.
        out[..., :ring, :] = self._edge(x[..., :strip, :], "top")
        out[..., -ring:, :] = self._edge(x[..., -strip:, :], "bottom")
        out[..., :ring] = self._edge(x[..., :strip], "left")
        out[..., -ring:] = self._edge(x[..., -strip:], "right")
        return activation(out)

    def _edge(self, strip: Tensor, edge: Literal["top", "bottom", "left", "right"]) -> Tensor:
        """The plain convs on a strip along one edge of the image: zero padding on the
        image's sides only, so each conv narrows the strip by its padding and the last
        leaves the ring, computed as the whole image would compute it."""
        for conv in self._convs:
            pad = conv.padding[0]
            left, right, top, bottom = (pad,) * 4
            if edge == "top":
                bottom = 0
            elif edge == "bottom":
                top = 0
            elif edge == "left":
                right = 0
            else:
                left = 0
            strip = F.conv2d(F.pad(strip, (left, right, top, bottom)), conv.weight, conv.bias)
        return strip


_FOLD_BLOCK = 2
"""Pixels per side that ``FoldedHead`` packs into channels (2 x 2 x 3 = 12 outputs)."""


def _space_to_depth(x: Tensor, block: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, block * block * C, H / block, W / block]`` (channels_last),
    channel ``(di * block + dj) * C + c`` holding pixel ``(di, dj)`` of each block.

    Pixel-major, unlike ``pixel_unshuffle``'s channel-major order: from channels_last memory
    every copied run is C contiguous values, 5x faster than runs of ``block`` values.
    """
    batch, channels, height, width = x.shape
    blocks = (
        x.permute(0, 2, 3, 1)
        .reshape(batch, height // block, block, width // block, block, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, height // block, width // block, block * block * channels)
    )
    return blocks.permute(0, 3, 1, 2)


def _space_to_depth_kernel(weight: Tensor, bias: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``weight`` ``[O, C, k, k]`` (odd ``k``, "same" padding) as a ``(2n+1) x (2n+1)`` conv
    (padding ``n = ceil((k // 2) / block)``) from ``_space_to_depth(x, block)`` to
    ``pixel_unshuffle(conv(x), block)``.

    Output pixel ``block * P + i`` reads input pixel ``block * (P + b - n) + d`` through tap
    ``block * (b - n) + d - i + k // 2``; taps outside the kernel are zero.
    """
    out_channels, in_channels, kernel_size, _ = weight.shape
    reach = -(-(kernel_size // 2) // block)
    span = 2 * reach + 1
    offsets = torch.arange(block, device=weight.device)
    block_offsets = torch.arange(span, device=weight.device) - reach
    # tap[i, d, b] for output sub-pixel i, input sub-pixel d, block offset b.
    tap = (
        block * block_offsets.view(1, 1, span)
        + offsets.view(1, block, 1)
        - offsets.view(block, 1, 1)
        + kernel_size // 2
    )
    tap = torch.where((tap >= 0) & (tap < kernel_size), tap, kernel_size)  # index of a zero
    padded = F.pad(weight, (0, 1, 0, 1))
    rows = tap.view(block, 1, block, 1, span, 1)
    cols = tap.view(1, block, 1, block, 1, span)
    # [O, C, i, j, di, dj, bi, bj] -> [O, i, j, di, dj, C, bi, bj]
    rearranged = padded[:, :, rows, cols].permute(0, 2, 3, 4, 5, 1, 6, 7)
    rearranged = rearranged.reshape(out_channels * block * block, in_channels * block * block, span, span)
    return (
        rearranged.contiguous(memory_format=torch.channels_last),
        bias.repeat_interleave(block * block),
    )


def prepare_for_inference(
    model: HDM, *, device: str | torch.device, fold_head: bool = True, compile: bool = False
) -> HDM:
    """``model`` in eval mode, channels_last, on ``device``, for ``enhance``.

    ``fold_head`` runs the decoder head's three convolutions as one (``FoldedHead``; same
    parameters and state dict). ``compile`` compiles the forward pass with inductor
    and frozen weights (``torch.compile``): a one-off warm-up (on a 2-core CPU 40 s for
    the first input shape and 75-105 s for the second, after which sizes are dynamic and
    stop recompiling) for 5-10% on CPU; meant for long-lived serving replicas. The model
    must then only run under ``torch.inference_mode`` (as ``enhance`` does).
    """
    if fold_head and not isinstance(model.decoder.head, FoldedHead):
        model.decoder.head = FoldedHead(model.decoder.head)
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    if compile:
        model.compile(options={"freezing": True})
    return model


@torch.inference_mode()
def enhance(
    model: HDM,
    images: Tensor,
    *,
    precision: Precision = "fp32",
    tile: int | None = None,
    tile_overlap: int | None = None,
    guide: Tensor | None = None,
) -> Tensor:
    """Enhance ``images`` ``[B, 3, H, W]`` in [0, 1]; returns float32 in [0, 1] on the model's device.

    ``precision`` is "fp32", "bf16" (autocast) or "auto" (``resolve_precision``).
    ``tile`` (a multiple of 4) bounds memory by running ``tile x tile`` crops that overlap by
    ``tile_overlap`` pixels (a multiple of 4; ``None``: the model's ``inference_tile_overlap``
    when ``tile`` is its ``inference_tile``, else :data:`DEFAULT_TILE_OVERLAP`). ``guide`` is
    the ``[B, 1, H, W]`` map of a model whose ``mask_source`` is "external".
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float batch [B, C, H, W] in [0, 1], got {images.dtype} {list(images.shape)}"
        )
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    images = images.to(device=device, dtype=torch.float32)
    if guide is not None:
        guide = guide.to(device=device, dtype=torch.float32)
    if tile is None:
        return _forward(model, images, precision=precision, masks=None, guide=guide)
    if tile_overlap is None:
        tile_overlap = overlap_for(tile, model.config)
    _check_tiling(tile, tile_overlap)
    return _enhance_tiled(
        model, images, precision=precision, tile=tile, overlap=tile_overlap, guide=guide
    )


def _forward(
    model: HDM, images: Tensor, *, precision: Literal["fp32", "bf16"], masks: Tensor | None, guide: Tensor | None
) -> Tensor:
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        device_type=images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
    ):
        out = model(images, masks=masks, guide=guide)
    return out.float().clamp(0.0, 1.0)


def _check_tiling(tile: int, overlap: int) -> None:
    if tile <= 0 or tile % FEATURE_STRIDE:
        raise ValueError(f"tile must be a positive multiple of {FEATURE_STRIDE}, got {tile}")
    if overlap < 0 or overlap % FEATURE_STRIDE or overlap >= tile:
        raise ValueError(
            f"tile_overlap must be a multiple of {FEATURE_STRIDE} in [0, tile={tile}), got {overlap}"
        )


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, overlap: int, *, device: torch.device) -> Tensor:
    """1 in the middle, rising linearly over ``overlap`` pixels at both ends, never 0."""
    if overlap == 0:
        return torch.ones(length, device=device)
    position = torch.arange(length, device=device, dtype=torch.float32)
    distance_to_edge = torch.minimum(position + 1, length - position)
    return (distance_to_edge / (overlap + 1)).clamp(max=1.0)


def _enhance_tiled(
    model: HDM,
    images: Tensor,
    *,
    precision: Literal["fp32", "bf16"],
    tile: int,
    overlap: int,
    guide: Tensor | None,
) -> Tensor:
    height, width = images.shape[-2:]
    # Whole-image statistics (airlight, min-max range) for all tiles alike.
    masks = model.region_masks(images, guide=guide) if model.needs_image_masks else None
    padded = pad_to_multiple(images)
    padded_height, padded_width = padded.shape[-2:]
    tile_height, tile_width = min(tile, padded_height), min(tile, padded_width)
    window = _ramp(tile_height, overlap, device=images.device)[:, None] * _ramp(
        tile_width, overlap, device=images.device
    )
    blended = torch.zeros(
        images.shape[0], model.config.in_channels, padded_height, padded_width, device=images.device
    )
    weight = torch.zeros(padded_height, padded_width, device=images.device)
    stride = tile - overlap
    corners = [
        (top, left)
        for top in _tile_starts(padded_height, tile_height, stride)
        for left in _tile_starts(padded_width, tile_width, stride)
    ]
    # Small tiles go through the network together, as many as fill one DEFAULT_TILE tile: one
    # forward's fixed cost for many tiles, and the peak memory of DEFAULT_TILE tiling.
    per_forward = max(1, DEFAULT_TILE * DEFAULT_TILE // (images.shape[0] * tile_height * tile_width))
    for first in range(0, len(corners), per_forward):
        chunk = corners[first : first + per_forward]
        crops = torch.cat([padded[..., top : top + tile_height, left : left + tile_width] for top, left in chunk])
        chunk_masks = None
        if masks is not None:
            chunk_masks = torch.cat([
                masks[
                    ...,
                    top // FEATURE_STRIDE : (top + tile_height) // FEATURE_STRIDE,
                    left // FEATURE_STRIDE : (left + tile_width) // FEATURE_STRIDE,
                ]
                for top, left in chunk
            ])  # fmt: skip
        outputs = _forward(model, crops, precision=precision, masks=chunk_masks, guide=None)
        for (top, left), out in zip(chunk, outputs.split(images.shape[0]), strict=True):
            rows = slice(top, top + tile_height)
            cols = slice(left, left + tile_width)
            blended[..., rows, cols] += out * window
            weight[rows, cols] += window
    # In place: on a 12-megapixel photo every full-size copy costs 144 MB.
    return blended.div_(weight)[..., :height, :width].clamp_(0.0, 1.0)
