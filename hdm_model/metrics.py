"""Full-reference image metrics computed the way enhancement benchmarks compute them.

The paper reports PSNR / SSIM "tested on the RGB color space" (section 4). Benchmark code
(BasicSR and the dehazing/deraining repositories built on it) first clamps outputs to
[0, 1] and quantises them to 8 bits, and measures with a data range of 255; SSIM uses an
11x11 Gaussian window with sigma 1.5 and K1 = 0.01, K2 = 0.03 (Wang et al., 2004), averaged
over channels. The ``y_channel`` variants measure the BT.601 luma of MATLAB's
``rgb2ycbcr`` (``16 + 65.481 R + 128.553 G + 24.966 B``), BasicSR's ``test_y_channel``.

Identical images have zero error, so their PSNR is ``+inf`` (as in BasicSR and
scikit-image); callers that average PSNR over a data set should count or cap such images.

SSIM is computed here rather than by torchmetrics' ``structural_similarity_index_measure``,
which stays the reference the tests compare with (to 1e-6): the Gaussian window is
separable, and two 1-D depthwise convolutions over the valid interior are 3-6x faster on CPU
than its 11x11 convolution of a reflection-padded image, which validation pays every epoch
(``bench/metrics.py``). The same two passes over a batch of one-channel images instead of
one image of many channels were slower than torchmetrics (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

__all__ = ["quantize", "rgb_to_y", "psnr", "ssim", "ssim_reference", "image_metrics"]

_DATA_RANGE = 255.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
_SSIM_SIGMA = 1.5
# The Gaussian window of torchmetrics, BasicSR and scikit-image for sigma 1.5:
# 2 * int(3.5 * sigma + 0.5) + 1 = 11 pixels.
_SSIM_WINDOW = 11
_SSIM_C1 = (0.01 * _DATA_RANGE) ** 2
_SSIM_C2 = (0.03 * _DATA_RANGE) ** 2


def quantize(image: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, returned as float32 in [0, 255].

    Float32 keeps SSIM within 1e-4 and PSNR within 1e-5 dB of float64 references (the
    benchmarks report 3 and 2 decimals); float64 convolutions take 10x the CPU time.
    """
    return image.detach().float().clamp(0.0, 1.0).mul(_DATA_RANGE).round()


def rgb_to_y(image: Tensor) -> Tensor:
    """BT.601 luma in [16, 235] of an RGB batch in [0, 255]: ``[B, 3, H, W] -> [B, 1, H, W]``."""
    weights = image.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (image / _DATA_RANGE * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def _prepare(pred: Tensor, target: Tensor, y_channel: bool) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected RGB batches shaped [B, 3, H, W], got {tuple(pred.shape)}")
    pred, target = quantize(pred), quantize(target.to(pred.device))
    if y_channel:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    return pred, target


def psnr(pred: Tensor, target: Tensor, *, y_channel: bool = False) -> Tensor:
    """Per-image PSNR in dB, ``[B]``; ``+inf`` where an image equals its target."""
    pred, target = _prepare(pred, target, y_channel)
    return peak_signal_noise_ratio(
        pred, target, data_range=_DATA_RANGE, reduction="none", dim=(1, 2, 3)
    )


def ssim(pred: Tensor, target: Tensor, *, y_channel: bool = False) -> Tensor:
    """Per-image SSIM (Gaussian 11x11, sigma 1.5, mean over channels), ``[B]``.

    Averaged over the pixels whose whole window lies inside the image, as BasicSR and
    scikit-image do; torchmetrics' own mean also counts a reflection-padded border.
    """
    pred, target = _prepare(pred, target, y_channel)
    if min(pred.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels, "
            f"got {tuple(pred.shape[-2:])}"
        )
    batch, channels, height, width = pred.shape
    maps = 5 * batch * channels
    # Local means of the five maps as the channels of one image: a depthwise convolution.
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target]).reshape(1, maps, height, width)
    window = _gaussian_window(pred)
    stacked = F.conv2d(stacked, window.view(1, 1, -1, 1).expand(maps, 1, -1, 1), groups=maps)
    stacked = F.conv2d(stacked, window.view(1, 1, 1, -1).expand(maps, 1, 1, -1), groups=maps)
    valid = (height - _SSIM_WINDOW + 1, width - _SSIM_WINDOW + 1)
    mu_pred, mu_target, pred_sq, target_sq, products = stacked.view(5, batch, channels, *valid)
    sigma_pred_sq = pred_sq - mu_pred * mu_pred
    sigma_target_sq = target_sq - mu_target * mu_target
    sigma_both = products - mu_pred * mu_target
    similarity = ((2 * mu_pred * mu_target + _SSIM_C1) * (2 * sigma_both + _SSIM_C2)) / (
        (mu_pred * mu_pred + mu_target * mu_target + _SSIM_C1) * (sigma_pred_sq + sigma_target_sq + _SSIM_C2)
    )
    return similarity.mean(dim=(1, 2, 3))


def ssim_reference(pred: Tensor, target: Tensor, *, y_channel: bool = False) -> Tensor:
    """torchmetrics' SSIM averaged over the same valid interior: what :func:`ssim` is tested
    against and timed against (``bench/metrics.py``)."""
    pred, target = _prepare(pred, target, y_channel)
    _, similarity_map = structural_similarity_index_measure(
        pred, target, gaussian_kernel=True, sigma=_SSIM_SIGMA, data_range=_DATA_RANGE, k1=0.01, k2=0.03,
        reduction="none", return_full_image=True,
    )  # fmt: skip
    border = _SSIM_WINDOW // 2
    return similarity_map[..., border:-border, border:-border].mean(dim=(1, 2, 3))


def _gaussian_window(like: Tensor) -> Tensor:
    """The normalised 1-D Gaussian of :data:`_SSIM_WINDOW` taps, ``like``'s dtype and device."""
    offsets = torch.arange(_SSIM_WINDOW, dtype=like.dtype, device=like.device) - (_SSIM_WINDOW - 1) / 2
    window = torch.exp(-0.5 * (offsets / _SSIM_SIGMA) ** 2)
    return window / window.sum()


def image_metrics(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """``psnr``, ``ssim``, ``psnr_y`` and ``ssim_y``, each a per-image ``[B]`` tensor."""
    return {
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
        "psnr_y": psnr(pred, target, y_channel=True),
        "ssim_y": ssim(pred, target, y_channel=True),
    }
