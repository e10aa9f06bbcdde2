"""The HDM network (paper section 3, Fig. 2) and the Table 5 variants.

Encoder -> hierarchical dynamic stages at 1/4 resolution -> decoder with adaptive mixup
skips. The stages are the channel-spatial level P (attention residual groups), the
structure level S (deformable conv) and the region level R (DCP-guided dynamic filters),
cascaded in ``config.order``; S and R run ``config.sr_repeats`` times (S, R, S, R in the
released code), with shared or separate weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdm_model.blocks import ChannelSpatialLevel, Decoder, Encoder
from hdm_model.config import FEATURE_STRIDE, HDMConfig, variant_config
from hdm_model.masks import bin_into_regions, dcp_region_masks, downscale
from hdm_model.region import RegionDynamicBlock
from hdm_model.structure import DeformableBlock

__all__ = [
    "HDM",
    "FEATURE_STRIDE",
    "VARIANTS",
    "build_hdm",
    "cascade_stages",
    "hdm",
    "hdm_b",
    "hdm_b_fa",
    "hdm_b_fa_s",
    "hdm_f",
    "pad_to_multiple",
    "variant_config",
]



def pad_to_multiple(x: Tensor, multiple: int = FEATURE_STRIDE) -> Tensor:
    """Pad the bottom and right of ``x`` to a multiple of ``multiple`` (reflect, or replicate
    where the image is too small to reflect)."""
    height, width = x.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if not (pad_bottom or pad_right):
        return x
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    return F.pad(x, (0, pad_right, 0, pad_bottom), mode=mode)


def cascade_stages(config: HDMConfig) -> list[tuple[str, int]]:
    """The stage sequence as ``(stage, repeat_index)``, e.g. PSR with 2 repeats ->
    P0 S0 R0 S1 R1.

    When S and R are adjacent in ``order`` their pair is repeated in place (PRS -> P RS RS,
    SRP -> SR SR P); when P separates them (SPR, RPS) the three stages run in order and the
    S-R pair follows for the remaining repeats (SPR -> S P R S R). Disabled levels drop out.
    """
    order = config.order
    pair = "".join(stage for stage in order if stage != "P")
    repeats = config.sr_repeats
    if pair in order:
        head, tail = order.split(pair)
        letters = head + pair * repeats + tail
    else:
        letters = order + pair * (repeats - 1)
    enabled = {
        "P": config.use_attention,
        "S": config.use_structure,
        "R": config.use_region,
    }
    sequence: list[tuple[str, int]] = []
    seen = {"S": 0, "R": 0}
    for stage in letters:
        if stage == "P":
            index = 0
        else:
            index = seen[stage]
            seen[stage] += 1
        if enabled[stage]:
            sequence.append((stage, index))
    return sequence


class HDM(nn.Module):
    """Hierarchical dynamic mechanism network for image enhancement (dehaze, derain, low light).

    ``forward`` takes RGB in [0, 1] of any size (padded to a multiple of 4 and cropped back)
    and returns the enhanced image: the Tanh output in training mode, clamped to [0, 1] in
    eval mode.
    """

    def __init__(self, config: HDMConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.channels
        num_sr_modules = 1 if config.share_sr_weights else config.sr_repeats
        self.encoder = Encoder(config.in_channels, channels)
        self.groups = (
            ChannelSpatialLevel(
                channels, num_groups=config.num_groups, blocks_per_group=config.blocks_per_group
            )
            if config.use_attention
            else None
        )
        self.structure = (
            nn.ModuleList(DeformableBlock(channels) for _ in range(num_sr_modules))
            if config.use_structure
            else None
        )
        self.region = (
            nn.ModuleList(
                RegionDynamicBlock(
                    channels, config.num_regions, learn_masks=config.mask_source == "learned"
                )
                for _ in range(num_sr_modules)
            )
            if config.use_region
            else None
        )
        self.decoder = Decoder(channels, config.in_channels)
        self.stages = cascade_stages(config)
        self.register_buffer(
            "input_mean", torch.tensor(config.input_mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(config.input_std).view(1, -1, 1, 1), persistent=False
        )

    @property
    def needs_image_masks(self) -> bool:
        """Whether the region stage takes masks computed from the image (DCP or a guide)."""
        return self.config.use_region and self.config.mask_source != "learned"

    def region_masks(self, x: Tensor, *, guide: Tensor | None = None) -> Tensor:
        """One-hot region masks ``[B, N, 1, ceil(H/4), ceil(W/4)]`` for an input batch.

        DCP masks come from ``x``; external masks bin ``guide`` ``[B, 1, H, W]`` in [0, 1].
        Learned masks depend on the features and cannot be computed from the image.
        """
        config = self.config
        if config.mask_source == "learned":
            raise ValueError("mask_source 'learned' predicts masks from the features, not the image")
        # The priors need float32 statistics even when the network runs under autocast.
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            if config.mask_source == "dcp":
                return dcp_region_masks(
                    pad_to_multiple(x.float()), scale=FEATURE_STRIDE, **config.dcp_mask_settings()
                )
            if guide is None:
                raise ValueError("mask_source 'external' needs a guide map [B, 1, H, W]")
            if guide.dim() != 4 or guide.shape[1] != 1 or guide.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"guide must be shaped [B, 1, {x.shape[-2]}, {x.shape[-1]}], got {list(guide.shape)}"
                )
            small = downscale(pad_to_multiple(guide.float()), FEATURE_STRIDE)
            return bin_into_regions(small, config.num_regions)

    def forward(
        self, x: Tensor, *, masks: Tensor | None = None, guide: Tensor | None = None
    ) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"input must be shaped [B, {self.config.in_channels}, H, W], got {list(x.shape)}"
            )
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x)
        if masks is None and self.needs_image_masks:
            masks = self.region_masks(x, guide=guide)
        if masks is not None:
            masks = masks.to(device=x.device)
        network_input = (padded - self.input_mean) / self.input_std if self.config.normalize_input else padded
        quarter_skip, half_skip = self.encoder(network_input)
        features = self._dynamic_stages(quarter_skip, masks)
        out = self.decoder(features, quarter_skip, half_skip)[..., :height, :width]
        return out if self.training else out.clamp(0.0, 1.0)

    def _dynamic_stages(self, features: Tensor, masks: Tensor | None) -> Tensor:
        for stage, repeat in self.stages:
            if stage == "P":
                features = self.groups(features)
            elif stage == "S":
                features = self.structure[repeat % len(self.structure)](features)
            else:
                features = self.region[repeat % len(self.region)](features, masks)
        return features


def build_hdm(config: HDMConfig) -> HDM:
    """The network described by ``config``."""
    return HDM(config)


def hdm_b(**overrides: object) -> HDM:
    """Table 5 "B": encoder-decoder only (0.49M parameters)."""
    return HDM(variant_config("B", **overrides))


def hdm_b_fa(**overrides: object) -> HDM:
    """Table 5 "B+FA": with the channel-spatial attention groups (2.19M)."""
    return HDM(variant_config("B+FA", **overrides))


def hdm_b_fa_s(**overrides: object) -> HDM:
    """Table 5 "B+FA+S": with the deformable structure block (2.24M)."""
    return HDM(variant_config("B+FA+S", **overrides))


def hdm_f(**overrides: object) -> HDM:
    """Table 5 "HDM-F": region block with DRConv's learned masks (2.37M)."""
    return HDM(variant_config("HDM-F", **overrides))


def hdm(**overrides: object) -> HDM:
    """Table 5 "HDM": the full model with DCP-guided region masks (2.32M in the paper)."""
    return HDM(variant_config("HDM", **overrides))


VARIANTS: dict[str, Callable[..., HDM]] = {
    "B": hdm_b,
    "B+FA": hdm_b_fa,
    "B+FA+S": hdm_b_fa_s,
    "HDM-F": hdm_f,
    "HDM": hdm,
}
