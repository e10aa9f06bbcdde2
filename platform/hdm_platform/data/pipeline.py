"""The Ray Data input pipeline: Parquet shards -> decoded, augmented (input, target) pairs.

Training follows the paper's recipe (section 4: patches of the training pairs, batch 16)
with the usual paired augmentations of restoration training (BasicSR's
``paired_random_crop`` + ``augment``): one random crop, horizontal flip, vertical flip and
90-degree rotation, applied identically to the degraded input and its target.

How the pieces fit:

* :func:`build_dataset` streams the shards a dataset's ``manifest.json`` lists through
  ``ray.data.read_parquet`` (any fsspec filesystem, wrapped for pyarrow), shuffled by file
  for training, and decodes + augments them in ``map_batches`` on CPU workers. The
  trainer passes the result as ``datasets={"train": ..., "val": ...}``; each Ray Train
  worker then reads its share through ``ray.train.get_dataset_shard("train")``, so one
  laptop worker and N cluster workers run the same code.
* :func:`iter_pairs` is what the training loop calls on that shard (or on a dataset):
  ``iter_torch_batches`` with a local shuffle buffer, yielding ``(input, target)``
  float32 tensors ``[B, 3, h, w]`` in [0, 1].

Reproducibility: with a ``seed``, every row's augmentation comes from its own generator
seeded by ``(seed, epoch, row id)``, so it does not depend on which worker, block or
batch the row lands in. The epoch is Ray Data's execution index of the dataset: it
starts at 0 and grows by one each time a pass over the dataset completes (the counter
behind ``FileShuffleConfig(reseed_after_execution=True)`` and
``ray.data.expressions.random``), so each epoch sees new crops and flips while a rerun
with the same seed sees the same sequence. Without a seed the augmentations are drawn
from fresh entropy.

Images smaller than the crop are reflect-padded (mirror without repeating the edge
pixel, ``numpy.pad(mode="reflect")``), split as evenly as possible between the two sides
of each axis, with the same padding for input and target, so a small image still yields
a full-size patch whose content stays aligned across the pair.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow.fs
import ray.data
import s3fs
import torch
from fsspec.implementations.local import LocalFileSystem
from ray.data import FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from hdm_platform.data.augment import PATH_COLUMN, CorruptPairError, PairTransform, decode_rgb
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.storage import open_filesystem

__all__ = [
    "CorruptPairError",
    "CROPPED_DECODE_BATCH_SIZE",
    "FULL_IMAGE_DECODE_BATCH_SIZE",
    "PairTransform",
    "build_dataset",
    "decode_rgb",
    "iter_pairs",
    "split_rows",
]

# Pairs per map_batches call. Each call is a Ray task with its own fixed cost, so crops
# (small outputs) go 32 to a task: 1.3-1.5x the pairs/s of 8 on 2 cores
# (bench/data_pipeline.py). Full-size validation images stay 8 to a task, since decoded
# pairs are 6 bytes per pixel and a batch of 12-megapixel photos must fit a worker's heap.
CROPPED_DECODE_BATCH_SIZE = 32
FULL_IMAGE_DECODE_BATCH_SIZE = 8

_SOURCE_COLUMNS = ["id", "input", "target"]

# Ray's Parquet reader starts this many footer-reading actors on every pass over the data
# (default 32, sized for listing thousands of files on a cluster). A manifest names a few
# shards, and on a laptop 32 actor start-ups cost seconds per epoch; one actor reads
# footers with 128 concurrent requests.
_FOOTER_READERS_VARIABLE = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_READERS = 1
# Ray packs Parquet row groups into read units of this many bytes (default 128 MiB: a whole
# small dataset in one task). The pipeline sets it to one decode batch of pairs, so every
# CPU gets units to decode without a repartition step (which copied all the encoded bytes
# through the object store once more), and with crops each read task decodes its own unit.
_READ_UNIT_BYTES_VARIABLE = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"


@contextlib.contextmanager
def _reader_settings(settings: dict[str, str]) -> Iterator[None]:
    """Sets Ray reader variables while ``read_parquet`` plans the read.

    Ray reads them when ``read_parquet`` builds its (pickled) lister and partitioner, so
    they need not outlive the call. A variable the operator has set wins.
    """
    added = {name: value for name, value in settings.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


_ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
_ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
_ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"


def _arrow_filesystem(filesystem: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """The pyarrow filesystem Ray's Parquet reader gets for an fsspec filesystem.

    S3 and the local disk get pyarrow's native (C++) filesystems with the same endpoint,
    region and credentials; reading shards from S3 through the Python wrapper of s3fs cost
    the read tasks a third more CPU than decoding alone (bench/RESULTS.md). Every other
    fsspec filesystem is wrapped as it is.
    """
    if isinstance(filesystem, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    if isinstance(filesystem, s3fs.S3FileSystem):
        options: dict[str, Any] = {"anonymous": bool(filesystem.anon)}
        if filesystem.key or filesystem.secret:
            options.update(access_key=filesystem.key, secret_key=filesystem.secret, session_token=filesystem.token)
        elif not filesystem.anon and _ENV_ACCESS_KEY in os.environ and _ENV_SECRET_KEY in os.environ:
            # The first link of AWS's default credentials chain, taken here once: without
            # keys, every read task that unpickles the filesystem builds the whole chain
            # (15 ms a task). Profiles, instance roles and web identity stay with the chain,
            # which refreshes their temporary credentials.
            options.update(
                access_key=os.environ[_ENV_ACCESS_KEY],
                secret_key=os.environ[_ENV_SECRET_KEY],
                session_token=os.environ.get(_ENV_SESSION_TOKEN),
            )
        region = (filesystem.client_kwargs or {}).get("region_name")
        if region:
            options["region"] = region
        if filesystem.endpoint_url:
            endpoint = urllib.parse.urlsplit(filesystem.endpoint_url)
            options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
        return pyarrow.fs.S3FileSystem(**options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


def _load_manifest(manifest_uri: str, split: str, storage_options: dict | None) -> Manifest:
    manifest = Manifest.load(manifest_uri, storage_options=storage_options)
    if split not in manifest.splits:
        raise ValueError(f"dataset {manifest_uri} has no split {split!r}; it has {sorted(manifest.splits)}")
    return manifest


def split_rows(manifest_uri: str, split: str, storage_options: dict | None = None) -> int:
    """Number of pairs in ``split``, read from the manifest (for epoch lengths and schedules)."""
    return _load_manifest(manifest_uri, split, storage_options).splits[split].rows


def build_dataset(
    manifest_uri: str,
    split: str,
    *,
    crop_size: int | None,
    train: bool,
    seed: int | None = None,
    storage_options: dict | None = None,
    augment: bool = True,
    decode_batch_size: int | None = None,
) -> ray.data.Dataset:
    """A streaming Ray dataset of decoded pairs of one split of a dataset.

    Args:
        manifest_uri: The dataset folder (holding ``manifest.json``) or the manifest's URI.
        split: Which split to read, e.g. ``"train"`` or ``"val"``.
        crop_size: Square patch side. Training needs one (fixed-shape batches); for
            validation ``None`` keeps full images (iterate with batch size 1) and an int
            takes a fixed centre crop.
        train: Training: shards in random order each epoch, random crops and (with
            ``augment``) random flips/rotation. Otherwise deterministic: shards and rows in
            manifest order, centre crop or full image, no augmentation.
        seed: Makes the file order and every row's augmentation reproducible (see the
            module docstring for how it combines with the epoch and row id).
        storage_options: fsspec options for the dataset's filesystem, e.g.
            ``{"endpoint_url": ..., "region": ...}``; credentials come from the environment.
        augment: Random flips and rotation during training; crops stay random.
        decode_batch_size: Pairs decoded per task: with a crop, the size of Ray's read
            units in pairs (whole Parquet row groups, so about this many; each read task
            decodes what it read), without one the ``map_batches`` batch size; by default
            :data:`CROPPED_DECODE_BATCH_SIZE` with a crop, else :data:`FULL_IMAGE_DECODE_BATCH_SIZE`.

    Returns:
        Rows ``{"id": str, "input": uint8 [3, h, w], "target": uint8 [3, h, w]}``;
        :func:`iter_pairs` turns them into float32 in [0, 1] on the consuming worker.
    """
    if train and crop_size is None:
        raise ValueError("training needs a crop_size: batches of full images differ in shape")
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if decode_batch_size is None:
        decode_batch_size = FULL_IMAGE_DECODE_BATCH_SIZE if crop_size is None else CROPPED_DECODE_BATCH_SIZE
    manifest = _load_manifest(manifest_uri, split, storage_options)
    shard_uris = manifest.shard_uris(split)
    if not shard_uris:
        raise ValueError(f"split {split!r} of dataset {manifest_uri} has no shards")
    filesystem, _ = open_filesystem(shard_uris[0], storage_options)
    shuffle: FileShuffleConfig | None = None
    if train:
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    split_info = manifest.splits[split]
    bytes_per_pair = sum(shard.bytes for shard in split_info.shards) / max(split_info.rows, 1)
    read_unit_bytes = max(1, round(bytes_per_pair * decode_batch_size))
    settings = {_FOOTER_READERS_VARIABLE: str(_FOOTER_READERS), _READ_UNIT_BYTES_VARIABLE: str(read_unit_bytes)}
    with _reader_settings(settings):
        dataset = ray.data.read_parquet(
            [filesystem._strip_protocol(uri) for uri in shard_uris],
            filesystem=_arrow_filesystem(filesystem),
            shuffle=shuffle,
            include_paths=True,
        ).select_columns([*_SOURCE_COLUMNS, PATH_COLUMN])
    transform = PairTransform(crop_size=crop_size, random_crop=train, augment=train and augment, seed=seed)
    # Crops: no batch_size, so Ray fuses the decode into the read task and each task reads
    # one read unit (about one decode batch) and decodes it: the encoded bytes never pass
    # through the object store, and an epoch's first batch comes ~2 s sooner because
    # decoding no longer waits behind Ray's read-ahead of every shard (bench/RESULTS.md).
    # Full images keep a fixed batch: a read unit holds whole row groups (up to 32 pairs)
    # and that many decoded 12-megapixel pairs would not fit a worker's heap.
    pairs = dataset.map_batches(
        transform,
        batch_format="numpy",
        batch_size=None if crop_size is not None else decode_batch_size,
        zero_copy_batch=True,
    )
    # Ray Data reserves half of the CPUs for its operators in equal shares by default; with
    # several operators on a laptop's few CPUs that capped the decode step at about one
    # task at a time (bench/data_pipeline.py). This pipeline is a straight line that only
    # decoding keeps busy, so it takes the CPUs as they free up.
    pairs.context.op_resource_reservation_enabled = False
    if not train:
        # Validation metrics and saved images come out in the same order every pass.
        pairs.context.execution_options.preserve_order = True
    return pairs


class _PairCollate(NumpyBatchCollateFn):
    """Numpy uint8 batch -> float32 ``(input, target)`` tensors in [0, 1], without the ids."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        return self._tensor(batch, "input"), self._tensor(batch, "target")

    @staticmethod
    def _tensor(batch: dict[str, np.ndarray], column: str) -> Tensor:
        images = batch[column]
        if images.dtype == object:
            shapes = {image.shape for image in images}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch full-size images of different sizes {sorted(shapes)}; "
                    "iterate with batch_size=1 or build the dataset with a crop_size"
                )
            images = np.stack(list(images))
        return torch.from_numpy(images).float().div_(255.0)


def iter_pairs(
    data_iterator_or_dataset: ray.data.DataIterator | ray.data.Dataset,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    local_shuffle_buffer_size: int | None = None,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``(input, target)`` float32 tensors ``[B, 3, h, w]`` from a pair dataset.

    Args:
        data_iterator_or_dataset: ``ray.train.get_dataset_shard(...)`` inside a Ray Train
            worker, or a dataset from :func:`build_dataset`.
        batch_size: Pairs per batch (per worker under Ray Train).
        device: Where the tensors go; ``None`` lets Ray pick (the worker's device under
            Ray Train, else the CPU).
        local_shuffle_buffer_size: Rows kept in a shuffle buffer on top of the shuffled
            shard order; at least ``batch_size``; ``None`` or 0 disables it.
        seed: Seed of the local shuffle buffer; pass e.g. ``seed + epoch`` for a new
            buffer order each epoch.
        drop_last: Drop a final batch smaller than ``batch_size``.
    """
    buffer_size = local_shuffle_buffer_size or None
    if buffer_size is not None and buffer_size < batch_size:
        raise ValueError(
            f"local_shuffle_buffer_size ({buffer_size}) must be at least batch_size ({batch_size})"
        )
    batches: Any = data_iterator_or_dataset.iter_torch_batches(
        batch_size=batch_size,
        device="auto" if device is None else device,
        collate_fn=_PairCollate(),
        drop_last=drop_last,
        local_shuffle_buffer_size=buffer_size,
        local_shuffle_seed=seed,
    )
    yield from batches
