"""hdm_model.deform: our gather-and-matmul DCNv2 equals torchvision's deform_conv2d."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from hdm_model.deform import (
    gather_deform_conv3x3,
    implementation_for,
    modulated_deform_conv3x3,
)
from hdm_model.structure import DeformableBlock


def _inputs(
    *, offset_scale: float, dtype: torch.dtype = torch.float32, seed: int = 0, integer: bool = False
) -> tuple[torch.Tensor, ...]:
    """Features [2, 6, 9, 11], offsets, masks, a 6->5 kernel and bias, all requiring grad.
    Offsets of scale 4 send a large share of the samples outside the 9x11 image."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 6, 9, 11, generator=generator)
    offset = torch.randn(2, 18, 9, 11, generator=generator) * offset_scale
    if integer:
        offset = offset.round()
    mask = torch.rand(2, 9, 9, 11, generator=generator)
    weight = torch.randn(5, 6, 3, 3, generator=generator)
    bias = torch.randn(5, generator=generator)
    return tuple(t.to(dtype).requires_grad_() for t in (features, offset, mask, weight, bias))


def _reference(features, offset, mask, weight, bias):
    return deform_conv2d(features, offset, weight, bias, padding=1, mask=mask)


def _forward_and_grads(op, inputs, upstream):
    out = op(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream)


def _share_outside(offset: torch.Tensor) -> float:
    """Fraction of samples whose position lies outside the image."""
    height, width = offset.shape[-2:]
    tap = torch.arange(9)
    rows = torch.arange(height).view(1, 1, height, 1) + (tap // 3 - 1).view(1, 9, 1, 1)
    cols = torch.arange(width).view(1, 1, 1, width) + (tap % 3 - 1).view(1, 9, 1, 1)
    y = rows + offset.detach()[:, 0::2]
    x = cols + offset.detach()[:, 1::2]
    outside = (y < 0) | (y > height - 1) | (x < 0) | (x > width - 1)
    return outside.float().mean().item()


@pytest.mark.parametrize(
    ("offset_scale", "integer"),
    [(0.0, False), (0.7, False), (4.0, False), (1.5, True)],
    ids=["zero-offsets", "small", "mostly-outside", "integer-positions"],
)
def test_forward_and_backward_equal_torchvision_in_float64(
    offset_scale: float, integer: bool
) -> None:
    inputs = _inputs(offset_scale=offset_scale, dtype=torch.float64, integer=integer)
    upstream = torch.randn(
        2, 5, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    ours, our_grads = _forward_and_grads(gather_deform_conv3x3, inputs, upstream)
    reference, reference_grads = _forward_and_grads(_reference, inputs, upstream)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    # Including the offsets' gradient at integer positions and at exactly one pixel outside
    # the image, where the bilinear weights have kinks: the same one-sided slopes.
    for name, our_grad, reference_grad in zip(
        ("features", "offset", "mask", "weight", "bias"), our_grads, reference_grads, strict=True
    ):
        torch.testing.assert_close(our_grad, reference_grad, rtol=0, atol=1e-9, msg=name)


def test_forward_and_backward_equal_torchvision_in_float32_with_samples_outside() -> None:
    inputs = _inputs(offset_scale=4.0)
    assert 0.3 < _share_outside(inputs[1]) < 0.9  # zero padding is exercised, not just reached
    upstream = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(1))
    ours, our_grads = _forward_and_grads(gather_deform_conv3x3, inputs, upstream)
    reference, reference_grads = _forward_and_grads(_reference, inputs, upstream)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    for our_grad, reference_grad in zip(our_grads, reference_grads, strict=True):
        torch.testing.assert_close(our_grad, reference_grad, rtol=1e-4, atol=1e-3)


def test_offsets_pointing_far_outside_leave_only_the_bias_and_no_gradient() -> None:
    features, offset, mask, weight, bias = _inputs(offset_scale=0.0)
    far = torch.full_like(offset, 50.0).requires_grad_()
    inputs = (features, far, mask, weight, bias)
    ours = gather_deform_conv3x3(*inputs)
    torch.testing.assert_close(ours, _reference(*inputs))
    torch.testing.assert_close(ours, bias.detach().view(1, 5, 1, 1).expand_as(ours))
    feature_grad, offset_grad = torch.autograd.grad(ours.sum(), (features, far))
    assert feature_grad.abs().max() == 0 and offset_grad.abs().max() == 0


def test_bfloat16_forward_and_backward_match_the_float32_reference() -> None:
    # torchvision has no bfloat16 CPU kernel: the reference is float32 on the same
    # (bfloat16-representable) values.
    inputs = _inputs(offset_scale=2.0, dtype=torch.bfloat16)
    reference_inputs = tuple(t.detach().float().requires_grad_() for t in inputs)
    upstream = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(1))
    ours, our_grads = _forward_and_grads(gather_deform_conv3x3, inputs, upstream.bfloat16())
    reference, reference_grads = _forward_and_grads(_reference, reference_inputs, upstream)
    assert ours.dtype == torch.bfloat16
    assert all(grad.dtype == torch.bfloat16 for grad in our_grads)
    for name, value, expected in zip(
        ("output", "features", "offset", "mask", "weight", "bias"),
        (ours, *our_grads),
        (reference, *reference_grads),
        strict=True,
    ):
        # bfloat16 keeps 8 significant bits: errors of a few 2^-8 of the largest value.
        error = (value.float() - expected).abs().max() / expected.abs().max()
        assert error < 0.02, f"{name}: relative error {error:.4f}"


def test_channels_last_features_give_the_same_result_in_channels_last_memory() -> None:
    features, offset, mask, weight, bias = (t.detach() for t in _inputs(offset_scale=1.0))
    channels_last = features.contiguous(memory_format=torch.channels_last)
    out = gather_deform_conv3x3(channels_last, offset, mask, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, gather_deform_conv3x3(features, offset, mask, weight, bias))


def test_without_bias_and_with_a_batch_of_one() -> None:
    features, offset, mask, weight, _ = (
        t.detach()[:1] if t.dim() == 4 else t.detach() for t in _inputs(offset_scale=1.0)
    )
    torch.testing.assert_close(
        gather_deform_conv3x3(features, offset, mask, weight),
        deform_conv2d(features, offset, weight, padding=1, mask=mask),
        rtol=1e-5,
        atol=1e-4,
    )


def test_each_device_type_runs_its_measured_implementation() -> None:
    assert implementation_for("cpu") == "gather"
    assert (
        implementation_for(torch.device("cuda", 0)) == "torchvision"
    )  # not measured: the reference
    assert implementation_for("meta") == "torchvision"


def test_the_dispatcher_runs_the_named_implementation_and_checks_shapes() -> None:
    features, offset, mask, weight, bias = (t.detach() for t in _inputs(offset_scale=1.0))
    torchvision_out = modulated_deform_conv3x3(
        features, offset, mask, weight, bias, implementation="torchvision"
    )
    assert torch.equal(torchvision_out, _reference(features, offset, mask, weight, bias))
    assert torch.equal(
        modulated_deform_conv3x3(features, offset, mask, weight, bias),
        gather_deform_conv3x3(features, offset, mask, weight, bias),
    )
    with pytest.raises(ValueError, match="implementation must be one of torchvision, gather"):
        modulated_deform_conv3x3(features, offset, mask, weight, bias, implementation="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"offset must be shaped \[2, 18, 9, 11\]"):
        modulated_deform_conv3x3(features, offset[:, :9], mask, weight, bias)
    with pytest.raises(ValueError, match=r"weight must be shaped \[5, 6, 3, 3\]"):
        modulated_deform_conv3x3(features, offset, mask, weight[:, :3], bias)


def test_deformable_block_is_the_same_function_with_either_implementation() -> None:
    torch.manual_seed(0)
    block = DeformableBlock(8)
    torch.nn.init.normal_(block.offset_conv.weight, std=0.3)  # offsets far from the init zeros
    features = torch.randn(2, 8, 12, 10)
    results = {}
    for implementation in ("torchvision", "gather"):
        block.implementation = implementation
        block.zero_grad()
        out = block(features)
        out.square().sum().backward()
        results[implementation] = (out, [p.grad.clone() for p in block.parameters()])
    (reference, reference_grads), (ours, our_grads) = results["torchvision"], results["gather"]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    for our_grad, reference_grad in zip(our_grads, reference_grads, strict=True):
        torch.testing.assert_close(our_grad, reference_grad, rtol=1e-4, atol=1e-3)
