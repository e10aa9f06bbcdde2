"""Synthesis: reproducible per seed, measurably degraded, physical models behave physically."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hdm_model.metrics import psnr
from hdm_platform.cli.data import data
from hdm_platform.data.manifest import Manifest
from hdm_platform.data import synth
from hdm_platform.data.synth import (
    BUILTIN_PHOTOS,
    BUILTIN_SCENES,
    DEGRADATIONS,
    add_haze,
    add_rain,
    builtin_images,
    compose_scene,
    darken,
    heuristic_depth,
    load_clean_images,
    photo_splits,
    synthesize,
)

MakePng = Callable[..., bytes]


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def pair_psnr(row: dict) -> float:
    def tensor(data: bytes):
        import torch

        return torch.from_numpy(decoded(data).astype(np.float32) / 255).permute(2, 0, 1)[None]

    return float(psnr(tensor(row["input"]), tensor(row["target"]))[0])


def all_rows(uri: str) -> list[dict]:
    manifest = Manifest.load(uri)
    return sorted(
        (row for split in manifest.splits for row in manifest.read_table(split).to_pylist()),
        key=lambda row: row["id"],
    )


def test_builtin_photos_load_offline_and_motorcycle_has_depth() -> None:
    images = builtin_images()
    assert [image.name for image in images] == list(BUILTIN_PHOTOS) and len(images) == 8
    assert all(image.pixels.ndim == 3 and image.pixels.shape[2] == 3 for image in images)
    assert all(min(image.pixels.shape[:2]) >= 300 for image in images)
    assert len({image.pixels.tobytes()[:4096] for image in images}) == len(images)
    motorcycle = images[BUILTIN_PHOTOS.index("motorcycle")]
    assert motorcycle.depth is not None and motorcycle.depth.shape == motorcycle.pixels.shape[:2]
    assert np.isfinite(motorcycle.depth).all() and motorcycle.depth.min() == 0 and motorcycle.depth.max() == 1


@pytest.mark.parametrize(("task", "low", "high"), [("dehaze", 6, 25), ("derain", 8, 30), ("lowlight", 5, 20)])
def test_same_seed_gives_identical_bytes_and_pairs_are_degraded(
    tmp_path: Path, task: str, low: float, high: float
) -> None:
    options = {
        "task": task,
        "count": 4,
        "size": (48, 40),
        "val_fraction": 0.25,
        "workers": 2,
        "progress": False,
    }
    synthesize("builtin", str(tmp_path / "a"), seed=3, **options)
    synthesize("builtin", str(tmp_path / "b"), seed=3, **options)
    synthesize("builtin", str(tmp_path / "c"), seed=4, **options)
    first, second, other = (
        all_rows(str(tmp_path / "a")),
        all_rows(str(tmp_path / "b")),
        all_rows(str(tmp_path / "c")),
    )
    assert [(r["id"], r["split"], r["input"], r["target"]) for r in first] == [
        (r["id"], r["split"], r["input"], r["target"]) for r in second
    ]
    assert [r["input"] for r in first] != [r["input"] for r in other]
    for row in first:
        assert (row["width"], row["height"], row["input_format"], row["target_format"]) == (
            48,
            40,
            "PNG",
            "PNG",
        )
        assert decoded(row["input"]).shape == decoded(row["target"]).shape == (40, 48, 3)
        assert low < pair_psnr(row) < high, (row["id"], pair_psnr(row))


def test_haze_follows_the_scattering_model_and_uses_depth() -> None:
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.0, 0.5, (32, 64, 3))
    depth = np.zeros((32, 64), dtype=np.float32)
    depth[:, 32:] = 1.0
    hazy = add_haze(clean, np.random.default_rng(1), depth)
    np.testing.assert_allclose(hazy[:, :32], clean[:, :32])  # t = 1 at zero depth
    far_gap = np.abs(hazy[:, 32:] - clean[:, 32:]).mean()
    assert far_gap > 0.1 and hazy[:, 32:].std() < clean[:, 32:].std()  # contrast lost far away


def test_haze_at_a_rooms_far_wall_ranges_from_light_to_dense() -> None:
    # The same draw on a white and a black scene: their difference is the transmission.
    white, black = np.ones((2, 2, 3)), np.zeros((2, 2, 3))
    far_wall = np.full((2, 2), 1.0 / 3.0, dtype=np.float32)  # compose_scene's far wall
    transmissions = np.array(
        [
            add_haze(white, np.random.default_rng(seed), far_wall)[0, 0, 0]
            - add_haze(black, np.random.default_rng(seed), far_wall)[0, 0, 0]
            for seed in range(200)
        ]
    )
    # From RESIDE's beta of 0.6 no far wall kept more than 0.74 of its light, and the model took
    # haze off lightly hazed photos that was not there.
    assert transmissions.max() > 0.8 and transmissions.min() < 0.45


def test_a_share_of_the_hazes_scatters_blue_more_than_red() -> None:
    # The white-minus-black difference of one draw is the transmission, channel by channel.
    white, black = np.ones((2, 2, 3)), np.zeros((2, 2, 3))
    far_wall = np.full((2, 2), 1.0 / 3.0, dtype=np.float32)
    transmissions = np.stack(
        [
            add_haze(white, np.random.default_rng(seed), far_wall)[0, 0]
            - add_haze(black, np.random.default_rng(seed), far_wall)[0, 0]
            for seed in range(400)
        ]
    )
    red, green, blue = transmissions.T
    grey = np.isclose(red, blue)
    assert np.allclose(red[grey], green[grey])  # aerosol haze: the same for every wavelength
    bluish = ~grey
    assert 0.4 * synth._BLUE_HAZE_SHARE < bluish.mean() < 1.6 * synth._BLUE_HAZE_SHARE
    assert np.all((red[bluish] > green[bluish]) & (green[bluish] > blue[bluish]))
    # Up to Rayleigh's clear air: the blue channel's optical depth up to 3x the red one's.
    optical_depth_ratio = np.log(blue[bluish]) / np.log(red[bluish])
    assert optical_depth_ratio.max() > 2.5 and optical_depth_ratio.min() < 1.2


def test_airlight_is_near_grey_with_a_tint_of_its_own_per_pair() -> None:
    # A black scene at great depth shows the airlight itself.
    black, far = np.zeros((4, 4, 3)), np.full((4, 4), 50.0, dtype=np.float32)
    airlights = np.stack([add_haze(black, np.random.default_rng(seed), far)[0, 0] for seed in range(200)])
    assert airlights.min() >= 0.5 and airlights.max() <= 1.0
    tint = airlights / airlights.mean(axis=1, keepdims=True)
    assert 0.02 < tint.std() < 0.08  # neither always grey nor a coloured light
    assert (np.abs(tint - 1).max(axis=1) > 0.05).mean() > 0.2


def test_half_of_the_hazy_images_go_through_a_jpeg_round_trip() -> None:
    rows, cols = np.mgrid[0:32, 0:32] / 32.0
    clean = np.stack([rows, cols, 0.5 + 0.3 * np.sin(6.0 * (rows + cols))], axis=2)  # a photo's smoothness
    depth = np.full((32, 32), 0.3, dtype=np.float32)
    hazy = [
        (add_haze(clean, np.random.default_rng(seed), depth), DEGRADATIONS["dehaze"](clean, np.random.default_rng(seed), depth))
        for seed in range(100)
    ]  # fmt: skip
    compressed = [(lossless, stored) for lossless, stored in hazy if not np.array_equal(lossless, stored)]
    assert 30 <= len(compressed) <= 70
    for lossless, stored in compressed:
        error = np.abs(stored - np.clip(lossless, 0.0, 1.0))
        assert 0.003 < error.mean() < 0.05  # a JPEG's loss: more than 8-bit rounding, far less than haze
        assert np.array_equal(stored, np.round(stored * 255.0) / 255.0)  # decoded 8-bit pixels


def test_a_new_degradation_recipe_renders_the_dataset_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = dict(task="dehaze", count=2, size=(16, 16), progress=False)
    first = synthesize("builtin", str(tmp_path / "ds"), **arguments)
    monkeypatch.setattr(synth, "_JPEG_SHARE", 0.25)
    again = synthesize("builtin", str(tmp_path / "ds"), **arguments)
    assert not again.unchanged and again.manifest.generation != first.manifest.generation
    assert again.manifest.fingerprint != first.manifest.fingerprint


def test_heuristic_depth_is_far_at_the_top_and_in_bright_colourless_regions() -> None:
    image = np.full((64, 64, 3), 0.2)
    image[:, 40:] = 0.95  # a bright, grey region (sky, a white wall)
    depth = heuristic_depth(image)
    assert depth.shape == (64, 64) and depth.min() >= 0 and depth.max() <= 1
    assert depth[2, 10] > depth[60, 10]
    assert depth[32, 60] > depth[32, 4]


def test_scenes_are_made_of_their_photos_with_nearer_shapes_in_front() -> None:
    red = np.zeros((256, 256, 3), dtype=np.float32)
    red[..., 0] = np.linspace(0.2, 1.0, 256)[None, :]
    pixels, depth = compose_scene([red], (48, 32), np.random.default_rng(0))
    assert pixels.shape == (32, 48, 3) and pixels.dtype == np.uint8 and depth.shape == (32, 48)
    assert pixels[..., 1:].max() == 0 and pixels[..., 0].min() > 0  # every fill comes from the photos
    photos = [image.pixels.astype(np.float32) / 255 for image in builtin_images()]
    scenes = [compose_scene(photos, (64, 64), np.random.default_rng(seed)) for seed in range(12)]
    depths = np.stack([depth for _, depth in scenes])
    # A room: the far wall at a third of the photos' far plane, so the haze of add_haze spares
    # more light than in a landscape (transmission above 0.3 at the strongest beta).
    assert 0.0 < depths.min() and depths.max() <= 0.4
    assert np.exp(-1.8 * 1.5 * depths.max()) > 0.3
    # Shapes approach the camera gradually, so few pixels are almost free of haze (with 0.75-1
    # per shape, the 5th percentile was 0.015: the near shapes taught the model to leave haze).
    assert np.percentile(depths, 5) > 0.05
    # Depth jumps at shape edges, and brightness does not tell depth (unlike heuristic_depth).
    jumps = np.abs(np.diff(depths, axis=2))
    assert (jumps > 0.02).mean() > 0.005 and np.median(jumps) < 0.005
    brightness = np.stack([pixels.mean(axis=2) for pixels, _ in scenes])
    assert abs(np.corrcoef(brightness.ravel(), depths.ravel())[0, 1]) < 0.3


def test_most_colour_edges_of_a_scene_are_not_depth_edges() -> None:
    # Photos of one flat colour each: a sharp colour edge is the edge of a shape. Most shapes
    # are painted on what lies under them, so the depth goes on across their edges.
    colours = [(0.9, 0.2, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 0.9), (0.8, 0.8, 0.2)]
    photos = [np.full((256, 256, 3), colour, dtype=np.float32) for colour in colours]
    scenes = [compose_scene(photos, (64, 64), np.random.default_rng(seed)) for seed in range(12)]
    pixels = np.stack([pixels for pixels, _ in scenes]).astype(np.float32) / 255
    depths = np.stack([depth for _, depth in scenes])
    colour_edges = np.abs(np.diff(pixels, axis=2)).max(axis=-1) > 0.3
    depth_edges = np.abs(np.diff(depths, axis=2)) > 1e-3
    assert colour_edges.sum() > 1000
    assert (colour_edges & ~depth_edges).sum() / colour_edges.sum() > 0.5


def test_rain_only_brightens_and_darkening_reduces_brightness() -> None:
    clean = np.full((64, 64, 3), 0.4)
    rainy = add_rain(clean, np.random.default_rng(0))
    assert (rainy >= clean - 1e-12).all() and (rainy > clean + 0.05).mean() > 0.01
    dark = darken(clean, np.random.default_rng(0))
    assert dark.mean() < 0.2 and dark.std() > 0.001  # darker and noisy


def test_folder_source_reads_depth_beside_images(tmp_path: Path, make_png: MakePng) -> None:
    make_png(tmp_path / "src/scene.png", width=20, height=10)
    make_png(tmp_path / "src/plain.png", width=20, height=10, seed=1)
    depth = np.tile(np.linspace(0, 60000, 20, dtype=np.uint16), (10, 1))
    (tmp_path / "src/depth").mkdir()
    Image.fromarray(depth).save(tmp_path / "src/depth/scene.png")
    images = {image.name: image for image in load_clean_images(str(tmp_path / "src"))}
    assert set(images) == {"scene", "plain"}
    assert images["plain"].depth is None
    assert images["scene"].depth[0, 0] == 0 and images["scene"].depth[0, -1] == 1
    result = synthesize(
        str(tmp_path / "src"), str(tmp_path / "out"), task="dehaze", count=3, size=None, progress=False
    )
    assert result.pairs == 3
    rows = all_rows(str(tmp_path / "out"))
    assert {row["source_target"] for row in rows} == {
        str(tmp_path / "src/scene.png"),
        str(tmp_path / "src/plain.png"),
    }
    assert all((row["width"], row["height"]) == (20, 10) for row in rows)


def test_splits_are_by_source_photo_and_keep_their_fractions(tmp_path: Path) -> None:
    synthesize("builtin", str(tmp_path / "ds"), task="dehaze", count=200, size=(16, 16), seed=0,
               val_fraction=0.1, test_fraction=0.1, workers=2, progress=False)  # fmt: skip
    rows = all_rows(str(tmp_path / "ds"))
    photos = {split: {row["source_target"] for row in rows if row["split"] == split} for split in ("train", "val", "test")}
    assert len(photos["test"]) == len(photos["val"]) == 1 and len(photos["train"]) == 6
    assert not (photos["train"] & photos["test"]) and not (photos["train"] & photos["val"])
    counts = {split: sum(row["split"] == split for row in rows) for split in photos}
    assert 10 <= counts["test"] <= 30 and 10 <= counts["val"] <= 30, counts
    every_training_photo = photo_splits(BUILTIN_PHOTOS, seed=0, val_fraction=0.0, test_fraction=0.0)
    assert every_training_photo == {"test": [], "val": [], "train": list(range(len(BUILTIN_PHOTOS)))}
    assert photo_splits(BUILTIN_PHOTOS, seed=0, val_fraction=0.0, test_fraction=0.3)["test"] != photo_splits(
        BUILTIN_PHOTOS, seed=1, val_fraction=0.0, test_fraction=0.3
    )["test"]
    scenes = all_rows(str(synthesize(BUILTIN_SCENES, str(tmp_path / "scenes"), task="dehaze", count=40,
                                     size=(16, 16), val_fraction=0.2, test_fraction=0.2, progress=False).manifest.uri))  # fmt: skip
    assert {row["source_target"] for row in scenes} == {f"{BUILTIN_SCENES}:{split} photos" for split in photos}
    with pytest.raises(ValueError, match=r"2 clean photo\(s\) cannot split by photo into 1 test and 1 val"):
        photo_splits(["a", "b"], seed=0, val_fraction=0.1, test_fraction=0.1)


def test_synth_rerun_is_a_noop_and_bad_arguments_are_rejected(tmp_path: Path) -> None:
    first = synthesize("builtin", str(tmp_path / "ds"), task="derain", count=2, size=(16, 16), progress=False)
    again = synthesize("builtin", str(tmp_path / "ds"), task="derain", count=2, size=(16, 16), progress=False)
    assert again.unchanged and again.manifest.generation == first.manifest.generation
    with pytest.raises(ValueError, match="unknown task 'fog'"):
        synthesize("builtin", str(tmp_path / "x"), task="fog", count=1)
    with pytest.raises(ValueError, match="builtin-scenes composes scenes of a given size"):
        synthesize(BUILTIN_SCENES, str(tmp_path / "x"), task="dehaze", count=1, size=None)
    with pytest.raises(ValueError, match="--size 400 is too large"):
        synthesize(BUILTIN_SCENES, str(tmp_path / "x"), task="dehaze", count=1, size=(400, 100))
    with pytest.raises(ValueError, match="sum below 1"):
        synthesize(
            "builtin", str(tmp_path / "x"), task="dehaze", count=1, val_fraction=0.6, test_fraction=0.5
        )


def test_cli_synth_with_splits(tmp_path: Path) -> None:
    dest = str(tmp_path / "ds")
    result = CliRunner().invoke(
        data,
        [
            "synth",
            "--task",
            "lowlight",
            "--count",
            "12",
            "--seed",
            "1",
            "--size",
            "24x16",
            "--val-fraction",
            "0.3",
            "--test-fraction",
            "0.3",
            "--no-progress",
            "builtin",
            dest,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "synthesised 12 pairs" in result.output
    manifest = Manifest.load(dest)
    assert (manifest.task, manifest.layout, manifest.rows) == ("lowlight", "synth", 12)
    assert set(manifest.splits) == {"train", "val", "test"}
    bad = CliRunner().invoke(data, ["synth", "--task", "dehaze", "--size", "0x3", "builtin", dest])
    assert bad.exit_code == 2 and "is not a size" in bad.output
