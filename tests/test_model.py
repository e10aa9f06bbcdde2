"""The HDM network: parameter counts, shapes, cascade orders, mask sources, training, CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hdm_model import HDM, VARIANTS, HDMConfig, build_hdm, hdm, hdm_b, hdm_f, variant_config
from hdm_model.blocks import AttentionResidualBlock, ChannelAttention, PixelAttention, ResidualGroup
from hdm_model.model import cascade_stages
from hdm_model.region import RegionDynamicBlock
from hdm_model.structure import DeformableBlock
from hdm_platform.cli.model import model as model_cli

TINY = {"channels": 16, "blocks_per_group": 1, "num_groups": 1}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_building_block_parameter_counts_match_the_reference_code() -> None:
    assert count(AttentionResidualBlock(64)) == 75_481
    assert count(ChannelAttention(64)) == 1_096
    assert count(PixelAttention(64)) == 529
    assert count(ResidualGroup(64, 9)) == 716_257
    assert count(DeformableBlock(64)) == 52_507
    assert count(RegionDynamicBlock(64, 5)) == 124_505
    assert count(RegionDynamicBlock(64, 5, learn_masks=True)) == 127_390


def test_network_parameter_counts_at_the_released_depth() -> None:
    # The reference measures 493,511 for B: its code also declares two adaptive-mixup scalars
    # (mix3, mix4) that forward never uses. They are left out here (unused parameters also
    # break DistributedDataParallel), so B and every variant are 2 below the reference.
    assert count(hdm_b(blocks_per_group=9)) == 493_511 - 2
    full = hdm(blocks_per_group=9)
    assert count(full) == 493_509 + 3 * 716_257 + 52_507 + 124_505
    assert round(count(full) / 1e6, 2) == 2.82


@pytest.mark.parametrize(
    ("variant", "paper_millions"),
    [("B", 0.49), ("B+FA", 2.19), ("B+FA+S", 2.24), ("HDM-F", 2.37), ("HDM", 2.32)],
)
def test_variant_parameter_counts_match_table_5(variant: str, paper_millions: float) -> None:
    network = VARIANTS[variant]()
    assert isinstance(network, HDM)
    assert abs(count(network) / 1e6 - paper_millions) / paper_millions < 0.03


def test_variants_switch_the_levels_on_one_by_one() -> None:
    b, b_fa, b_fa_s = (VARIANTS[name](**TINY) for name in ("B", "B+FA", "B+FA+S"))
    assert (b.groups, b.structure, b.region) == (None, None, None)
    assert b_fa.groups is not None and b_fa.structure is None
    assert b_fa_s.structure is not None and b_fa_s.region is None
    assert hdm_f(**TINY).region[0].guide_conv is not None
    assert hdm(**TINY).region[0].guide_conv is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_odd_sized_input_keeps_its_shape_and_eval_output_is_in_unit_range(variant: str) -> None:
    torch.manual_seed(0)
    network = VARIANTS[variant](**TINY).eval()
    image = torch.rand(2, 3, 37, 53)
    with torch.no_grad():
        out = network(image)
        assert out.shape == (2, 3, 37, 53)
        assert out.min() >= 0 and out.max() <= 1
        # A constant head puts channel 0 below 0 (clamped) and channel 1 at tanh(0.5).
        network.decoder.head[2].weight.zero_()
        network.decoder.head[2].bias.copy_(torch.tensor([-2.0, 0.5, 0.0]))
        constant = network(image)
    assert torch.equal(constant[:, 0], torch.zeros(2, 37, 53))
    assert torch.allclose(constant[:, 1], torch.tanh(torch.tensor(0.5)).expand(2, 37, 53))


def test_training_mode_returns_the_unclamped_tanh_output() -> None:
    torch.manual_seed(0)
    network = hdm_b(**TINY).train()
    with torch.no_grad():
        network.decoder.head[2].bias.fill_(-2.0)
    assert network(torch.rand(1, 3, 16, 16)).max() < 0


def test_region_masks_have_the_padded_feature_shape() -> None:
    network = hdm(**TINY, num_regions=3)
    masks = network.region_masks(torch.rand(2, 3, 37, 53))
    assert masks.shape == (2, 3, 1, 10, 14)
    assert torch.equal(masks.sum(dim=1), torch.ones(2, 1, 10, 14))


def test_precomputed_masks_give_the_same_output() -> None:
    torch.manual_seed(0)
    network = hdm(**TINY).eval()
    image = torch.rand(1, 3, 30, 22)
    with torch.no_grad():
        assert torch.equal(network(image), network(image, masks=network.region_masks(image)))


def test_masks_change_the_region_level_output() -> None:
    torch.manual_seed(0)
    network = hdm(**TINY, num_regions=2).train()  # unclamped output: differences cannot hide at 0
    image = torch.rand(1, 3, 32, 32)
    first_region = torch.zeros(1, 2, 1, 8, 8)
    first_region[:, 0] = 1
    with torch.no_grad():
        assert not torch.allclose(network(image, masks=first_region), network(image, masks=first_region.flip(1)))


def test_a_gradient_step_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    network = hdm(**TINY).train()
    hazy = torch.rand(2, 3, 16, 16) * 0.5 + 0.5
    clear = hazy * 0.6
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-4)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}

    def loss() -> torch.Tensor:
        return nn.functional.l1_loss(network(hazy), clear)

    initial = loss()
    initial.backward()
    optimiser.step()
    optimiser.zero_grad()
    loss().backward()
    optimiser.step()
    assert loss().item() < initial.item()
    changed = [name for name, p in network.named_parameters() if not torch.equal(p, before[name])]
    assert "region.0.filter_generator.body.3.weight" in changed
    assert "structure.0.deform_conv.weight" in changed
    assert "decoder.mix_quarter.weight" in changed


def _forward_backward(config: HDMConfig, *, guide: torch.Tensor | None = None) -> HDM:
    torch.manual_seed(0)
    network = build_hdm(config).train()
    image = torch.rand(2, 3, 20, 28)
    network(image, guide=guide).square().mean().backward()
    return network


def _parameters_without_gradient(network: HDM) -> list[str]:
    return [name for name, p in network.named_parameters() if p.grad is None]


@pytest.mark.parametrize("order", ["PSR", "PRS", "SRP", "SPR", "RPS", "RSP"])
def test_every_cascade_order_trains(order: str) -> None:
    network = _forward_backward(variant_config("HDM", **TINY, order=order))
    assert _parameters_without_gradient(network) == []


@pytest.mark.parametrize("num_regions", [2, 3, 8])
def test_any_region_count_trains(num_regions: int) -> None:
    network = _forward_backward(variant_config("HDM", **TINY, num_regions=num_regions))
    assert _parameters_without_gradient(network) == []


def test_learned_masks_get_a_gradient_through_the_softmax() -> None:
    network = _forward_backward(variant_config("HDM-F", **TINY))
    assert _parameters_without_gradient(network) == []
    assert network.region[0].guide_conv.weight.grad.abs().sum() > 0


def test_external_guide_masks_train_and_follow_the_guide() -> None:
    config = variant_config("HDM", **TINY, mask_source="external")
    guide = torch.linspace(0, 1, 28).expand(2, 1, 20, 28)
    network = _forward_backward(config, guide=guide)
    assert _parameters_without_gradient(network) == []
    masks = network.region_masks(torch.rand(2, 3, 20, 28), guide=guide)
    # Guide values rise to the right, so the left columns are the last region, the right the first.
    assert masks[0, -1, 0, :, 0].all() and masks[0, 0, 0, :, -1].all()
    with pytest.raises(ValueError, match="guide"):
        network(torch.rand(1, 3, 20, 28))


def test_separate_sr_weights_add_one_structure_and_region_block_per_repeat() -> None:
    shared = _forward_backward(variant_config("HDM", **TINY, sr_repeats=3))
    separate = _forward_backward(variant_config("HDM", **TINY, sr_repeats=3, share_sr_weights=False))
    assert _parameters_without_gradient(separate) == []
    per_repeat = count(DeformableBlock(16)) + count(RegionDynamicBlock(16, 5))
    assert count(separate) - count(shared) == 2 * per_repeat
    assert len(separate.structure) == len(separate.region) == 3


def test_cascade_follows_the_released_code_and_table_4() -> None:
    def letters(**overrides: object) -> str:
        return "".join(f"{stage}{index}" for stage, index in cascade_stages(variant_config("HDM", **overrides)))

    assert letters() == "P0S0R0S1R1"
    assert letters(order="PRS") == "P0R0S0R1S1"
    assert letters(order="SRP") == "S0R0S1R1P0"
    assert letters(order="SPR") == "S0P0R0S1R1"
    assert letters(order="RSP", sr_repeats=1) == "R0S0P0"
    assert letters(use_region=False) == "P0S0S1"


def test_config_round_trips_through_a_dict_and_rejects_bad_fields() -> None:
    config = variant_config("HDM-F", num_regions=3, order="SPR")
    assert HDMConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["input_mean"] == [0.64, 0.6, 0.58]
    with pytest.raises(ValueError, match="colour_space"):
        HDMConfig.from_dict({**config.to_dict(), "colour_space": "rgb"})
    with pytest.raises(ValueError, match="num_regions"):
        HDMConfig(num_regions=1)
    with pytest.raises(ValueError, match="order"):
        HDMConfig(order="PPP")
    with pytest.raises(ValueError, match="mask_source"):
        HDMConfig(mask_source="depth")
    with pytest.raises(ValueError, match="input_std"):
        HDMConfig(input_std=(0.1, 0.2))
    with pytest.raises(ValueError, match="channels"):
        HDMConfig(channels=20)
    with pytest.raises(ValueError, match="inference_tile must be a multiple of 4"):
        HDMConfig(inference_tile=30)
    assert HDMConfig(inference_tile_overlap=16).inference_tile is None  # unused: whole images
    for overlap in (30, 64):
        with pytest.raises(ValueError, match="inference_tile_overlap must be a multiple of 4 below"):
            HDMConfig(inference_tile=64, inference_tile_overlap=overlap)
    tiled = HDMConfig(inference_tile=64, inference_tile_overlap=48)
    assert HDMConfig.from_dict(tiled.to_dict()) == tiled
    older = {key: value for key, value in config.to_dict().items() if key != "inference_tile"}
    assert HDMConfig.from_dict(older).inference_tile is None  # checkpoints saved before the field


def test_variant_config_names_an_unknown_variant_or_field() -> None:
    with pytest.raises(ValueError, match="HDM-X"):
        variant_config("HDM-X")
    with pytest.raises(ValueError, match="width"):
        variant_config("HDM", width=3)
    assert variant_config("B", channels=32) == HDMConfig(
        channels=32, use_attention=False, use_structure=False, use_region=False
    )


def test_cli_summary_prints_components_and_total() -> None:
    result = CliRunner().invoke(model_cli, ["summary"])
    assert result.exit_code == 0, result.output
    assert "2,366,406" in result.output
    for component in ("encoder", "groups", "structure", "region", "decoder"):
        assert component in result.output
    assert "124,505" in result.output  # one shared DCP region block


def test_cli_summary_applies_yaml_overrides_with_or_without_prefix() -> None:
    result = CliRunner().invoke(
        model_cli, ["summary", "--variant", "HDM", "--set", "blocks_per_group=9", "--set", "model.share_sr_weights=false"]
    )
    assert result.exit_code == 0, result.output
    assert f"{2_819_292 + 52_507 + 124_505:,}" in result.output
    b = CliRunner().invoke(model_cli, ["summary", "--variant", "B"])
    assert "493,509" in b.output


def test_cli_summary_names_an_invalid_key() -> None:
    result = CliRunner().invoke(model_cli, ["summary", "--set", "model.depth=3"])
    assert result.exit_code != 0
    assert "depth" in result.output
    bad_value = CliRunner().invoke(model_cli, ["summary", "--set", "order=XYZ"])
    assert bad_value.exit_code != 0 and "order" in bad_value.output
