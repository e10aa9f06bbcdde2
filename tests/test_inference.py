"""Fast (channels_last, folded head, bfloat16, compiled) and tiled inference."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdm_model import HDM, enhance, hdm, hdm_f, inference, prepare_for_inference, variant_config
from hdm_model.model import build_hdm
from hdm_model.inference import FoldedHead, resolve_precision
from hdm_model.region import RegionDynamicBlock
from hdm_model.structure import DeformableBlock

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
    with torch.no_grad():  # one-hot masks, no gradient: each pixel runs only its own filter
        assert torch.allclose(block(features, masks), expected, atol=1e-5)


def test_region_filters_by_pixel_equal_the_masked_sum_in_every_case() -> None:
    torch.manual_seed(0)
    block = RegionDynamicBlock(8, 4).eval()
    features = torch.randn(3, 8, 9, 13).contiguous(memory_format=torch.channels_last)
    regions = torch.randint(0, 4, (3, 9, 13))
    regions[1] = 2  # an image where all but one region are empty
    one_hot = F.one_hot(regions, 4).permute(0, 3, 1, 2).unsqueeze(2).float()
    soft = torch.rand(3, 4, 1, 9, 13).softmax(dim=1)
    # With gradients on: the masked sum of all N responses.
    expected, expected_soft = block(features, one_hot), block(features, soft)
    with torch.no_grad():
        assert torch.allclose(block(features, one_hot), expected, atol=1e-5)
        # Masks that are not one-hot still get the masked sum, not their argmax.
        assert torch.allclose(block(features, soft), expected_soft, atol=1e-6)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low_precision = block(features, one_hot)
    assert low_precision.dtype == torch.bfloat16
    assert psnr_like(low_precision.float(), expected) > 35


def psnr_like(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR over the range of ``b`` (features are not images in [0, 1])."""
    return (10 * torch.log10((b.max() - b.min()) ** 2 / F.mse_loss(a, b))).item()


def test_auto_precision_is_bfloat16_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "_cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": True})
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    # AMD's AVX512_BF16 (Zen 4 and later) is fast without AMX; without the flag it is not there.
    monkeypatch.setattr(inference, "_cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert resolve_precision("auto", "cpu") == "fp32"
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


def test_fast_path_matches_the_plain_forward(network: HDM) -> None:
    image = smooth_photo(48, 64)
    with torch.no_grad():
        plain = network(image.contiguous())
    assert torch.allclose(enhance(network, image), plain, atol=1e-5)


def test_bfloat16_output_is_close_to_float32(network: HDM) -> None:
    image = smooth_photo(48, 64)
    assert psnr(enhance(network, image, precision="bf16"), enhance(network, image)) >= 40


def test_deformable_conv_runs_in_float32_under_bfloat16_autocast() -> None:
    block = DeformableBlock(16)
    features = torch.rand(1, 16, 12, 12)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = block(features.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, block(features), atol=0.05)


@pytest.mark.parametrize(("height", "width"), [(150, 190), (97, 130)])
def test_tiled_output_matches_the_whole_image(network: HDM, height: int, width: int) -> None:
    image = smooth_photo(height, width)
    tiled = enhance(network, image, tile=96, tile_overlap=32)
    assert tiled.shape == (1, 3, height, width)
    assert psnr(tiled, enhance(network, image)) >= 40


def test_a_tile_larger_than_the_image_is_the_untiled_run(network: HDM) -> None:
    image = smooth_photo(37, 53)
    assert torch.allclose(enhance(network, image, tile=64), enhance(network, image), atol=1e-6)


def test_tile_for_takes_the_callers_tile_then_the_models_then_the_memory_rule() -> None:
    assert inference.tile_for(100, 120, model_tile=64) == 64
    assert inference.tile_for(64, 60, model_tile=64) is None  # fits in one tile: whole
    assert inference.tile_for(100, 120, 0, model_tile=64) is None
    assert inference.tile_for(100, 120, 32, model_tile=64) == 32
    assert inference.tile_for(100, 120) is None
    assert inference.tile_for(1100, 1000) == inference.DEFAULT_TILE


def test_the_models_own_overlap_goes_with_its_own_tile(network: HDM) -> None:
    own = copy.copy(network)
    own.config = dataclasses.replace(network.config, inference_tile=64, inference_tile_overlap=48)
    assert inference.overlap_for(64, own.config) == 48
    assert inference.overlap_for(96, own.config) == inference.DEFAULT_TILE_OVERLAP == 32
    assert inference.overlap_for(64, network.config) == 32  # no overlap of its own
    image = smooth_photo(150, 190)
    by_default = enhance(own, image, tile=64)
    assert torch.equal(by_default, enhance(own, image, tile=64, tile_overlap=48))
    assert not torch.equal(by_default, enhance(own, image, tile=64, tile_overlap=32))
    assert torch.equal(enhance(own, image, tile=96), enhance(own, image, tile=96, tile_overlap=32))


def test_small_tiles_run_batched_as_they_would_one_at_a_time(
    network: HDM, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = torch.cat([smooth_photo(150, 190), smooth_photo(150, 190).flip(-1)])
    forwards: list[int] = []
    original = inference._forward

    def counting(model: HDM, crops: torch.Tensor, **kwargs: object) -> torch.Tensor:
        forwards.append(crops.shape[0])
        return original(model, crops, **kwargs)

    monkeypatch.setattr(inference, "_forward", counting)
    batched = enhance(network, images, tile=64, tile_overlap=16)
    assert forwards == [2 * 12]  # 3 x 4 tiles of both images in one forward
    forwards.clear()
    monkeypatch.setattr(inference, "DEFAULT_TILE", 64)  # room for one tile per forward
    one_at_a_time = enhance(network, images, tile=64, tile_overlap=16)
    assert forwards == [2] * 12
    assert torch.allclose(batched, one_at_a_time, atol=1e-5)


def test_tiles_share_the_whole_image_masks(network: HDM, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = type(network).region_masks

    def counting(self: HDM, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return original(self, x, **kwargs)

    monkeypatch.setattr(type(network), "region_masks", counting)
    enhance(network, smooth_photo(150, 190), tile=64, tile_overlap=16)
    assert calls == [(1, 3, 150, 190)]


def test_tiled_external_guide_and_learned_masks_run() -> None:
    torch.manual_seed(0)
    image = smooth_photo(100, 120)
    guided = prepare_for_inference(build_hdm(variant_config("HDM", **TINY, mask_source="external")), device="cpu")
    guide = torch.linspace(0, 1, 120).expand(1, 1, 100, 120)
    whole = enhance(guided, image, guide=guide)
    assert torch.allclose(enhance(guided, image, guide=guide, tile=64, tile_overlap=16), whole, atol=0.02)
    learned = prepare_for_inference(hdm_f(**TINY), device="cpu")
    assert enhance(learned, image, tile=64, tile_overlap=16, precision="bf16").shape == (1, 3, 100, 120)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tile": 30}, "tile must"),
        ({"tile": 64, "tile_overlap": 6}, "tile_overlap"),
        ({"tile": 64, "tile_overlap": 64}, "tile_overlap"),
        ({"precision": "fp16"}, "precision"),
    ],
)
def test_bad_options_are_rejected(network: HDM, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        enhance(network, smooth_photo(32, 32), **options)


def test_integer_images_are_rejected(network: HDM) -> None:
    with pytest.raises(ValueError, match="float"):
        enhance(network, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
