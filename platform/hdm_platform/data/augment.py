"""Paired decoding and augmentation: the ``map_batches`` step of the input pipeline.

Runs inside Ray Data's CPU workers (see :mod:`hdm_platform.data.pipeline` for the
pipeline, the seeding scheme and the padding rule). Decoding is most of the pipeline's
work; it goes through :func:`hdm_platform.imageio.decode_rgb8`, the decoder every other
path (ingest, ``hdm evaluate``, ``hdm enhance``, Serve) uses, so a file is trained on as it
is served.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from ray.data import DataContext

from hdm_platform.data.shard_source import PATH_COLUMN, completed_passes
from hdm_platform.imageio import ImageError, decode_rgb8

__all__ = ["CorruptPairError", "PairCrop", "PairTransform"]


class CorruptPairError(ValueError):
    """A row whose images cannot be decoded or do not form a pair; names the row and shard."""


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
class PairCrop:
    """Crop/augment each pair of a batch of decoded pairs identically: what the training
    worker's collate does to a split kept decoded in Ray's object store (``build_dataset(...,
    keep_decoded=True)``), and the second half of :class:`PairTransform`.

    Args:
        crop_size: Side of the square patch; ``None`` keeps full images (validation only).
        random_crop: Random crop position (training) instead of the centre (validation).
        augment: Random horizontal flip, vertical flip and transpose (90-degree
            rotation) of each patch; together they reach all eight symmetries of the square.
        seed: Base seed of the per-row generators; ``None`` draws from fresh entropy.

    A row's crop and flips come from its generator seeded by ``(seed, epoch, row id)``, so a
    pair decoded per pass (:class:`PairTransform`) and a pair kept decoded get the same ones.
    """

    crop_size: int | None
    random_crop: bool
    augment: bool
    seed: int | None

    def crop_batch(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
        """A numpy batch of decoded CHW pairs (``id``, ``input``, ``target``), cropped."""
        pairs = [
            self.crop_pair(str(row_id), source.transpose(1, 2, 0), target.transpose(1, 2, 0), epoch)
            for row_id, source, target in zip(batch["id"], batch["input"], batch["target"], strict=True)
        ]
        return self._batch(batch["id"], pairs)

    def crop_pair(
        self, row_id: str, source: np.ndarray, target: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The crop (and flips) of one HWC pair in ``epoch``."""
        rng = _row_generator(self.seed, epoch, row_id)
        source, target = self._crop(source, target, rng)
        if self.augment:
            source, target = self._flip_and_rotate(source, target, rng)
        return source, target

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

    @classmethod
    def _batch(cls, ids: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        return {
            "id": ids,
            "input": cls._stack([source for source, _ in pairs]),
            "target": cls._stack([target for _, target in pairs]),
        }

    @staticmethod
    def _stack(images: list[np.ndarray]) -> np.ndarray:
        """HWC uint8 images -> uint8 CHW: one array, or a ragged object array.

        Pairs stay 8-bit until the training worker's collate turns them into floats: the
        object store then moves a quarter of the bytes float32 would take.
        """
        if len({image.shape for image in images}) == 1:
            return np.stack([image.transpose(2, 0, 1) for image in images])
        # Full-size validation images differ in size; Ray stores them as a
        # variable-shaped tensor column.
        ragged = np.empty(len(images), dtype=object)
        ragged[:] = [np.ascontiguousarray(image.transpose(2, 0, 1)) for image in images]
        return ragged


@dataclass(frozen=True)
class PairTransform(PairCrop):
    """Decode one batch of Parquet rows and crop/augment each pair identically.

    The ``map_batches`` function of :func:`build_dataset` (numpy batch format, runs in
    Ray tasks on CPU workers); the fields are :class:`PairCrop`'s.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The task's DataContext carries the number of completed passes of the dataset.
        epoch = completed_passes(DataContext.get_current())
        pairs = [
            self._pair(row_id, input_bytes, target_bytes, shard, epoch)
            for row_id, input_bytes, target_bytes, shard in zip(
                batch["id"], batch["input"], batch["target"], batch[PATH_COLUMN], strict=True
            )
        ]
        return self._batch(batch["id"], pairs)

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
        return self.crop_pair(row_id, source, target, epoch)

    @staticmethod
    def _decode(data: bytes, field: str, where: str) -> np.ndarray:
        try:
            return decode_rgb8(data, name=field)
        except ImageError as error:
            raise CorruptPairError(f"{where}: cannot decode the {field} image: {error}") from error
