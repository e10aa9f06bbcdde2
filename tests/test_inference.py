"""Fast (channels_last, folded head, bfloat16, compiled) and tiled inference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from torch import nn
from torchvision.ops import deform_conv2d

from hdm_model import HDM, enhance, hdm, hdm_f, prepare_for_inference, variant_config
from hdm_model.hdm import build_hdm
from hdm_model.inference import FoldedHead, resolve_precision
from hdm_model.region import RegionDynamicBlock
from hdm_model.structure import DeformableBlock, modulated_deform_conv3x3

TINY = {"channels": 16, "blocks_per_group": 1, "num_groups": 1}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / F.mse_loss(a, b))).item()


def spread_output(network: HDM) -> HDM:
    """A random-init network whose output varies over most of [0, 1] instead of sitting at 0,
    so that output comparisons are not trivially close."""
    with torch.no_grad():
        network.decoder.head[2].weight.mul_(20)
        network.decoder.head[2].bias.fill_(0.55)
    return network


def smooth_photo(height: int, width: int) -> torch.Tensor:
    torch.manual_seed(1)
    coarse = torch.rand(1, 3, 6, 8)
    return F.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1) * 0.8 + torch.rand(
        1, 3, height, width
    ) * 0.2


@pytest.fixture(scope="module")
def network() -> HDM:
    torch.manual_seed(0)
    return prepare_for_inference(spread_output(hdm(**TINY)), device="cpu")


def test_enhance_returns_float32_in_unit_range_with_the_input_shape(network: HDM) -> None:
    out = enhance(network, smooth_photo(37, 53))
    assert out.shape == (1, 3, 37, 53) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05  # the comparisons below compare real images, not constants


def test_prepare_for_inference_sets_eval_mode_and_channels_last_and_keeps_the_state_dict() -> None:
    plain = hdm(**TINY)
    network = prepare_for_inference(copy.deepcopy(plain).train(), device=torch.device("cpu"))
    assert not network.training and not network.decoder.head.training
    assert isinstance(network.decoder.head, FoldedHead)
    assert network.encoder.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert network.state_dict().keys() == plain.state_dict().keys()


def test_folded_head_matches_the_unfolded_network() -> None:
    torch.manual_seed(0)
    plain = spread_output(hdm(**TINY)).eval()
    folded = prepare_for_inference(copy.deepcopy(plain), device="cpu")
    for height, width in [(64, 96), (52, 44), (37, 53)]:
        image = smooth_photo(height, width)
        with torch.no_grad():
            reference = plain(image)
        assert torch.allclose(enhance(folded, image), reference, atol=1e-5)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 5, padding=2),
        nn.Conv2d(channels, channels, 5, padding=2),
        nn.Conv2d(channels, 3, 5, padding=2),
        nn.Tanh(),
    )


@pytest.mark.parametrize(
    ("height", "width"),
    [(32, 36), (40, 24), (30, 33), (12, 16)],  # folded; folded; not whole blocks; too small
)
def test_folded_head_equals_the_three_convs_including_the_border(height: int, width: int) -> None:
    torch.manual_seed(0)
    head = _head(8).eval()
    folded = FoldedHead(copy.deepcopy(head)).eval()
    features = torch.randn(2, 8, height, width)
    with torch.no_grad():
        reference = head(features)
        assert torch.allclose(folded(features), reference, atol=1e-5)
        channels_last = features.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(folded(channels_last), reference, atol=1e-5)


def test_folded_head_follows_weight_changes_and_trains_unfolded() -> None:
    torch.manual_seed(0)
    head = _head(8).eval()
    folded = FoldedHead(copy.deepcopy(head)).eval()
    features = torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        folded(features)  # caches the folded kernel
        for module in (head, folded):
            module[1].weight.mul_(-2)
            module[2].bias.add_(0.3)
        assert torch.allclose(folded(features), head(features), atol=1e-5)
    folded.train()
    output = folded(features)
    output.sum().backward()
    assert folded[0].weight.grad is not None
    assert torch.allclose(output, head(features), atol=1e-6)


def test_folded_head_rejects_heads_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match="FoldedHead"):
        FoldedHead(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Tanh()))


def test_deformable_conv_matches_torchvision_including_out_of_image_samples() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 6, 9, 11, requires_grad=True)
    offset = (torch.randn(2, 18, 9, 11) * 4).requires_grad_()  # many samples fall outside
    modulation = torch.rand(2, 9, 9, 11, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    inputs = (features, offset, modulation, weight, bias)
    ours = modulated_deform_conv3x3(features, offset, modulation, weight, bias)
    reference = deform_conv2d(features, offset, weight, bias, padding=1, mask=modulation)
    assert torch.allclose(ours, reference, atol=1e-5)
    our_grads = torch.autograd.grad(ours.square().sum(), inputs)
    reference_grads = torch.autograd.grad(reference.square().sum(), inputs)
    for ours_grad, reference_grad in zip(our_grads[:1] + our_grads[2:], reference_grads[:1] + reference_grads[2:]):
        assert torch.allclose(ours_grad, reference_grad, atol=1e-3, rtol=1e-4)
    # Offsets: equal except at samples exactly on an integer grid line, where the bilinear
    # weights have a kink and the two implementations pick different one-sided slopes.
    assert torch.isclose(our_grads[1], reference_grads[1], atol=1e-3, rtol=1e-4).float().mean() > 0.999


def test_region_block_equals_the_masked_sum_of_all_region_filters() -> None:
    torch.manual_seed(0)
    block = RegionDynamicBlock(8, 3)
    features = torch.randn(2, 8, 10, 12)
    masks = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 10, 12)), 3).permute(0, 3, 1, 2).unsqueeze(2).float()
    kernels = block.filter_generator(features)
    expected = torch.stack(
        [
            sum(
                masks[b, r] * F.conv2d(features[b : b + 1], kernels[b, r], padding=1)[0]
                for r in range(3)
            )
            for b in range(2)
        ]
    )
    assert torch.allclose(block(features, masks), expected, atol=1e-5)


def test_auto_precision_is_bfloat16_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": True})
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda:0") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")  # type: ignore[arg-type]


def test_compiled_fast_path_matches_eager() -> None:
    # One shape only: each inductor compile costs tens of seconds on a 2-core CPU.
    torch.manual_seed(0)
    eager = prepare_for_inference(spread_output(hdm(**TINY)), device="cpu")
    compiled = prepare_for_inference(copy.deepcopy(eager), device="cpu", compile=True)
    image = smooth_photo(48, 64)
    assert torch.allclose(enhance(compiled, image), enhance(eager, image), atol=1e-4)
