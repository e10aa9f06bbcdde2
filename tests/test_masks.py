"""DCP-guided region masks: one-hot, complete, binned as the released code, batched, coherent."""

from __future__ import annotations


import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from hdm_model import bin_into_regions, compute_dcp_maps, dcp_region_masks
from realworld import REALWORLD

SOTS_HAZY = REALWORLD / "dehaze" / "SOTS-indoor" / "hazy"


def hazy_scene(height: int = 64, width: int = 96) -> torch.Tensor:
    """A textured scene whose haze thickens from left (clear) to right (white-out)."""
    torch.manual_seed(0)
    scene = torch.rand(1, 3, height, width) * 0.6
    haze = torch.linspace(0.0, 0.95, width).view(1, 1, 1, width)
    return scene * (1 - haze) + haze


@pytest.mark.parametrize("mode", ["transmission", "dark_channel"])
@pytest.mark.parametrize("num_regions", [2, 5, 8])
def test_masks_are_one_hot_and_cover_every_pixel(mode: str, num_regions: int) -> None:
    masks = dcp_region_masks(torch.rand(3, 3, 37, 53), num_regions=num_regions, mode=mode)
    assert masks.shape == (3, num_regions, 1, 10, 14)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(dim=1), torch.ones(3, 1, 10, 14))


def test_bins_are_equal_intervals_with_the_clearest_first() -> None:
    values = torch.tensor([1.0, 0.8, 0.79, 0.5, 0.2, 0.19, 0.0]).view(1, 1, 1, 7)
    index = bin_into_regions(values, 5).argmax(dim=1).flatten().tolist()
    assert index == [0, 0, 1, 2, 3, 4, 4]
    assert bin_into_regions(values, 2).argmax(dim=1).flatten().tolist() == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("mode", ["transmission", "dark_channel"])
def test_thicker_haze_falls_in_later_regions(mode: str) -> None:
    region = dcp_region_masks(hazy_scene(), mode=mode).argmax(dim=1)[0, 0]
    column_region = region.float().mean(dim=0)
    assert column_region[:3].mean() < 1.0  # clear side: the first regions
    assert column_region[-3:].mean() > 3.0  # white-out side: the last regions
    # Every region is used: the range is normalised per image.
    assert len(region.unique()) == 5


def test_each_image_uses_its_own_statistics() -> None:
    scene = hazy_scene()
    batch = torch.cat([scene, scene * 0.3, scene.flip(-1)])
    batched = dcp_region_masks(batch)
    one_by_one = torch.cat([dcp_region_masks(image[None]) for image in batch])
    assert torch.equal(batched, one_by_one)
    # A darker copy of the same scene has the same normalised transmission ranking.
    assert (batched[0] == batched[1]).float().mean() > 0.9


def test_dcp_maps_explain_the_masks() -> None:
    scene = hazy_scene()
    maps = compute_dcp_maps(scene, num_regions=4)
    assert maps.dark_channel.shape == maps.transmission.shape == (1, 1, 16, 24)
    assert torch.equal(maps.masks, dcp_region_masks(scene, num_regions=4))
    # Dark channel rises and transmission falls with the haze.
    assert maps.dark_channel[..., -1].mean() > maps.dark_channel[..., 0].mean() + 0.5
    assert maps.transmission[..., -1].mean() < maps.transmission[..., 0].mean() - 0.5


def test_masks_carry_no_gradient_and_stay_on_the_input_device() -> None:
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    masks = dcp_region_masks(image)
    assert not masks.requires_grad
    assert masks.device == image.device


def test_non_rgb_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="RGB"):
        dcp_region_masks(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        dcp_region_masks(torch.rand(1, 3, 16, 16), mode="depth")
    with pytest.raises(ValueError, match="num_regions"):
        bin_into_regions(torch.rand(1, 1, 4, 4), 1)


@pytest.mark.parametrize(("mode", "minimum_agreement"), [("transmission", 0.75), ("dark_channel", 0.9)])
def test_masks_of_a_real_hazy_photo_are_spatially_coherent(mode: str, minimum_agreement: float) -> None:
    # The paper's claim (section 3.3, Fig. 3): DCP regions are connected areas, not speckle
    # (independent labels would agree with a neighbour about 1/N of the time). The guided
    # filter (eps 1e-4) lets the transmission follow the image's edges, so it is less
    # smooth than the plain dark channel.
    path = sorted(SOTS_HAZY.glob("*.png"))[0]
    image = decode_image(str(path), mode=ImageReadMode.RGB).float().div(255)[None]
    region = dcp_region_masks(image, mode=mode).argmax(dim=1)[0, 0]
    same_as_right = (region[:, 1:] == region[:, :-1]).float().mean()
    same_as_below = (region[1:] == region[:-1]).float().mean()
    assert min(same_as_right, same_as_below) > minimum_agreement
    assert len(region.unique()) == 5
