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

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs
import ray.data
import torch
from PIL import Image
from ray.data import DataContext, FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from hdm_platform.data.manifest import Manifest
from hdm_platform.data.storage import open_filesystem

__all__ = [
    "CorruptPairError",
    "PairTransform",
    "build_dataset",
    "decode_rgb",
    "iter_pairs",
    "split_rows",
]

# Pairs per map_batches call. Decoded float32 crops are 12 bytes per pixel, so a handful
# of full-size images per batch keeps a worker's heap small while amortising the per-batch
# overhead of Ray's task/operator machinery.
DEFAULT_DECODE_BATCH_SIZE = 8

_SOURCE_COLUMNS = ["id", "input", "target"]
# Set by read_parquet(include_paths=True): which shard a row came from, for error messages.
_PATH_COLUMN = "path"


class CorruptPairError(ValueError):
    """A row whose images cannot be decoded or do not form a pair; names the row and shard."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode an encoded image file into 8-bit RGB, ``[H, W, 3]`` uint8.

    Greyscale, palette and alpha images are converted to RGB (alpha dropped) by PIL,
    so every dataset feeds the network three 8-bit channels.
    """
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _row_generator(seed: int | None, epoch: int, row_id: str) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    # A stable digest rather than hash(): Python salts str hashes per process.
    row_key = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, row_key])


def _reflect_pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad ``[H, W, C]`` up to at least ``size`` on both axes, centred."""
    pad_h = max(size - image.shape[0], 0)
    pad_w = max(size - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    return np.pad(image, padding, mode="reflect")


@dataclass(frozen=True)
class PairTransform:
    """Decode one batch of Parquet rows and crop/augment each pair identically.

    The ``map_batches`` function of :func:`build_dataset` (numpy batch format, runs in
    Ray tasks on CPU workers).

    Args:
        crop_size: Side of the square patch; ``None`` keeps full images (validation only).
        random_crop: Random crop position (training) instead of the centre (validation).
        augment: Random horizontal flip, vertical flip and transpose (90-degree
            rotation) of each patch; together they reach all eight symmetries of the square.
        seed: Base seed of the per-row generators; ``None`` draws from fresh entropy.
    """

    crop_size: int | None
    random_crop: bool
    augment: bool
    seed: int | None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data's execution index of this dataset: the number of completed passes.
        epoch = DataContext.get_current()._execution_idx
        pairs = [
            self._pair(row_id, input_bytes, target_bytes, shard, epoch)
            for row_id, input_bytes, target_bytes, shard in zip(
                batch["id"], batch["input"], batch["target"], batch[_PATH_COLUMN], strict=True
            )
        ]
        return {
            "id": batch["id"],
            "input": self._stack([source for source, _ in pairs]),
            "target": self._stack([target for _, target in pairs]),
        }

    def _pair(
        self, row_id: str, input_bytes: bytes | None, target_bytes: bytes | None, shard: str, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        where = f"row {row_id!r} in shard {shard}"
        if input_bytes is None or target_bytes is None:
            missing = "input" if input_bytes is None else "target"
            raise CorruptPairError(f"{where}: no {missing} image (unpaired rows cannot be trained on)")
        source = self._decode(input_bytes, "input", where)
        target = self._decode(target_bytes, "target", where)
        if source.shape != target.shape:
            raise CorruptPairError(
                f"{where}: input is {source.shape[1]}x{source.shape[0]} but target is "
                f"{target.shape[1]}x{target.shape[0]}; a pair must have one size"
            )
        rng = _row_generator(self.seed, epoch, row_id)
        source, target = self._crop(source, target, rng)
        if self.augment:
            source, target = self._flip_and_rotate(source, target, rng)
        return source, target

    @staticmethod
    def _decode(data: bytes, field: str, where: str) -> np.ndarray:
        try:
            return decode_rgb(data)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise CorruptPairError(f"{where}: cannot decode the {field} image: {error}") from error

    def _crop(
        self, source: np.ndarray, target: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.crop_size is None:
            return source, target
        size = self.crop_size
        source, target = _reflect_pad_to(source, size), _reflect_pad_to(target, size)
        height, width = source.shape[:2]
        if self.random_crop:
            top = int(rng.integers(height - size + 1))
            left = int(rng.integers(width - size + 1))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        window = (slice(top, top + size), slice(left, left + size))
        return source[window], target[window]

    @staticmethod
    def _flip_and_rotate(
        source: np.ndarray, target: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        horizontal, vertical, transpose = rng.random(3) < 0.5
        if horizontal:
            source, target = source[:, ::-1], target[:, ::-1]
        if vertical:
            source, target = source[::-1], target[::-1]
        if transpose:
            source, target = source.transpose(1, 0, 2), target.transpose(1, 0, 2)
        return source, target

    @staticmethod
    def _stack(images: list[np.ndarray]) -> np.ndarray:
        """HWC uint8 images -> float32 CHW in [0, 1]: one array, or a ragged object array."""
        if len({image.shape for image in images}) == 1:
            batch = np.empty((len(images), 3, *images[0].shape[:2]), dtype=np.float32)
            for slot, image in zip(batch, images, strict=True):
                slot[...] = image.transpose(2, 0, 1)
            batch *= 1.0 / 255.0
            return batch
        # Full-size validation images differ in size; Ray stores them as a
        # variable-shaped tensor column.
        ragged = np.empty(len(images), dtype=object)
        ragged[:] = [image.transpose(2, 0, 1).astype(np.float32) / 255.0 for image in images]
        return ragged


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
    decode_batch_size: int = DEFAULT_DECODE_BATCH_SIZE,
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
        decode_batch_size: Pairs decoded per ``map_batches`` call.

    Returns:
        Rows ``{"id": str, "input": float32 [3, h, w], "target": float32 [3, h, w]}``, in [0, 1].
    """
    if train and crop_size is None:
        raise ValueError("training needs a crop_size: batches of full images differ in shape")
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    manifest = _load_manifest(manifest_uri, split, storage_options)
    shard_uris = manifest.shard_uris(split)
    if not shard_uris:
        raise ValueError(f"split {split!r} of dataset {manifest_uri} has no shards")
    filesystem, _ = open_filesystem(shard_uris[0], storage_options)
    shuffle: FileShuffleConfig | None = None
    if train:
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    dataset = ray.data.read_parquet(
        [filesystem._strip_protocol(uri) for uri in shard_uris],
        filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem)),
        shuffle=shuffle,
        include_paths=True,
    ).select_columns([*_SOURCE_COLUMNS, _PATH_COLUMN])
    # Parquet reads come in ~128 MiB read units, a whole small dataset in one task; cutting
    # them into blocks of a decode batch lets every CPU decode in parallel, streaming.
    dataset = dataset.repartition(target_num_rows_per_block=decode_batch_size)
    transform = PairTransform(crop_size=crop_size, random_crop=train, augment=train and augment, seed=seed)
    pairs = dataset.map_batches(
        transform, batch_format="numpy", batch_size=decode_batch_size, zero_copy_batch=True
    )
    if not train:
        # Validation metrics and saved images come out in the same order every pass.
        pairs.context.execution_options.preserve_order = True
    return pairs


class _PairCollate(NumpyBatchCollateFn):
    """Numpy batch -> ``(input, target)`` tensors, leaving the string ids behind."""

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
        return torch.from_numpy(images)


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
        seed: Seed of the local shuffle buffer.
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
