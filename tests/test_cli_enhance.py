"""``hdm enhance`` and ``hdm explain`` through click's CliRunner.

The checkpoint is a randomly initialised one-block HDM: it exercises the command's
mechanics (inputs, sizes, errors, exit codes), never the quality of a result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hdm_model import hdm, save_checkpoint
from hdm_platform.cli import main
from hdm_platform.cli.enhance import collect_inputs
from hdm_platform.explain import LABEL_HEIGHT, MARGIN, PANEL_LONG_SIDE
from hdm_platform.imageio import read_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(
        hdm(blocks_per_group=1, num_groups=1, channels=8), tmp_path_factory.mktemp("ckpt") / "tiny"
    )


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Seven inputs of every awkward kind; maps each file name to its displayed (H, W)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(_rgb(20, 30, 0)).save(folder / "plain.png")
    Image.fromarray(_rgb(18, 26, 1)).save(folder / "photo.jpeg", quality=90)
    Image.fromarray(_rgb(17, 23, 2)).save(folder / "liar.jpg", format="BMP")
    Image.fromarray(np.random.default_rng(3).integers(0, 65536, (21, 19), dtype=np.uint16)).save(
        folder / "deep.png"
    )
    rgba = np.dstack([_rgb(16, 24, 4), np.full((16, 24), 128, dtype=np.uint8)])
    Image.fromarray(rgba).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 12x28 shows as 28x12
    Image.fromarray(_rgb(12, 28, 5)).save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG")
    (folder / "notes.txt").write_text("not an image and not picked up from a folder")
    return {
        "plain": (20, 30),
        "photo": (18, 26),
        "liar": (17, 23),
        "deep": (21, 19),
        "alpha": (16, 24),
        "rotated": (28, 12),
    }


def test_folders_expand_to_sorted_image_files(mixed_folder, tmp_path):
    files = collect_inputs((tmp_path / "inputs",))
    assert [path.name for path in files] == sorted(
        ["plain.png", "photo.jpeg", "liar.jpg", "deep.png", "alpha.png", "rotated.jpg", "broken.png"]
    )


def test_enhance_folder_with_mixed_and_broken_files(checkpoint, mixed_folder, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["enhance", str(tmp_path / "inputs"), "-o", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"]
    )
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "cannot decode" in result.output
    assert "enhanced 6 of 7 images" in result.output
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{stem}.png" for stem in mixed_folder)
    for stem, (height, width) in mixed_folder.items():
        image = read_image(out / f"{stem}.png")
        assert image.shape == (3, height, width), stem


def test_enhance_tiled_bf16_jpeg_output_matches_input_size(checkpoint, tmp_path):
    source = tmp_path / "wide.png"
    Image.fromarray(_rgb(30, 50, 6)).save(source)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["enhance", str(source), "-o", str(out), "--checkpoint", str(checkpoint), "--device", "cpu",
         "--tile", "16", "--tile-overlap", "4", "--precision", "bf16", "--format", "jpeg"],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out / "wide.jpg").format == "JPEG"
    assert read_image(out / "wide.jpg").shape == (3, 30, 50)


def test_enhance_with_the_dcp_baseline_dehazes(tmp_path):
    clear = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(7)) * 0.6
    hazy = clear * 0.4 + 0.9 * 0.6
    source = tmp_path / "hazy.png"
    Image.fromarray((hazy.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(source)
    result = CliRunner().invoke(main, ["enhance", str(source), "-o", str(tmp_path / "out"), "--checkpoint", "dcp"])
    assert result.exit_code == 0, result.output
    restored = read_image(tmp_path / "out" / "hazy.png")
    assert restored.shape == (3, 40, 48)
    # The haze lifted every pixel towards the airlight; DCP pulls the contrast back out.
    assert restored.std() > 1.5 * hazy.std()


def test_enhance_refuses_to_overwrite_its_input(tmp_path):
    source = tmp_path / "same.png"
    Image.fromarray(_rgb(8, 8, 8)).save(source)
    before = source.read_bytes()
    result = CliRunner().invoke(main, ["enhance", str(tmp_path), "-o", str(tmp_path), "--checkpoint", "dcp"])
    assert result.exit_code == 1 and "would overwrite the input" in result.output
    assert source.read_bytes() == before


def test_enhance_reports_bad_checkpoints_and_options(tmp_path):
    source = tmp_path / "a.png"
    Image.fromarray(_rgb(8, 8, 9)).save(source)
    runner = CliRunner()
    missing = runner.invoke(main, ["enhance", str(source), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "cannot load" in missing.output and "no checkpoint folder" in missing.output
    external = save_checkpoint(
        hdm(blocks_per_group=1, num_groups=1, channels=8, mask_source="external"), tmp_path / "external"
    )
    guided = runner.invoke(main, ["enhance", str(source), "-o", str(tmp_path / "o"), "--checkpoint", str(external)])
    assert guided.exit_code == 1 and "external guide map" in guided.output
    bad_tile = runner.invoke(main, ["enhance", str(source), "-o", str(tmp_path / "o"), "--checkpoint", "dcp", "--tile", "30"])
    assert bad_tile.exit_code == 2 and "multiple of 4" in bad_tile.output
    overlap = runner.invoke(main, ["enhance", str(source), "-o", str(tmp_path / "o"), "--checkpoint", "dcp", "--tile", "32",
                                     "--tile-overlap", "32"])
    assert overlap.exit_code == 2 and "must exceed --tile-overlap 32" in overlap.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(main, ["enhance", str(empty), "-o", str(tmp_path / "o"), "--checkpoint", "dcp"])
    assert nothing.exit_code == 2 and "no image files" in nothing.output


def _expected_figure_size(height: int, width: int, num_panels: int) -> tuple[int, int]:
    scale = PANEL_LONG_SIDE / max(height, width)
    panel_height, panel_width = round(height * scale), round(width * scale)
    return num_panels * (panel_width + MARGIN) + MARGIN, LABEL_HEIGHT + panel_height + 2 * MARGIN


def test_explain_draws_input_priors_and_region_masks(tmp_path):
    source = tmp_path / "scene.png"
    gradient = np.linspace(0, 255, 64, dtype=np.float32)[None, :, None] * np.ones((40, 1, 3))
    Image.fromarray(gradient.astype(np.uint8)).save(source)
    figure = tmp_path / "figure.png"
    result = CliRunner().invoke(main, ["explain", str(source), "-o", str(figure), "--num-regions", "4"])
    assert result.exit_code == 0, result.output
    with Image.open(figure) as image:
        assert image.format == "PNG"
        assert image.size == _expected_figure_size(40, 64, 3 + 4)
        pixels = np.asarray(image.convert("RGB"))
    # Each region panel is dark where its region is not: the panels differ from each other.
    panel_width = round(64 * PANEL_LONG_SIDE / 64)
    top = MARGIN + LABEL_HEIGHT
    panels = [
        pixels[top:, MARGIN + index * (panel_width + MARGIN) :][:, :panel_width].astype(float)
        for index in range(3, 7)
    ]
    assert all(not np.array_equal(panels[0], other) for other in panels[1:])


def test_explain_takes_regions_and_mode_from_a_checkpoint(tmp_path):
    directory = save_checkpoint(
        hdm(blocks_per_group=1, num_groups=1, channels=8, num_regions=3, dcp_mask_mode="dark_channel"),
        tmp_path / "ckpt",
    )
    source = tmp_path / "tall.png"
    Image.fromarray(_rgb(50, 20, 10)).save(source)
    figure = tmp_path / "figure.png"
    runner = CliRunner()
    result = runner.invoke(main, ["explain", str(source), "-o", str(figure), "--checkpoint", str(directory)])
    assert result.exit_code == 0, result.output
    assert "3 regions (dark_channel)" in result.output
    assert Image.open(figure).size == _expected_figure_size(50, 20, 3 + 3)

    clash = runner.invoke(
        main, ["explain", str(source), "-o", str(figure), "--checkpoint", str(directory), "--num-regions", "5"]
    )
    assert clash.exit_code == 2 and "--num-regions" in clash.output


def test_explain_names_an_unreadable_image(tmp_path):
    source = tmp_path / "junk.png"
    source.write_text("junk")
    result = CliRunner().invoke(main, ["explain", str(source), "-o", str(tmp_path / "f.png")])
    assert result.exit_code == 1 and "junk.png" in result.output
    assert not (tmp_path / "f.png").exists()
