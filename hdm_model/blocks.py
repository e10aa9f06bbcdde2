"""Static building blocks of HDM: encoder, channel-spatial level (P), decoder.

Paper section 3 (encoder-decoder with adaptive mixup skips) and section 3.1 (channel and
pixel attention, Eqs. 3-4, after FFA-Net). Shapes follow the released code: every
convolution has ``channels`` filters and a bias, activations are ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "conv3x3",
    "ChannelAttention",
    "PixelAttention",
    "AttentionResidualBlock",
    "ResidualGroup",
    "ChannelSpatialLevel",
    "Encoder",
    "AdaptiveMixup",
    "UpStep",
    "Decoder",
]

_ATTENTION_REDUCTION = 8


def conv3x3(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with "same" padding and a bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class ChannelAttention(nn.Module):
    """Channel-level dynamics (Eq. 3): global average pool, squeeze to C/8, sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Sequential(
            nn.Conv2d(channels, channels // _ATTENTION_REDUCTION, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // _ATTENTION_REDUCTION, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.pool(x))


class PixelAttention(nn.Module):
    """Spatial-level dynamics (Eq. 4): a per-pixel sigmoid gate shared by all channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(channels, channels // _ATTENTION_REDUCTION, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // _ATTENTION_REDUCTION, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class AttentionResidualBlock(nn.Module):
    """conv, ReLU, +x, conv, channel attention, pixel attention, +x (section 3.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.channel_attention = ChannelAttention(channels)
        self.pixel_attention = PixelAttention(channels)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.act(self.conv1(x)) + x
        residual = self.pixel_attention(self.channel_attention(self.conv2(residual)))
        return residual + x


class ResidualGroup(nn.Module):
    """``num_blocks`` attention residual blocks and a 3x3 conv under one group skip."""

    def __init__(self, channels: int, num_blocks: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *(AttentionResidualBlock(channels) for _ in range(num_blocks)),
            conv3x3(channels, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ChannelSpatialLevel(nn.Sequential):
    """The P stage: ``num_groups`` residual groups followed by a ReLU."""

    def __init__(self, channels: int, *, num_groups: int, blocks_per_group: int) -> None:
        super().__init__(
            *(ResidualGroup(channels, blocks_per_group) for _ in range(num_groups)),
            nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    """5x5 stem, then two [3x3 conv, 3x3 stride-2 conv, ReLU] down-steps.

    Returns the 1/4-resolution features and the 1/2 and 1/4 skips for the decoder.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 5, padding=2), nn.ReLU(inplace=True))
        self.down1 = self._down_step(channels)
        self.down2 = self._down_step(channels)

    @staticmethod
    def _down_step(channels: int) -> nn.Sequential:
        return nn.Sequential(
            conv3x3(channels, channels), conv3x3(channels, channels, stride=2), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = self.down1(self.stem(x))
        quarter = self.down2(half)
        return quarter, half


class AdaptiveMixup(nn.Module):
    """``sigmoid(w) * skip + (1 - sigmoid(w)) * x`` with one learned scalar ``w`` (AECR-Net)."""

    def __init__(self, initial_weight: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([initial_weight]))

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        mix = torch.sigmoid(self.weight).to(x.dtype)
        return mix * skip + (1 - mix) * x


class UpStep(nn.Sequential):
    """4x4 stride-2 transposed conv, then a 2x2 average over a (1,0,1,0) reflection pad, ReLU.

    The pad-and-average smooths the checkerboard pattern of the transposed convolution.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1),
            nn.ReflectionPad2d((1, 0, 1, 0)),
            nn.AvgPool2d(2, stride=1),
            nn.ReLU(inplace=True),
        )


class Decoder(nn.Module):
    """Mixup with the 1/4 skip, up, mixup with the 1/2 skip, up, three 5x5 convs, Tanh."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.mix_quarter = AdaptiveMixup(-1.0)
        self.up1 = UpStep(channels)
        self.mix_half = AdaptiveMixup(-0.6)
        self.up2 = UpStep(channels)
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 5, padding=2),
            nn.Conv2d(channels, channels, 5, padding=2),
            nn.Conv2d(channels, out_channels, 5, padding=2),
            nn.Tanh(),
        )

    def forward(self, x: Tensor, quarter_skip: Tensor, half_skip: Tensor) -> Tensor:
        x = self.up1(self.mix_quarter(quarter_skip, x))
        x = self.up2(self.mix_half(half_skip, x))
        return self.head(x)
