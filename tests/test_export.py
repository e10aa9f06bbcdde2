"""`hdm data export`: a split's images back out as files, byte for byte."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from hdm_platform.cli.data import data
from hdm_platform.data.ingest import IngestOptions, ingest
from realworld import REALWORLD

SOTS = REALWORLD / "dehaze" / "SOTS-indoor"


def test_export_writes_the_original_bytes_of_one_side(tmp_path: Path) -> None:
    dataset = tmp_path / "sots"
    ingest(str(SOTS), str(dataset), IngestOptions(layout="sots"), progress=False)
    runner = CliRunner()

    hazy = runner.invoke(data, ["export", str(dataset), "--split", "test", "-o", str(tmp_path / "hazy")])
    assert hazy.exit_code == 0, hazy.output
    exported = sorted(path.name for path in (tmp_path / "hazy").iterdir())
    assert exported == sorted(path.name for path in (SOTS / "hazy").iterdir())
    for path in (tmp_path / "hazy").iterdir():
        assert path.read_bytes() == (SOTS / "hazy" / path.name).read_bytes()

    clear = runner.invoke(
        data,
        ["export", str(dataset), "--split", "test", "--side", "target", "--limit", "2", "-o", str(tmp_path / "gt")],
    )
    assert clear.exit_code == 0, clear.output
    for path in (tmp_path / "gt").iterdir():  # named by pair id: hazy 1400_1 -> clear 1400
        scene = path.name.split("_")[0]
        assert path.read_bytes() == (SOTS / "gt" / f"{scene}.png").read_bytes()
    assert len(list((tmp_path / "gt").iterdir())) == 2


def test_export_of_a_missing_split_names_it(tmp_path: Path) -> None:
    dataset = tmp_path / "sots"
    ingest(str(SOTS), str(dataset), IngestOptions(layout="sots"), progress=False)
    result = CliRunner().invoke(data, ["export", str(dataset), "--split", "train", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "no split 'train'" in result.output
