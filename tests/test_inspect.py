"""Inspect: counts, sizes, PSNR statistics and the contact sheet."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from hdm_platform.cli.data import data
from hdm_platform.data.ingest import IngestOptions, ingest
from hdm_platform.data.inspect import inspect_dataset
from hdm_platform.data.layouts import LayoutOptions
from hdm_platform.data.manifest import DatasetNotFoundError
from realworld import REALWORLD

REAL = REALWORLD


def test_inspect_real_sots_reports_counts_sizes_and_psnr(tmp_path: Path) -> None:
    ingest(str(REAL / "dehaze/SOTS-indoor"), str(tmp_path / "sots"), IngestOptions(layout="sots"),
           progress=False)  # fmt: skip
    report = inspect_dataset(str(tmp_path / "sots"), psnr_pairs=3)
    (split,) = report.splits
    assert (split.split, split.rows, split.shards) == ("test", 5, 1)
    assert (split.width.min, split.width.max, split.height.median) == (620, 620, 460)
    assert split.psnr is not None and split.psnr.pairs == 3 and split.psnr.identical == 0
    # The benchmark's hazy inputs sit around 13 dB from their ground truth (README).
    assert 11 < split.psnr.min <= split.psnr.mean <= split.psnr.max < 17
    text = report.render()
    assert "test: 5 rows in 1 shard(s)" in text and "width 620/620/620" in text
    assert "input vs target PSNR: mean" in text


def test_cli_inspect_writes_a_contact_sheet_with_one_line_per_pair(tmp_path: Path) -> None:
    ingest(
        str(REAL / "derain/Rain100H"),
        str(tmp_path / "rain"),
        IngestOptions(layout="rain100h", pairing=LayoutOptions(split="test"), val_fraction=0.0),
        progress=False,
    )
    sheet = tmp_path / "sheets" / "rain.png"
    result = CliRunner().invoke(
        data,
        [
            "inspect",
            str(tmp_path / "rain"),
            "--contact-sheet",
            str(sheet),
            "--sheet-pairs",
            "3",
            "--psnr-pairs",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "test: 5 rows" in result.output and "over 5 pairs" in result.output
    assert f"contact sheet: {sheet}" in result.output
    with Image.open(sheet) as image:
        assert image.format == "PNG"
        # 3 lines of (label + 160 px thumbnails + gap) plus the top gap; input | target side by side.
        assert image.height == 4 + 3 * (16 + 160 + 4)
        assert image.width >= 2 * 160


def test_inspect_unpaired_set_has_no_psnr_and_a_sheet_without_targets(tmp_path: Path) -> None:
    ingest(
        str(REAL / "lowlight/DICM"),
        str(tmp_path / "dicm"),
        IngestOptions(layout="unpaired", task="lowlight"),
        progress=False,
    )
    report = inspect_dataset(str(tmp_path / "dicm"), contact_sheet=str(tmp_path / "dicm.png"), sheet_pairs=2)
    (split,) = report.splits
    assert (split.split, split.rows, split.psnr) == ("infer", 5, None)
    with Image.open(tmp_path / "dicm.png") as image:
        assert image.height == 4 + 2 * (16 + 160 + 4)


def test_inspect_without_a_manifest_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"manifest\.json missing"):
        inspect_dataset(str(tmp_path))
    result = CliRunner().invoke(data, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert f"no dataset at {tmp_path / 'nothing'}: manifest.json missing" in result.output
