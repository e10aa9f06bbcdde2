"""Training losses: L1 plus a VGG16 perceptual loss (paper section 4, "Implementation").

The paper trains with "weighted combinations of L1 loss and perceptual loss" and does not
give the weight, so it is a parameter (and a search axis for the sweeps). The perceptual
loss compares frozen ImageNet VGG16 features (Johnson et al., ECCV 2016). VGG weights are
never downloaded here: the caller passes a local file, and a missing or unreadable file
fails at construction, not in the middle of a training run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models import vgg16

__all__ = [
    "VGG16_LAYERS",
    "VGG_WEIGHTS_HELP",
    "LossTerms",
    "EnhancementLoss",
    "VGGPerceptualLoss",
    "load_vgg16_features",
]

#: Index of each named ReLU in ``torchvision.models.vgg16().features``.
VGG16_LAYERS: dict[str, int] = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}

VGG_WEIGHTS_HELP = (
    "Pass torchvision's ImageNet VGG16 state dict 'vgg16-397923af.pth' (from "
    "https://download.pytorch.org/models/vgg16-397923af.pth, or the copy that "
    "torchvision.models.vgg16(weights='IMAGENET1K_V1') caches under "
    "~/.cache/torch/hub/checkpoints on a machine with internet access), or a .safetensors "
    "file holding its 'features.*' tensors."
)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights file not found: {path}. {VGG_WEIGHTS_HELP}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A corrupt file can make the weights-only unpickler fail with almost any exception type.
    except Exception as error:
        raise ValueError(
            f"cannot read VGG16 weights from {path}: {error}. {VGG_WEIGHTS_HELP}"
        ) from error
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a state dict. {VGG_WEIGHTS_HELP}"
        )
    return state


def load_vgg16_features(path: str | Path, *, last_layer: str = "relu3_3") -> nn.Sequential:
    """VGG16 ``features`` up to and including ``last_layer``, loaded from a local file, frozen.

    Only the ``features.*`` tensors the truncated network needs are read; missing keys or
    wrong shapes raise ``ValueError`` naming the file.
    """
    if last_layer not in VGG16_LAYERS:
        raise ValueError(f"last_layer must be one of {sorted(VGG16_LAYERS)}, got {last_layer!r}")
    path = Path(path)
    state = _read_state_dict(path)
    # Built on the meta device: random initialisation of 138M parameters would be wasted work.
    with torch.device("meta"):
        features = vgg16(weights=None).features[: VGG16_LAYERS[last_layer] + 1]
    wanted = {name: f"features.{name}" for name in features.state_dict()}
    missing = sorted(key for key in wanted.values() if not isinstance(state.get(key), Tensor))
    if missing:
        raise ValueError(
            f"{path} lacks VGG16 tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
            f"{VGG_WEIGHTS_HELP}"
        )
    try:
        features.load_state_dict(
            {name: state[key].float() for name, key in wanted.items()}, assign=True
        )
    except RuntimeError as error:
        raise ValueError(f"{path} does not hold VGG16 weights: {error}") from error
    return features.eval().requires_grad_(False)


class VGGPerceptualLoss(nn.Module):
    """Mean L1 distance between frozen VGG16 activations of prediction and target.

    Inputs are RGB in [0, 1]; ImageNet normalisation happens inside. The VGG stays in eval
    mode and without gradients for its own weights even when the parent module trains.
    """

    def __init__(
        self, vgg_weights: str | Path, *, layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3")
    ) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if not layers or unknown:
            raise ValueError(
                f"layers must be a non-empty subset of {sorted(VGG16_LAYERS)}, got {list(layers)}"
            )
        self.layers = tuple(sorted(layers, key=VGG16_LAYERS.__getitem__))
        self.features = load_vgg16_features(vgg_weights, last_layer=self.layers[-1])
        self._tap_indices = frozenset(VGG16_LAYERS[name] for name in self.layers)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        super().train(mode)
        self.features.eval()
        return self

    def _activations(self, image: Tensor) -> list[Tensor]:
        x = (image - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._tap_indices:
                taps.append(x)
        return taps

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        # One batched pass over both images halves the kernel launches.
        activations = self._activations(torch.cat([pred, target]))
        distances = [F.l1_loss(*tap.chunk(2)) for tap in activations]
        return torch.stack(distances).mean()


@dataclass(frozen=True)
class LossTerms:
    """The weighted total that is back-propagated, and its unweighted terms for logging."""

    total: Tensor
    l1: Tensor
    perceptual: Tensor


class EnhancementLoss(nn.Module):
    """``l1_weight * L1 + perceptual_weight * VGG perceptual`` (paper section 4).

    ``perceptual_weight > 0`` needs ``vgg_weights``, a local VGG16 file (see
    ``VGG_WEIGHTS_HELP``); with ``perceptual_weight == 0`` no VGG is built and the
    perceptual term is reported as zero.
    """

    def __init__(
        self,
        *,
        l1_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        vgg_weights: str | Path | None = None,
        perceptual_layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3"),
    ) -> None:
        super().__init__()
        if l1_weight < 0 or perceptual_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got l1_weight={l1_weight}, "
                f"perceptual_weight={perceptual_weight}"
            )
        if l1_weight == 0 and perceptual_weight == 0:
            raise ValueError("l1_weight and perceptual_weight are both 0: nothing to optimise")
        if perceptual_weight > 0 and vgg_weights is None:
            raise ValueError(
                f"perceptual_weight={perceptual_weight} needs vgg_weights. {VGG_WEIGHTS_HELP}"
            )
        self.l1_weight = l1_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual = (
            VGGPerceptualLoss(vgg_weights, layers=perceptual_layers)
            if perceptual_weight > 0
            else None
        )

    def forward(self, pred: Tensor, target: Tensor) -> LossTerms:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        l1 = F.l1_loss(pred, target)
        if self.perceptual is None:
            perceptual = l1.new_zeros(())
        else:
            perceptual = self.perceptual(pred, target)
        total = self.l1_weight * l1 + self.perceptual_weight * perceptual
        return LossTerms(total=total, l1=l1.detach(), perceptual=perceptual.detach())
