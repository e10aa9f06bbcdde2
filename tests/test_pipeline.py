"""The Ray Data input pipeline over Parquet shards (hdm_platform.data.pipeline).

The datasets are tiny "coordinate images": red = column, green = row, blue = an image
index, so every output pixel says where in which source image it came from, and crops,
flips, rotations and padding can be checked exactly. Targets are the inverted inputs, so
a pair processed differently on its two sides cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
from PIL import Image
from ray.data import DataContext
from ray.data.dataset import MaterializedDataset

from hdm_platform.data import pipeline
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.pipeline import (
    CorruptPairError,
    PairCrop,
    PairTransform,
    build_dataset,
    iter_pairs,
)
from hdm_platform.data.shard_source import ShardDatasource, arrow_filesystem, completed_passes
from hdm_platform.data.storage import open_filesystem
from hdm_platform.data.shard_writer import DatasetWriter, Row

CROP = 16


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    # Starts after the S3 fixture so the Ray workers inherit its AWS_* environment.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def coordinate_image(width: int, height: int, index: int) -> np.ndarray:
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([columns, rows, np.full_like(columns, index)], axis=-1).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_row(pair_id: str, split: str, pixels: np.ndarray, input_bytes: bytes | None = None) -> Row:
    return Row(
        id=pair_id,
        task="dehaze",
        split=split,
        input=input_bytes if input_bytes is not None else png(pixels),
        target=png(255 - pixels),
        input_format="PNG",
        target_format="PNG",
        width=pixels.shape[1],
        height=pixels.shape[0],
        source_input=f"test/{pair_id}/input.png",
        source_target=f"test/{pair_id}/target.png",
    )


def write_dataset(uri: str, rows: list[Row], *, shard_size: int = 1) -> Manifest:
    # shard_size=1 byte: one row per shard, so file shuffling and splitting have files to move.
    with DatasetWriter(uri, shard_size=shard_size, workers=2) as writer:
        for row in rows:
            writer.add(row)
        return writer.commit(
            name="pipeline-test",
            task="dehaze",
            layout="test",
            paired=True,
            source="generated",
            fingerprint="0" * 64,
        )


# (width, height); train/5 is smaller than the crop.
IMAGE_SIZES = {
    "train": [(40, 36), (48, 40), (36, 44), (44, 48), (40, 40), (12, 10)],
    "val": [(24, 20), (30, 26), (20, 28)],
}


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("pairs"))
    rows = [
        pair_row(f"{split}/{index}", split, coordinate_image(width, height, index))
        for split, sizes in IMAGE_SIZES.items()
        for index, (width, height) in enumerate(sizes)
    ]
    write_dataset(uri, rows)
    return uri


def by_id(dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One pass over a pair dataset: row id -> (input, target), in [0, 255] as float64."""
    pairs = {}
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        for row_id, source, target in zip(batch["id"], batch["input"], batch["target"], strict=True):
            pairs[str(row_id)] = (np.asarray(source, np.float64), np.asarray(target, np.float64))
    return pairs


def dihedral_placement(crop: np.ndarray) -> tuple[int, int, bool, bool, bool]:
    """For a CHW crop of a coordinate image: (left, top, flipped_h, flipped_v, transposed)."""
    columns, rows = np.rint(crop[0]).astype(int), np.rint(crop[1]).astype(int)
    transposed = bool(np.all(columns == columns[:, :1]))  # column index varies down the crop
    step_x = np.diff(columns, axis=0 if transposed else 1)
    step_y = np.diff(rows, axis=1 if transposed else 0)
    assert np.all(np.abs(step_x) == 1) and np.all(np.abs(step_y) == 1), "not a rigid crop of the source"
    assert len(np.unique(np.sign(step_x))) == 1 and len(np.unique(np.sign(step_y))) == 1
    return int(columns.min()), int(rows.min()), bool(step_x.flat[0] < 0), bool(step_y.flat[0] < 0), transposed


def test_training_batches_have_fixed_shapes_and_cover_the_split(ray_cluster, dataset_uri):
    dataset = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=3)
    batches = list(iter_pairs(dataset, batch_size=4, local_shuffle_buffer_size=4, seed=1))
    assert [tuple(source.shape) for source, _ in batches] == [(4, 3, CROP, CROP), (2, 3, CROP, CROP)]
    for source, target in batches:
        assert source.dtype == target.dtype == torch.float32
        assert source.device.type == "cpu"
        assert 0.0 <= float(source.min()) and float(source.max()) <= 1.0
    assert Manifest.load(dataset_uri).splits["train"].rows == len(IMAGE_SIZES["train"])


def transform_batch(rows: list[Row]) -> dict[str, np.ndarray]:
    """The columns build_dataset hands to PairTransform, for calling it without Ray."""
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "id": column([row.id for row in rows]),
        "input": column([row.input for row in rows]),
        "target": column([row.target for row in rows]),
        "path": column([f"/data/shards/train-g-{index:05d}.parquet" for index in range(len(rows))]),
    }


ORIENTATIONS = {(h, v, t) for h in (False, True) for v in (False, True) for t in (False, True)}


def test_pair_transform_augments_both_sides_identically():
    rows = [pair_row(f"train/{index}", "train", coordinate_image(40, 36, index)) for index in range(64)]
    transform = PairTransform(crop_size=CROP, random_crop=True, augment=True, seed=7)
    output = transform(transform_batch(rows))
    sources, targets = output["input"], output["target"]
    assert sources.dtype == np.uint8 and sources.shape == (64, 3, CROP, CROP)
    np.testing.assert_array_equal(targets, 255 - sources)
    placements = [dihedral_placement(source) for source in sources]
    assert [int(np.rint(source[2, 0, 0])) for source in sources] == list(range(64))
    assert len({placement[:2] for placement in placements}) > 32  # crop positions vary
    assert {placement[2:] for placement in placements} == ORIENTATIONS
    # Each row's draw depends only on (seed, epoch, id): not on its batch or position.
    alone = transform(transform_batch(rows[5:6]))["input"][0]
    np.testing.assert_array_equal(alone, output["input"][5])
    other_seed = PairTransform(crop_size=CROP, random_crop=True, augment=True, seed=8)(transform_batch(rows))
    assert not np.array_equal(other_seed["input"], output["input"])


def test_pair_transform_without_augment_only_crops():
    rows = [pair_row(f"train/{index}", "train", coordinate_image(40, 36, index)) for index in range(16)]
    output = PairTransform(crop_size=CROP, random_crop=True, augment=False, seed=1)(transform_batch(rows))
    assert {dihedral_placement(source)[2:] for source in output["input"]} == {(False, False, False)}


def test_pair_transform_errors_name_the_row_and_shard():
    good = coordinate_image(20, 20, 0)
    truncated = pair_row("bad/1", "train", good, input_bytes=png(good)[:60])
    transform = PairTransform(crop_size=CROP, random_crop=True, augment=True, seed=0)
    message = r"row 'bad/1' in shard /data/shards/train-g-00001.parquet: cannot decode the input image"
    with pytest.raises(CorruptPairError, match=message):
        transform(transform_batch([pair_row("ok/0", "train", good), truncated]))
    mismatched = dataclasses.replace(pair_row("odd/0", "train", good), target=png(coordinate_image(20, 24, 0)))
    with pytest.raises(CorruptPairError, match=r"row 'odd/0' .*input is 20x20 but target is 20x24"):
        transform(transform_batch([mismatched]))
    unpaired = dataclasses.replace(pair_row("infer/0", "infer", good), target=None)
    with pytest.raises(CorruptPairError, match=r"row 'infer/0' .*no target image"):
        transform(transform_batch([unpaired]))


def test_epochs_change_the_augmentation_reproducibly(ray_cluster, dataset_uri):
    dataset = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=7)
    epochs = [by_id(dataset) for _ in range(2)]
    for pairs in epochs:
        assert sorted(pairs) == sorted(f"train/{index}" for index in range(len(IMAGE_SIZES["train"])))
        for row_id, (source, target) in pairs.items():
            assert source.shape == target.shape == (3, CROP, CROP)
            np.testing.assert_allclose(target, 255 - source, atol=1e-3, err_msg=row_id)
    changed = [row_id for row_id in epochs[0] if not np.array_equal(epochs[0][row_id][0], epochs[1][row_id][0])]
    assert len(changed) >= 4
    # Same seed, new dataset: its first epoch repeats the first epoch above.
    rerun = by_id(build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=7))
    for row_id, (source, _) in epochs[0].items():
        np.testing.assert_array_equal(rerun[row_id][0], source)


def test_images_smaller_than_the_crop_are_reflect_padded(ray_cluster, dataset_uri):
    dataset = build_dataset(dataset_uri, "train", crop_size=CROP, train=False)
    source, target = by_id(dataset)["train/5"]
    small = coordinate_image(12, 10, 5)
    expected = np.pad(small, ((3, 3), (2, 2), (0, 0)), mode="reflect").transpose(2, 0, 1)
    np.testing.assert_allclose(source, expected, atol=1e-3)
    np.testing.assert_allclose(target, 255 - expected, atol=1e-3)


def test_validation_is_deterministic_full_size_or_centre_cropped(ray_cluster, dataset_uri):
    full = build_dataset(dataset_uri, "val", crop_size=None, train=False)
    passes = [list(iter_pairs(full, batch_size=1)) for _ in range(2)]
    assert len(passes[0]) == len(IMAGE_SIZES["val"])
    for (first_input, first_target), (second_input, second_target) in zip(*passes, strict=True):
        assert torch.equal(first_input, second_input) and torch.equal(first_target, second_target)
    # Manifest order, full size, untouched pixels.
    for (source, target), (index, (width, height)) in zip(passes[0], enumerate(IMAGE_SIZES["val"]), strict=True):
        expected = torch.from_numpy(coordinate_image(width, height, index)).permute(2, 0, 1) / 255.0
        assert tuple(source.shape) == (1, 3, height, width)
        torch.testing.assert_close(source[0], expected)
        torch.testing.assert_close(target[0], 1.0 - expected)
    with pytest.raises(ValueError, match="batch_size=1"):
        next(iter(iter_pairs(full, batch_size=3)))

    centre = by_id(build_dataset(dataset_uri, "val", crop_size=CROP, train=False))
    source, _ = centre["val/1"]  # 30 wide, 26 high
    np.testing.assert_allclose(source, coordinate_image(30, 26, 1)[5:21, 7:23].transpose(2, 0, 1), atol=1e-3)


def test_a_small_validation_split_is_decoded_once_and_a_large_one_streams(ray_cluster, dataset_uri, monkeypatch):
    kept = build_dataset(dataset_uri, "val", crop_size=None, train=False, keep_decoded=True)
    # Decoded now: later passes read the kept blocks and plan no read or decode task.
    assert isinstance(kept, MaterializedDataset)
    streamed = build_dataset(dataset_uri, "val", crop_size=None, train=False)
    for first, second in zip(iter_pairs(kept, batch_size=1), iter_pairs(streamed, batch_size=1), strict=True):
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    monkeypatch.setattr(pipeline, "KEEP_DECODED_MAX_SHARD_BYTES", 10)
    large = build_dataset(dataset_uri, "val", crop_size=None, train=False, keep_decoded=True)
    assert not isinstance(large, MaterializedDataset)


def kept_crops(kept, crop: PairCrop, epoch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One pass over a kept training split, cropped as a training worker crops it."""
    pairs = {}
    for batch in kept.iter_batches(batch_format="numpy", batch_size=None):
        cropped = crop.crop_batch(batch, epoch)
        for row_id, source, target in zip(cropped["id"], cropped["input"], cropped["target"], strict=True):
            pairs[str(row_id)] = (np.asarray(source, np.float64), np.asarray(target, np.float64))
    return pairs


def test_a_small_training_split_kept_decoded_gets_the_crops_of_a_decoding_pass(ray_cluster, dataset_uri):
    kept = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=7, keep_decoded=True)
    # Full-size pairs: a pass plans no Ray task, the consumer crops.
    assert isinstance(kept, MaterializedDataset)
    assert {tuple(row["input"].shape) for row in kept.iter_rows()} == {(3, h, w) for w, h in IMAGE_SIZES["train"]}
    crop = PairCrop(crop_size=CROP, random_crop=True, augment=True, seed=7)
    streamed = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=7)
    kept_epochs = [kept_crops(kept, crop, epoch) for epoch in range(2)]
    for kept_pairs in kept_epochs:
        streamed_pairs = by_id(streamed)
        assert sorted(kept_pairs) == sorted(streamed_pairs) == sorted(f"train/{i}" for i in range(len(IMAGE_SIZES["train"])))
        for row_id, (source, target) in kept_pairs.items():
            np.testing.assert_array_equal(source, streamed_pairs[row_id][0], err_msg=row_id)
            np.testing.assert_array_equal(target, streamed_pairs[row_id][1], err_msg=row_id)
    assert sum(not np.array_equal(kept_epochs[0][i][0], kept_epochs[1][i][0]) for i in kept_epochs[0]) >= 4
    # iter_pairs crops in its collate: the same crops, as float tensors in [0, 1].
    batches = list(iter_pairs(kept, batch_size=1, crop=crop, epoch=1))
    expected = kept_epochs[1]
    ids = [str(row["id"]) for row in kept.iter_rows()]
    for row_id, (inputs, targets) in zip(ids, batches, strict=True):
        assert inputs.shape == (1, 3, CROP, CROP) and inputs.dtype == torch.float32
        np.testing.assert_allclose(inputs[0].numpy() * 255, expected[row_id][0], atol=1e-3, err_msg=row_id)
        np.testing.assert_allclose(targets[0].numpy() * 255, expected[row_id][1], atol=1e-3, err_msg=row_id)


def test_workers_sharing_a_kept_split_take_disjoint_rows_of_each_global_batch(ray_cluster, dataset_uri):
    kept = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=7, keep_decoded=True)
    crop = PairCrop(crop_size=CROP, random_crop=True, augment=True, seed=7)
    expected = kept_crops(kept, crop, epoch=2)
    # Each worker iterates the whole split in the same shuffled order and keeps rows rank::2.
    shares = [
        list(iter_pairs(kept, batch_size=1, local_shuffle_buffer_size=4, seed=3, drop_last=True, crop=crop, epoch=2, share=(rank, 2)))
        for rank in range(2)
    ]
    assert [len(batches) for batches in shares] == [3, 3]
    indices: list[list[int]] = [[], []]
    for rank, batches in enumerate(shares):
        for inputs, targets in batches:
            assert inputs.shape == (1, 3, CROP, CROP)
            index = int(round(float(inputs[0, 2].mean()) * 255))  # the blue channel holds the row index
            indices[rank].append(index)
            np.testing.assert_allclose(inputs[0].numpy() * 255, expected[f"train/{index}"][0], atol=1e-3)
            np.testing.assert_allclose(targets[0].numpy() * 255, expected[f"train/{index}"][1], atol=1e-3)
    assert sorted(indices[0] + indices[1]) == list(range(6))
    # The shared order is the local shuffle's, the same for every worker given one seed.
    reshuffled = list(iter_pairs(kept, batch_size=1, local_shuffle_buffer_size=4, seed=4, drop_last=True, crop=crop, epoch=2, share=(0, 2)))
    assert [int(round(float(inputs[0, 2].mean()) * 255)) for inputs, _ in reshuffled] != indices[0]
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        next(iter_pairs(kept, batch_size=1, share=(2, 2)))
    with pytest.raises(ValueError, match="times the consumers"):
        next(iter_pairs(kept, batch_size=2, local_shuffle_buffer_size=3, share=(0, 2)))


def test_reads_shards_from_s3(ray_cluster, s3_bucket):
    uri = f"{s3_bucket}/datasets/tiny"
    rows = [pair_row(f"s3/{index}", "train", coordinate_image(20, 20, index)) for index in range(4)]
    write_dataset(uri, rows)
    dataset = build_dataset(uri, "train", crop_size=CROP, train=True, seed=0)
    pairs = by_id(dataset)
    assert sorted(pairs) == [f"s3/{index}" for index in range(4)]
    for row_id, (source, target) in pairs.items():
        np.testing.assert_allclose(target, 255 - source, atol=1e-3)
        assert np.all(np.rint(source[2]) == int(row_id.split("/")[1]))


def test_corrupt_row_error_names_the_row_and_shard(ray_cluster, tmp_path):
    good = coordinate_image(20, 20, 0)
    broken = png(good)[:60]  # a PNG cut off inside its pixel data
    manifest = write_dataset(
        str(tmp_path), [pair_row("ok/0", "train", good), pair_row("bad/1", "train", good, input_bytes=broken)]
    )
    shard = next(uri for uri in manifest.shard_uris("train") if "00001" in uri).rsplit("/", 1)[1]
    dataset = build_dataset(str(tmp_path), "train", crop_size=CROP, train=True, seed=0)
    with pytest.raises(Exception, match=r"row 'bad/1' in shard \S*" + shard + r": cannot decode the input image"):
        by_id(dataset)


@pytest.mark.parametrize("keep_decoded", [False, True], ids=["streamed", "kept-decoded"])
def test_streaming_split_shares_the_rows_between_workers_every_epoch(ray_cluster, dataset_uri, keep_decoded):
    dataset = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=5, keep_decoded=keep_decoded)
    # A kept split's readers crop it, as the training workers do.
    crop = PairCrop(crop_size=CROP, random_crop=True, augment=True, seed=5) if keep_decoded else None
    shards = dataset.streaming_split(2, equal=False)
    all_ids = sorted(f"train/{index}" for index in range(len(IMAGE_SIZES["train"])))
    epochs = []
    for epoch in range(2):
        seen: list[dict[str, np.ndarray]] = [{}, {}]

        def consume(rank: int) -> None:
            for batch in shards[rank].iter_batches(batch_format="numpy", batch_size=1):
                batch = crop.crop_batch(batch, epoch) if crop is not None else batch
                seen[rank].update(zip(map(str, batch["id"]), batch["input"], strict=True))

        # A streaming split is consumed by all its readers at once, as Ray Train's workers do.
        threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not set(seen[0]) & set(seen[1])
        assert sorted([*seen[0], *seen[1]]) == all_ids
        epochs.append(seen[0] | seen[1])
    # Each epoch of the split is a new execution (or a kept split's reader crops the next
    # epoch), so the augmentation moves on, and it is the augmentation of the dataset's own
    # first two passes.
    assert sum(not np.array_equal(epochs[0][row_id], epochs[1][row_id]) for row_id in all_ids) >= 4
    reference = build_dataset(dataset_uri, "train", crop_size=CROP, train=True, seed=5)
    for epoch in epochs:
        expected = by_id(reference)
        assert all(np.array_equal(epoch[row_id], expected[row_id][0]) for row_id in all_ids)


def test_bad_arguments_are_rejected(ray_cluster, dataset_uri):
    with pytest.raises(ValueError, match="crop_size"):
        build_dataset(dataset_uri, "train", crop_size=None, train=True)
    with pytest.raises(ValueError, match="no split 'test'"):
        build_dataset(dataset_uri, "test", crop_size=CROP, train=False)
    dataset = build_dataset(dataset_uri, "val", crop_size=CROP, train=False)
    with pytest.raises(ValueError, match="at least batch_size"):
        next(iter_pairs(dataset, batch_size=4, local_shuffle_buffer_size=2))


def test_shards_are_read_as_native_arrow_filesystems(tmp_path):
    local, _ = open_filesystem(str(tmp_path))
    assert isinstance(arrow_filesystem(local), pyarrow.fs.LocalFileSystem)
    s3, _ = open_filesystem(
        "s3://bucket/data", {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key": "k", "secret": "s"}
    )
    arrow_s3 = arrow_filesystem(s3)
    assert isinstance(arrow_s3, pyarrow.fs.S3FileSystem)
    options = arrow_s3.__reduce__()[1][0]
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:9000", "http", "eu-west-1")
    assert (options["access_key"], options["secret_key"]) == ("k", "s")
    memory, _ = open_filesystem("memory://data")
    assert isinstance(arrow_filesystem(memory), pyarrow.fs.PyFileSystem)


def test_s3_keys_from_the_environment_are_passed_to_pyarrow(monkeypatch):
    # Without keys pyarrow builds AWS's whole default credentials chain in every read task.
    endpoint = {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1"}
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    s3, _ = open_filesystem("s3://bucket/data", endpoint)
    assert arrow_filesystem(s3).__reduce__()[1][0]["access_key"] is None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    options = arrow_filesystem(s3).__reduce__()[1][0]
    assert (options["access_key"], options["secret_key"], options["session_token"]) == ("env-key", "env-secret", "env-token")
    anonymous, _ = open_filesystem("s3://bucket/data", {**endpoint, "anon": True})
    options = arrow_filesystem(anonymous).__reduce__()[1][0]
    assert options["anonymous"] and options["access_key"] is None


def test_each_read_task_reads_and_decodes_one_decode_batch(ray_cluster, tmp_path):
    rows = [pair_row(f"train/{index}", "train", coordinate_image(20, 20, index % 256)) for index in range(80)]
    manifest = write_dataset(str(tmp_path), rows, shard_size=2**30)
    (shard_uri,) = manifest.shard_uris("train")
    row_groups = pq.ParquetFile(shard_uri).metadata
    assert [row_groups.row_group(i).num_rows for i in range(row_groups.num_row_groups)] == [32, 32, 16]
    dataset = build_dataset(str(tmp_path), "train", crop_size=CROP, train=True, seed=0, decode_batch_size=32)
    assert len(by_id(dataset)) == 80
    # Crops: the decode is fused into the read, one task per row group.
    assert "ReadShards->MapBatches(PairTransform): 3 tasks executed" in dataset.stats()
    validation = build_dataset(str(tmp_path), "train", crop_size=None, train=False, decode_batch_size=8)
    assert len(by_id(validation)) == 80
    # Full images: a read task per row group, then decode tasks calling the transform
    # with 8 pairs at a time.
    stats = validation.stats()
    assert "ReadShards: 3 tasks executed" in stats and "MapBatches(PairTransform): 3 tasks executed" in stats


def test_read_units_pack_whole_row_groups_of_one_shard(tmp_path):
    rows = [pair_row(f"train/{index}", "train", coordinate_image(8, 8, index)) for index in range(80)]
    manifest = write_dataset(str(tmp_path), rows, shard_size=2**30)  # one shard, row groups of 32, 32, 16
    filesystem, _ = open_filesystem(str(tmp_path))

    def units(unit_rows: int) -> list[tuple[tuple[int, ...], int]]:
        source = ShardDatasource(
            manifest.shard_uris("train"), filesystem, columns=["id"], unit_rows=unit_rows, shuffle=False, seed=None
        )
        return [(unit.row_groups, unit.rows) for unit in source.units]

    assert units(32) == [((0,), 32), ((1,), 32), ((2,), 16)]
    assert units(64) == [((0, 1), 64), ((2,), 16)]
    assert units(8) == [((0,), 32), ((1,), 32), ((2,), 16)]  # a row group is never split
    assert units(1000) == [((0, 1, 2), 80)]


def test_read_units_come_in_a_new_reproducible_order_every_epoch(dataset_uri):
    manifest = Manifest.load(dataset_uri)
    shard_uris = manifest.shard_uris("train")  # one pair per shard
    filesystem, _ = open_filesystem(dataset_uri)

    def read_order(shuffle: bool, seed: int | None, epoch: int) -> list[str]:
        source = ShardDatasource(shard_uris, filesystem, columns=["id"], unit_rows=32, shuffle=shuffle, seed=seed)
        context = DataContext.get_current().copy()
        context._execution_idx = epoch
        tasks = source.get_read_tasks(1, data_context=context)
        return [task.metadata.input_files[0] for task in tasks]

    epochs = [read_order(True, 7, epoch) for epoch in range(3)]
    assert all(sorted(order) == sorted(shard_uris) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert [read_order(True, 7, epoch) for epoch in range(3)] == epochs
    assert read_order(True, 8, 0) != epochs[0]
    assert read_order(False, 7, 2) == shard_uris


def test_read_units_carry_their_rows_and_shard_uri(dataset_uri):
    manifest = Manifest.load(dataset_uri)
    filesystem, _ = open_filesystem(dataset_uri)
    source = ShardDatasource(
        manifest.shard_uris("val"), filesystem, columns=["id", "width"], unit_rows=32, shuffle=False, seed=None
    )
    (table,) = [table for task in source.get_read_tasks(1) for table in task()][:1]
    assert table.column_names == ["id", "width", "path"]
    assert table.to_pylist() == [{"id": "val/0", "width": 24, "path": manifest.shard_uris("val")[0]}]


def test_a_missing_or_foreign_shard_is_named_when_the_dataset_is_built(ray_cluster, tmp_path):
    rows = [pair_row(f"train/{index}", "train", coordinate_image(20, 20, index)) for index in range(3)]
    manifest = write_dataset(str(tmp_path), rows)
    first, second, _ = manifest.shard_uris("train")
    Path(second).unlink()
    with pytest.raises(OSError, match=rf"cannot read the Parquet footer of shard {re.escape(second)}"):
        build_dataset(str(tmp_path), "train", crop_size=CROP, train=True)
    pq.write_table(pa.table({"id": ["x"]}), first)  # a Parquet file without the image columns
    with pytest.raises(ValueError, match=rf"shard {re.escape(first)} lacks the column\(s\) input, target"):
        build_dataset(str(tmp_path), "train", crop_size=CROP, train=True)


def test_a_shard_gone_after_the_dataset_was_built_is_named_by_the_read(ray_cluster, tmp_path):
    rows = [pair_row(f"train/{index}", "train", coordinate_image(20, 20, index)) for index in range(2)]
    manifest = write_dataset(str(tmp_path), rows)
    dataset = build_dataset(str(tmp_path), "train", crop_size=CROP, train=False)
    gone = manifest.shard_uris("train")[1]
    Path(gone).unlink()
    with pytest.raises(Exception, match=rf"cannot read row groups \[0\] of shard {re.escape(gone)}"):
        by_id(dataset)


def test_completed_passes_reads_rays_execution_index_and_fails_loudly_without_it():
    # The one private Ray Data surface the pipeline reads (no public API says which pass runs).
    context = DataContext.get_current().copy()
    assert completed_passes(context) == 0
    context._execution_idx = 3
    assert completed_passes(context) == 3
    del context._execution_idx
    with pytest.raises(RuntimeError, match="completed_passes needs updating"):
        completed_passes(context)


def test_one_file_is_the_same_picture_through_ingest_the_pipeline_evaluate_and_enhance(ray_cluster, tmp_path):
    # One decoder for every path: an RGBA PNG, an EXIF-rotated JPEG and a 16-bit PNG each give
    # decode_rgb8's pixels to the training pipeline, hdm evaluate and hdm enhance.
    from click.testing import CliRunner

    from hdm_platform.cli.enhance import enhance as enhance_command
    from hdm_platform.data.ingest import IngestOptions, ingest
    from hdm_platform.data.layouts import LayoutOptions
    from hdm_platform.evaluate import iter_split_pairs
    from hdm_platform.imageio import decode_rgb8, probe_image

    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(5)
    files = {
        "rgba.png": (Image.fromarray(np.dstack([rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), rng.integers(0, 256, (24, 32), dtype=np.uint8)])), {}),
        "rotated.jpg": (Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), {"exif": exif, "quality": 95}),
        "deep.png": (Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)), {}),
    }
    for side in ("input", "target"):
        (tmp_path / "src" / side).mkdir(parents=True)
        for name, (image, options) in files.items():
            image.save(tmp_path / "src" / side / name, **options)
    pairing = LayoutOptions(split="test", input_dir="input", target_dir="target")
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(layout="paired", task="dehaze", pairing=pairing), progress=False)
    expected = {Path(name).stem: decode_rgb8(tmp_path / "src" / "input" / name) for name in files}
    assert expected["rotated"].shape == (32, 24, 3)  # upright
    assert probe_image((tmp_path / "src/input/rotated.jpg").read_bytes(), "r").width == 24

    dataset = build_dataset(str(tmp_path / "ds"), "test", crop_size=None, train=False)
    from_pipeline = {str(row["id"]).rsplit("/", 1)[-1].split(".")[0]: row["input"].transpose(1, 2, 0) for row in dataset.iter_rows()}
    from_evaluate = {row_id.rsplit("/", 1)[-1].split(".")[0]: source for row_id, source, _ in iter_split_pairs(str(tmp_path / "ds"), "test")}
    cli = CliRunner().invoke(enhance_command, [str(tmp_path / "src" / "input"), "-o", str(tmp_path / "out"), "--checkpoint", "input"])
    assert cli.exit_code == 0, cli.output
    for stem, pixels in expected.items():
        np.testing.assert_array_equal(from_pipeline[stem], pixels)
        np.testing.assert_array_equal(from_evaluate[stem], pixels)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{stem}.png").convert("RGB")), pixels)
