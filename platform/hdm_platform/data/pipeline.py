"""The Ray Data input pipeline: Parquet shards -> decoded, augmented (input, target) pairs.

Training follows the paper's recipe (section 4: patches of the training pairs, batch 16)
with the usual paired augmentations of restoration training (BasicSR's
``paired_random_crop`` + ``augment``): one random crop, horizontal flip, vertical flip and
90-degree rotation, applied identically to the degraded input and its target.

How the pieces fit:

* :func:`build_dataset` streams the shards a dataset's ``manifest.json`` lists through
  :class:`~hdm_platform.data.shard_source.ShardDatasource` (Ray Data read tasks over pyarrow,
  any fsspec filesystem), in read units of whole row groups shuffled anew each epoch for
  training, and decodes + augments them in ``map_batches`` on CPU workers. The
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
behind Ray's ``FileShuffleConfig(reseed_after_execution=True)`` and
``ray.data.expressions.random``), so each epoch sees new crops and flips, and its read
units come in a new order drawn from ``(seed, epoch)``, while a rerun with the same seed
sees the same sequence. Without a seed both are drawn from fresh entropy. A small training
split kept decoded (``keep_decoded``) is cropped by its consumer instead, with the epoch the
consumer passes to :func:`iter_pairs`: the training loop's epoch, which also counts on
across a resumed run.

Images smaller than the crop are reflect-padded (mirror without repeating the edge
pixel, ``numpy.pad(mode="reflect")``), split as evenly as possible between the two sides
of each axis, with the same padding for input and target, so a small image still yields
a full-size patch whose content stays aligned across the pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from hdm_platform.data.augment import CorruptPairError, PairCrop, PairTransform
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.shard_source import ShardDatasource
from hdm_platform.data.storage import open_filesystem

__all__ = [
    "CorruptPairError",
    "CROPPED_DECODE_BATCH_SIZE",
    "FULL_IMAGE_DECODE_BATCH_SIZE",
    "KEEP_DECODED_MAX_SHARD_BYTES",
    "PairCrop",
    "PairTransform",
    "build_dataset",
    "iter_pairs",
]

# Pairs per map_batches call. Each call is a Ray task with its own fixed cost, so crops
# (small outputs) go 32 to a task: 1.3-1.5x the pairs/s of 8 on 2 cores
# (bench/data_pipeline.py). Full-size validation images stay 8 to a task, since decoded
# pairs are 6 bytes per pixel and a batch of 12-megapixel photos must fit a worker's heap.
CROPPED_DECODE_BATCH_SIZE = 32
FULL_IMAGE_DECODE_BATCH_SIZE = 8
#: A split built with ``keep_decoded`` whose shards hold at most this many bytes is decoded
#: once and its pairs kept in Ray's object store (``Dataset.materialize``): a validation set
#: read every epoch then costs no read or decode tasks (no worker processes to start) after
#: the first pass, and a small training set is only cropped each epoch. Decoded pairs take
#: two to four times their PNG size: at most about 256 MiB of the object store.
KEEP_DECODED_MAX_SHARD_BYTES = 64 * 2**20

_SOURCE_COLUMNS = ["id", "input", "target"]


def _load_manifest(manifest_uri: str, split: str, storage_options: dict | None) -> Manifest:
    manifest = Manifest.load(manifest_uri, storage_options=storage_options)
    if split not in manifest.splits:
        raise ValueError(f"dataset {manifest_uri} has no split {split!r}; it has {sorted(manifest.splits)}")
    return manifest


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
    keep_decoded: bool = False,
) -> ray.data.Dataset:
    """A streaming Ray dataset of decoded pairs of one split of a dataset.

    Args:
        manifest_uri: The dataset folder (holding ``manifest.json``) or the manifest's URI.
        split: Which split to read, e.g. ``"train"`` or ``"val"``.
        crop_size: Square patch side. Training needs one (fixed-shape batches); for
            validation ``None`` keeps full images (iterate with batch size 1) and an int
            takes a fixed centre crop.
        train: Training: read units in random order each epoch, random crops and (with
            ``augment``) random flips/rotation. Otherwise deterministic: shards and rows in
            manifest order, centre crop or full image, no augmentation.
        seed: Makes the read order and every row's augmentation reproducible (see the
            module docstring for how it combines with the epoch and row id).
        storage_options: fsspec options for the dataset's filesystem, e.g.
            ``{"endpoint_url": ..., "region": ...}``; credentials come from the environment.
        augment: Random flips and rotation during training; crops stay random.
        decode_batch_size: Pairs decoded per task: with a crop, the size of the read
            units in pairs (whole Parquet row groups, so at most this many unless one row
            group is larger; each read task decodes what it read), without one the
            ``map_batches`` batch size (read units are then this many pairs or one row
            group, whichever is larger); by default
            :data:`CROPPED_DECODE_BATCH_SIZE` with a crop, else :data:`FULL_IMAGE_DECODE_BATCH_SIZE`.
        keep_decoded: Decode the split now, once, and keep its pairs in Ray's object store
            (a ``MaterializedDataset``) when its shards hold at most
            :data:`KEEP_DECODED_MAX_SHARD_BYTES`; a larger split streams as usual. A kept
            training split holds the full-size pairs, and whoever iterates it crops them
            (``iter_pairs(..., crop=PairCrop(...), epoch=...)``: the same crops and flips as a
            decoding pass of the same seed and epoch), so a pass over it runs no Ray task.

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
    crop = PairCrop(crop_size=crop_size, random_crop=train, augment=train and augment, seed=seed)
    small = sum(shard.bytes for shard in manifest.splits[split].shards) <= KEEP_DECODED_MAX_SHARD_BYTES
    if not (keep_decoded and small):
        return _decoded_pairs(shard_uris, storage_options, crop, decode_batch_size, train=train)
    # Validation keeps the pairs it reads every pass (full images or centre crops); training
    # keeps the full-size pairs, and each pass's crops are the consumer's (iter_pairs).
    if train:
        crop, decode_batch_size = PairCrop(crop_size=None, random_crop=False, augment=False, seed=seed), FULL_IMAGE_DECODE_BATCH_SIZE
    return _decoded_pairs(shard_uris, storage_options, crop, decode_batch_size, train=False).materialize()


def _decoded_pairs(
    shard_uris: list[str], storage_options: dict | None, crop: PairCrop, decode_batch_size: int, *, train: bool
) -> ray.data.Dataset:
    """The shards read in read units of about ``decode_batch_size`` pairs (in a new order
    each training pass), decoded and cropped by ``crop``'s settings."""
    filesystem, _ = open_filesystem(shard_uris[0], storage_options)
    source = ShardDatasource(
        shard_uris, filesystem, columns=_SOURCE_COLUMNS, unit_rows=decode_batch_size, shuffle=train, seed=crop.seed
    )
    dataset = ray.data.read_datasource(source, override_num_blocks=len(source.units))
    transform = PairTransform(**vars(crop))
    crop_size = crop.crop_size
    # Crops: no batch_size, so Ray fuses the decode into the read task and each task reads
    # one read unit (about one decode batch) and decodes it: the encoded bytes never pass
    # through the object store, and decoding does not wait behind Ray's read-ahead of
    # every unit (bench/RESULTS.md). Full images keep a fixed batch: a read unit holds
    # whole row groups (up to 32 pairs) and that many decoded 12-megapixel pairs would not
    # fit a worker's heap.
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
    """Numpy uint8 batch -> float32 ``(input, target)`` tensors in [0, 1], without the ids:
    rows ``rank::count`` of the batch, cropped first by ``crop`` in ``epoch`` when there is one."""

    def __init__(self, crop: PairCrop | None = None, epoch: int = 0, share: tuple[int, int] = (0, 1)) -> None:
        super().__init__()
        self.crop = crop
        self.epoch = epoch
        self.rank, self.count = share

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        if self.count > 1:
            batch = {column: values[self.rank :: self.count] for column, values in batch.items()}
        if self.crop is not None:
            batch = self.crop.crop_batch(batch, self.epoch)
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
    crop: PairCrop | None = None,
    epoch: int = 0,
    share: tuple[int, int] = (0, 1),
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
        crop: Crops (and flips) each batch on the consuming worker: the crops of a training
            split kept decoded (``build_dataset(..., keep_decoded=True)``).
        epoch: The pass whose crops ``crop`` takes (0 for the first).
        share: ``(rank, count)``: ``count`` consumers each iterate the whole dataset in the
            same order (the same ``seed``), and this one takes rows ``rank::count`` of every
            ``count * batch_size``: how the training workers divide a training split kept
            decoded, with no streaming split (and its coordinating actor) between them.
    """
    rank, count = share
    if not 0 <= rank < count:
        raise ValueError(f"share: rank {rank} is not one of {count} consumers")
    buffer_size = local_shuffle_buffer_size or None
    if buffer_size is not None and buffer_size < batch_size * count:
        raise ValueError(
            f"local_shuffle_buffer_size ({buffer_size}) must be at least batch_size ({batch_size}) "
            f"times the consumers sharing the batches ({count})"
        )
    batches: Any = data_iterator_or_dataset.iter_torch_batches(
        batch_size=batch_size * count,
        device="auto" if device is None else device,
        collate_fn=_PairCollate(crop, epoch, share),
        drop_last=drop_last,
        local_shuffle_buffer_size=buffer_size,
        local_shuffle_seed=seed,
    )
    yield from batches
