"""Ingest: real benchmark samples, byte round trips, S3, atomicity, re-runs, bad input, CLI."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from PIL import Image

from hdm_platform.cli.data import data
from hdm_platform.data.ingest import IngestError, IngestOptions, ingest
from hdm_platform.data.layouts import LayoutOptions
from hdm_platform.data.manifest import DatasetNotFoundError, Manifest
from hdm_platform.data.storage import open_filesystem
from realworld import REALWORLD

REAL = REALWORLD
MakePng = Callable[..., bytes]
SOTS = IngestOptions(layout="sots")


def rows_of(uri: str, split: str, **storage: object) -> list[dict]:
    return Manifest.load(uri, storage or None).read_table(split, verify=True).to_pylist()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def shard_files(dest: Path) -> set[str]:
    return {path.name for path in (dest / "shards").iterdir()}


@pytest.fixture
def sots_like(tmp_path: Path, make_png: MakePng) -> Path:
    source = tmp_path / "sots-src"
    for scene in (10, 11, 12):
        make_png(source / "gt" / f"{scene}.png", seed=scene)
        make_png(source / "hazy" / f"{scene}_1.png", seed=100 + scene)
    return source


def test_real_sots_sample_pairs_by_scene_and_round_trips_bytes_and_pixels(tmp_path: Path) -> None:
    result = ingest(str(REAL / "dehaze/SOTS-indoor"), str(tmp_path / "sots"), SOTS, progress=False)
    assert (result.pairs, result.shards, result.unchanged) == (5, 1, False)
    assert "\npaired by name: hazy/SCENE_K[_BETA] -> gt|clear/SCENE (5 pairs)" in result.summary()
    rows = rows_of(str(tmp_path / "sots"), "test")
    assert [row["id"] for row in rows] == [
        "sots/1400_1",
        "sots/1403_2",
        "sots/1406_3",
        "sots/1409_4",
        "sots/1412_5",
    ]
    for row in rows:
        scene = row["id"].split("/")[1].split("_")[0]
        assert row["source_target"] == str(REAL / f"dehaze/SOTS-indoor/gt/{scene}.png")
        assert row["input"] == Path(row["source_input"]).read_bytes()
        assert row["target"] == Path(row["source_target"]).read_bytes()
        assert (row["task"], row["input_format"], row["width"], row["height"]) == ("dehaze", "PNG", 620, 460)
        with Image.open(row["source_input"]) as original:
            np.testing.assert_array_equal(pixels(row["input"]), np.asarray(original))


def test_real_rain100h_and_unpaired_samples(tmp_path: Path) -> None:
    test_split = IngestOptions(layout="rain100h", pairing=LayoutOptions(split="test"))
    ingest(str(REAL / "derain/Rain100H"), str(tmp_path / "rain"), test_split, progress=False)
    rain = rows_of(str(tmp_path / "rain"), "test")
    assert len(rain) == 5
    for row in rain:
        assert Path(row["source_input"]).name == Path(row["source_target"]).name
        assert Path(row["source_input"]).parent.name == "rain" and row["task"] == "derain"
    ingest(
        str(REAL / "dehaze/real-hazy"),
        str(tmp_path / "hazy"),
        IngestOptions(layout="unpaired", task="dehaze"),
        progress=False,
    )
    manifest = Manifest.load(str(tmp_path / "hazy"))
    assert (manifest.paired, list(manifest.splits)) == (False, ["infer"])
    infer = manifest.read_table("infer").to_pylist()
    assert len(infer) == 5
    assert all(row["target"] is None and row["target_format"] is None for row in infer)
    assert {row["input_format"] for row in infer} == {"PNG", "JPEG"}
    assert all(row["input"] == Path(row["source_input"]).read_bytes() for row in infer)


def test_unpaired_summary_counts_images_not_pairs(tmp_path: Path) -> None:
    options = IngestOptions(layout="unpaired", task="dehaze")
    wrote = ingest(str(REAL / "dehaze/real-hazy"), str(tmp_path / "hazy"), options, progress=False)
    assert wrote.summary().startswith("wrote 5 images (infer 5) in 1 shard(s)")
    again = ingest(str(REAL / "dehaze/real-hazy"), str(tmp_path / "hazy"), options, progress=False)
    assert again.unchanged and again.summary().endswith(": 5 images, nothing written")
    assert " pairs" not in wrote.summary() + again.summary()


def test_cli_sots_as_dehazeformer_keeps_it_pairs_same_names_and_says_so(
    tmp_path: Path, make_png: MakePng
) -> None:
    source = tmp_path / "RESIDE-IN"
    for scene, rendering in ((1400, 1), (1400, 2), (1401, 1)):
        clear = make_png(source / "clear" / f"{scene}_{rendering}.png", seed=scene)
        make_png(source / "hazy" / f"{scene}_{rendering}.png", seed=rendering)
    result = CliRunner().invoke(
        data, ["ingest", "--layout", "sots", "--no-progress", str(source), str(tmp_path / "ds")]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 pairs (test 3)" in result.output
    same_name = "hazy/SCENE_K[_BETA] -> gt|clear/SCENE_K[_BETA] (same name)"
    assert f"paired by name: {same_name} (3 pairs)" in result.output
    rows = rows_of(str(tmp_path / "ds"), "test")
    assert [(Path(r["source_input"]).name, Path(r["source_target"]).name) for r in rows] == [
        ("1400_1.png", "1400_1.png"),
        ("1400_2.png", "1400_2.png"),
        ("1401_1.png", "1401_1.png"),
    ]
    assert rows[-1]["target"] == clear


def test_did_halves_are_cropped_losslessly(tmp_path: Path, make_png: MakePng) -> None:
    whole = pixels(make_png(tmp_path / "did/DID-MDN-training/1.png", width=10, height=6))
    ingest(str(tmp_path / "did"), str(tmp_path / "out"), IngestOptions(layout="did"), progress=False)
    (row,) = rows_of(str(tmp_path / "out"), "train")
    assert (row["width"], row["height"], row["input_format"]) == (5, 6, "PNG")
    np.testing.assert_array_equal(pixels(row["target"]), whole[:, :5])
    np.testing.assert_array_equal(pixels(row["input"]), whole[:, 5:])


def test_small_shard_size_splits_rows_over_several_shards(tmp_path: Path, sots_like: Path) -> None:
    options = replace(SOTS, shard_size=1, workers=2)
    result = ingest(str(sots_like), str(tmp_path / "ds"), options, progress=False)
    manifest = Manifest.load(str(tmp_path / "ds"))
    assert result.shards == 3
    assert [shard.rows for shard in manifest.splits["test"].shards] == [1, 1, 1]
    assert all(
        uri.startswith(str(tmp_path / "ds") + "/shards/test-" + manifest.generation)
        for uri in manifest.shard_uris("test")
    )
    assert [row["id"] for row in manifest.read_table("test", verify=True).to_pylist()] == [
        "sots/10_1",
        "sots/11_1",
        "sots/12_1",
    ]


def test_ingest_from_and_to_s3_served_by_moto(s3_bucket: str, sots_like: Path) -> None:
    fs, bucket = open_filesystem(s3_bucket)
    fs.put(str(sots_like), f"{bucket}/raw/sots", recursive=True)
    dest = f"{s3_bucket}/datasets/sots"
    result = ingest(f"{s3_bucket}/raw/sots", dest, SOTS, progress=False)
    assert result.pairs == 3
    s3fs.S3FileSystem.clear_instance_cache()
    manifest = Manifest.load(dest)
    assert manifest.shard_uris("test")[0].startswith(f"{dest}/shards/test-")
    rows = manifest.read_table("test", verify=True).to_pylist()
    assert [row["input"] for row in rows] == [
        (sots_like / f"hazy/{s}_1.png").read_bytes() for s in (10, 11, 12)
    ]
    assert rows[0]["source_input"] == f"{s3_bucket}/raw/sots/hazy/10_1.png"
    assert ingest(f"{s3_bucket}/raw/sots", dest, SOTS, progress=False).unchanged


def test_explicit_endpoint_option_overrides_the_environment(
    s3_bucket: str, sots_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = open_filesystem(s3_bucket)[0].endpoint_url
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    options = {"endpoint_url": endpoint, "region": "us-east-1"}
    ingest(str(sots_like), f"{s3_bucket}/ds", SOTS, storage_options=options, progress=False)
    assert Manifest.load(f"{s3_bucket}/ds", options).rows == 3


def test_crash_before_the_manifest_leaves_the_previous_dataset_intact(
    tmp_path: Path, sots_like: Path, make_png: MakePng, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "ds"
    ingest(str(sots_like), str(dest), SOTS, progress=False)
    before_manifest = (dest / "manifest.json").read_bytes()
    before_shards = shard_files(dest)
    make_png(sots_like / "gt/13.png", seed=13)
    make_png(sots_like / "hazy/13_1.png", seed=113)

    def crash(self: Manifest, uri: str, storage_options: object = None) -> None:
        raise OSError("simulated crash before the manifest is written")

    monkeypatch.setattr(Manifest, "save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ingest(str(sots_like), str(dest), SOTS, progress=False)
    monkeypatch.undo()
    assert (dest / "manifest.json").read_bytes() == before_manifest
    assert shard_files(dest) == before_shards
    assert len(rows_of(str(dest), "test")) == 3

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(Manifest, "save", crash)
    with pytest.raises(OSError):
        ingest(str(sots_like), str(fresh), SOTS, progress=False)
    monkeypatch.undo()
    with pytest.raises(DatasetNotFoundError, match=r"manifest\.json missing"):
        Manifest.load(str(fresh))


def test_rerun_is_a_noop_and_a_changed_source_is_a_clean_rewrite(
    tmp_path: Path, sots_like: Path, make_png: MakePng
) -> None:
    dest = tmp_path / "ds"
    first = ingest(str(sots_like), str(dest), SOTS, progress=False)
    shards = shard_files(dest)
    mtimes = {path: path.stat().st_mtime_ns for path in dest.rglob("*")}
    again = ingest(str(sots_like), str(dest), SOTS, progress=False)
    assert again.unchanged and again.manifest.generation == first.manifest.generation
    assert {path: path.stat().st_mtime_ns for path in dest.rglob("*")} == mtimes

    make_png(sots_like / "gt/13.png", seed=13)
    make_png(sots_like / "hazy/13_1.png", seed=113)
    rewrite = ingest(str(sots_like), str(dest), SOTS, progress=False)
    assert not rewrite.unchanged and rewrite.manifest.generation != first.manifest.generation
    ids = [row["id"] for row in rows_of(str(dest), "test")]
    assert ids == ["sots/10_1", "sots/11_1", "sots/12_1", "sots/13_1"]
    assert shard_files(dest).isdisjoint(shards)
    assert all(rewrite.manifest.generation in name for name in shard_files(dest))

    changed_args = ingest(str(sots_like), str(dest), replace(SOTS, shard_size=1), progress=False)
    assert not changed_args.unchanged and len(shard_files(dest)) == 4


@pytest.fixture
def sots_with_bad_pairs(sots_like: Path, make_png: MakePng) -> Path:
    """``sots_like`` with a truncated input (11_1), a size mismatch (12_1) and an input
    without a clear image (14_1); only 10_1 is good."""
    (sots_like / "hazy/11_1.png").write_bytes((sots_like / "hazy/11_1.png").read_bytes()[:60])
    make_png(sots_like / "hazy/12_1.png", width=9, height=8)
    make_png(sots_like / "hazy/14_1.png")
    return sots_like


def test_bad_pairs_stop_with_an_error_naming_the_files(tmp_path: Path, sots_with_bad_pairs: Path) -> None:
    source = sots_with_bad_pairs
    dest = tmp_path / "ds"
    with pytest.raises(IngestError) as missing:
        ingest(str(source), str(dest), SOTS, progress=False)
    assert "hazy/14_1.png: missing partner" in str(missing.value)
    assert not dest.exists()
    (source / "hazy/14_1.png").unlink()
    with pytest.raises(IngestError) as unreadable:
        ingest(str(source), str(dest), replace(SOTS, workers=1), progress=False)
    message = str(unreadable.value)
    assert "hazy/11_1.png <-> " in message and "unreadable image" in message
    assert "hazy/12_1.png <-> " in message and "size mismatch: input 9x8, target 12x8" in message
    assert not (dest / "manifest.json").exists()
    assert not list(dest.rglob("*.parquet"))


def test_on_error_skip_lists_every_skipped_pair_in_the_manifest(
    tmp_path: Path, sots_with_bad_pairs: Path
) -> None:
    skip = replace(SOTS, on_error="skip")
    result = ingest(str(sots_with_bad_pairs), str(tmp_path / "ds"), skip, progress=False)
    assert (result.pairs, result.skipped) == (1, 3)
    skipped = {Path(s.input).name: s.reason for s in Manifest.load(str(tmp_path / "ds")).skipped}
    assert set(skipped) == {"11_1.png", "12_1.png", "14_1.png"}
    assert skipped["11_1.png"].startswith("unreadable image")
    assert skipped["12_1.png"].startswith("size mismatch")
    assert skipped["14_1.png"].startswith("missing partner")
    assert [row["id"] for row in rows_of(str(tmp_path / "ds"), "test")] == ["sots/10_1"]


def test_cli_ingest_reports_summary_noop_and_errors(tmp_path: Path, sots_like: Path) -> None:
    runner = CliRunner()
    dest = str(tmp_path / "ds")
    first = runner.invoke(data, ["ingest", "--layout", "sots", "--no-progress", str(sots_like), dest])
    assert first.exit_code == 0, first.output
    assert "wrote 3 pairs (test 3) in 1 shard(s)" in first.output
    second = runner.invoke(data, ["ingest", "--layout", "sots", "--no-progress", str(sots_like), dest])
    assert second.exit_code == 0 and "is up to date" in second.output
    (sots_like / "gt/12.png").unlink()
    failed = runner.invoke(data, ["ingest", "--layout", "sots", "--no-progress", str(sots_like), dest])
    assert failed.exit_code == 1
    assert "hazy/12_1.png: missing partner" in failed.output
    needs_task = runner.invoke(data, ["ingest", "--layout", "unpaired", str(sots_like), dest])
    assert needs_task.exit_code == 1 and "layout 'unpaired' needs a task" in needs_task.output
    bad_size = runner.invoke(
        data, ["ingest", "--layout", "sots", "--shard-size", "lots", str(sots_like), dest]
    )
    assert bad_size.exit_code == 2 and "is not a size" in bad_size.output


def test_wrong_layout_or_missing_source_fails_clearly(tmp_path: Path, sots_like: Path) -> None:
    with pytest.raises(FileNotFoundError, match="layout 'lol' found no pairs among the images under"):
        ingest(str(sots_like), str(tmp_path / "ds"), IngestOptions(layout="lol"), progress=False)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ingest(str(tmp_path / "absent"), str(tmp_path / "ds"), SOTS, progress=False)
    assert not (tmp_path / "ds").exists()


def test_bad_options_are_refused_naming_the_option() -> None:
    with pytest.raises(ValueError, match="unknown layout 'sot'; choose one of its, sots"):
        IngestOptions(layout="sot")
    with pytest.raises(ValueError, match="layout 'paired' needs a task"):
        IngestOptions(layout="paired")
    with pytest.raises(ValueError, match="unknown task 'fog'"):
        IngestOptions(layout="sots", task="fog")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        IngestOptions(layout="sots", pairing=LayoutOptions(split="dev"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        IngestOptions(layout="sots", on_error="ignore")  # type: ignore[arg-type]
    assert IngestOptions(layout="unpaired", task="derain").resolved_task == "derain"
    assert SOTS.resolved_task == "dehaze"
