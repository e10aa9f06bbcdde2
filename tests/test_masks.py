"""DCP-guided region masks: one-hot, complete, binned as the released code, batched, coherent;
mode "published" step for step as the authors' test script, against NumPy/SciPy/Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from realworld import REALWORLD
from scipy import ndimage
from torchvision.io import ImageReadMode, decode_image

from hdm_model import HDMConfig, bin_into_regions, compute_dcp_maps, dcp_region_masks
from hdm_model.model import HDM
from hdm_model.published_masks import pillow_lanczos_downscale

SOTS_HAZY = REALWORLD / "dehaze" / "SOTS-indoor" / "hazy"
#: Every real input photo: SOTS hazy, real hazy, Rain100H rainy, DICM low-light.
REAL_INPUTS = sorted(
    path
    for path in REALWORLD.rglob("*")
    if path.suffix in (".png", ".jpg") and not {"gt", "norain"} & set(path.parts)
)


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


# --- mode "published": the authors' test script ---------------------------------------------


def _as_batch(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)


def test_real_inputs_are_all_there():
    assert len(REAL_INPUTS) == 20


@pytest.mark.parametrize("path", REAL_INPUTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_published_downscale_is_pillows_lanczos_bit_for_bit(path):
    image = Image.open(path).convert("RGB")
    width, height = image.size
    expected = np.asarray(image.resize((width // 4, height // 4), Image.LANCZOS))
    ours = pillow_lanczos_downscale(_as_batch(np.asarray(image)), (height // 4, width // 4))
    assert np.array_equal(ours[0].permute(1, 2, 0).numpy(), expected)


def _box(values: np.ndarray, side: int) -> np.ndarray:
    # OpenCV's boxFilter: side x side, anchored at side // 2, BORDER_REFLECT_101 ("mirror").
    return ndimage.uniform_filter(values, size=side, mode="mirror")


def _erode(values: np.ndarray, side: int) -> np.ndarray:
    # OpenCV's erode: the minimum over the window, clipped to the image.
    return ndimage.minimum_filter(values, size=side, mode="nearest")


def _guided(guide: np.ndarray, source: np.ndarray, side: int, eps: float) -> np.ndarray:
    mean_guide, mean_source = _box(guide, side), _box(source, side)
    a = (_box(guide * source, side) - mean_guide * mean_source) / (
        _box(guide * guide, side) - mean_guide * mean_guide + eps
    )
    return _box(a, side) * guide + _box(mean_source - a * mean_guide, side)


def script_regions(path) -> np.ndarray:
    """Region index (0 = clearest) per pixel, the design note's steps in float64 NumPy."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    small = np.asarray(image.resize((width // 4, height // 4), Image.LANCZOS))
    normalised = small / 255
    channel_min = _guided(normalised.min(axis=2), _erode(normalised.min(axis=2), 223), 111, 1e-3)
    if np.ptp(channel_min) <= 1e-9:
        # The erosion spans the image: constant up to rounding, where numpy refuses 2000
        # bins or rounding picks the pixels. Every pixel, as for an exactly constant map.
        threshold = -np.inf
    else:
        counts, edges = np.histogram(channel_min, 2000)
        fraction = np.cumsum(counts) / channel_min.size
        lmax = next((k for k in range(1999, 0, -1) if fraction[k] <= 0.999), 1)
        threshold = edges[lmax]
    airlight = normalised.mean(axis=2)[channel_min >= threshold].max()
    coarse = 1 - 0.95 * _erode((normalised / airlight).min(axis=2), 15)
    red, green, blue = (small[..., channel].astype(np.int64) for channel in range(3))
    # cv2.cvtColor(RGB array, COLOR_BGR2GRAY): OpenCV 4's 15-bit weights, red as blue.
    grey = ((3735 * red + 19235 * green + 9798 * blue + (1 << 14)) >> 15) / 255
    refined = _guided(grey, coarse, 60, 1e-4)
    span = np.ptp(refined) if np.ptp(refined) > 1e-9 else np.nan  # constant up to rounding
    clarity = (refined - refined.min()) / span
    return np.select([clarity >= 0.8, clarity >= 0.6, clarity >= 0.4, clarity >= 0.2], [0, 1, 2, 3], 4)


@pytest.mark.parametrize("path", REAL_INPUTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_published_masks_match_an_independent_numpy_statement(path):
    image = read_rgb(path)
    masks = dcp_region_masks(image, mode="published")
    assert masks.shape == (1, 5, 1, image.shape[-2] // 4, image.shape[-1] // 4)
    assert torch.equal(masks.sum(dim=1), torch.ones_like(masks[:, 0]))
    agreement = (masks[0, :, 0].argmax(dim=0).numpy() == script_regions(path)).mean()
    assert agreement >= 0.999, f"{path.name}: {agreement:.5f}"


def read_rgb(path) -> torch.Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB).float().div(255)[None]


def test_published_masks_are_batched_and_what_the_model_uses():
    paths = [path for path in REAL_INPUTS if path.parent.name == "hazy"][:2]
    batch = torch.cat([read_rgb(path) for path in paths])
    one_by_one = torch.cat([dcp_region_masks(image[None], mode="published") for image in batch])
    assert torch.equal(dcp_region_masks(batch, mode="published"), one_by_one)
    model = HDM(HDMConfig(channels=8, num_groups=1, blocks_per_group=1, dcp_mask_mode="published"))
    assert torch.equal(model.region_masks(batch), one_by_one)  # 620x460: multiples of 4
    maps = compute_dcp_maps(batch, mode="published")
    assert torch.equal(maps.masks, one_by_one) and maps.transmission.shape == (2, 1, 115, 155)


def test_a_flat_image_gets_no_region_as_in_the_script():
    # A constant image's transmission is constant (up to rounding); normalised it is 0/0,
    # and no threshold holds NaN.
    masks = dcp_region_masks(torch.full((1, 3, 64, 64), 0.5), mode="published")
    assert masks.shape == (1, 5, 1, 16, 16) and not masks.any()


def test_published_mode_takes_none_of_the_other_dcp_settings():
    with pytest.raises(ValueError, match="guided_radius cannot be changed"):
        dcp_region_masks(torch.rand(1, 3, 32, 32), mode="published", guided_radius=30)
    with pytest.raises(ValueError, match="dcp_omega cannot be changed"):
        HDMConfig(dcp_mask_mode="published", dcp_omega=0.9)
