"""Pieces of the training loop that need no Ray: the validation batches kept between passes,
the folder a checkpoint is staged in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hdm_platform.train.loop import ReplayedBatches, staged_checkpoint_directory


def counted_reader(batches: list[tuple[torch.Tensor, torch.Tensor]]):
    reads = []

    def read():
        reads.append(1)
        yield from batches

    return read, reads


def pairs(count: int, side: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 3, side, side), float(i)), torch.full((1, 3, side, side), -float(i))) for i in range(count)]


def test_small_batches_are_read_once_and_replayed():
    batches = pairs(3)
    read, reads = counted_reader(batches)
    replayed = ReplayedBatches(read, max_bytes=10_000)
    for _ in range(3):
        seen = list(replayed)
        assert len(seen) == 3
        for (inputs, targets), (expected_inputs, expected_targets) in zip(seen, batches, strict=True):
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
    assert len(reads) == 1


def test_batches_over_the_budget_are_read_every_pass():
    batches = pairs(3)  # 3 pairs of 2 x 48 float32 values: 384 bytes each
    read, reads = counted_reader(batches)
    replayed = ReplayedBatches(read, max_bytes=384 * 2)
    assert [float(inputs[0, 0, 0, 0]) for inputs, _ in replayed] == [0.0, 1.0, 2.0]
    assert [float(inputs[0, 0, 0, 0]) for inputs, _ in replayed] == [0.0, 1.0, 2.0]
    assert len(reads) == 2


def test_a_pass_left_unfinished_keeps_nothing():
    read, reads = counted_reader(pairs(3))
    replayed = ReplayedBatches(read, max_bytes=10_000)
    next(iter(replayed))
    assert len(list(replayed)) == 3
    assert len(list(replayed)) == 3
    assert len(reads) == 2


def test_a_checkpoint_folder_is_kept_when_reported_and_deleted_when_saving_fails():
    with staged_checkpoint_directory() as reported:
        Path(reported, "model.safetensors").touch()
    assert Path(reported, "model.safetensors").is_file()  # Ray Train's now, deleted after its upload
    shutil.rmtree(reported)

    with pytest.raises(RuntimeError, match="report failed"):
        with staged_checkpoint_directory() as failed:
            Path(failed, "model.safetensors").touch()
            raise RuntimeError("report failed")
    assert not Path(failed).exists()
