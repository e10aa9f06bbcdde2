"""The Ray Data source of the input pipeline: a split's Parquet shards, as its manifest lists them.

A dataset's ``manifest.json`` already names every shard of a split with its row count,
size and checksum, so the pipeline plans its reads from it: each shard's Parquet footer
is read once, when the dataset is built, and cut into *read units* of whole row groups
(about one decode batch of pairs each). Every pass over the data then starts its read
tasks at once, in a new random order per epoch for training.

``ray.data.read_parquet`` over the same shard URIs would discover them again on every
pass: Ray 2.60 lists the files and reads their footers in a footer-reading actor that
starts in a new worker process each time, which on a laptop left the CPUs idle for the
first 1.6-1.8 s of every epoch; reading from the manifest took the input pipeline from
0.91x to 1.00-1.06x of a BasicSR-style DataLoader on 2 cores (bench/RESULTS.md). The reads
themselves are pyarrow's (``pyarrow.parquet`` over pyarrow's native S3 or local
filesystem, other fsspec filesystems wrapped), and the tasks are Ray Data's, through its
public :class:`ray.data.Datasource` API, the way Ray's own file datasources plan reads.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import s3fs
from fsspec.implementations.local import LocalFileSystem
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.context import DataContext

__all__ = ["PATH_COLUMN", "ReadUnit", "ShardDatasource", "arrow_filesystem", "completed_passes"]

# Added to every row: the URI of the shard it came from, for error messages.
PATH_COLUMN = "path"
# Footers read at once when a dataset is built (each one or two small requests).
_FOOTER_READERS = 16

_ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
_ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
_ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"


def completed_passes(context: DataContext) -> int:
    """How many times this dataset has been executed before: the epoch of a training pass.

    Ray Data has no public API for it; its own file datasources and the seeded
    ``expressions.random`` read the private ``DataContext._execution_idx``. This is the one
    place the platform reads it (the read order and the augmentation seeds), and
    tests/test_pipeline.py fails loudly if Ray renames it.
    """
    try:
        return int(context._execution_idx)
    except AttributeError:
        raise RuntimeError(
            "this Ray Data has no DataContext._execution_idx: hdm_platform.data.shard_source."
            "completed_passes needs updating for it"
        ) from None


def arrow_filesystem(filesystem: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """The pyarrow filesystem the read tasks use for an fsspec filesystem.

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


@dataclass(frozen=True)
class ReadUnit:
    """Consecutive row groups of one shard: what one read task reads.

    Carries the shard's footer, read when the dataset was built, so a read task does not
    fetch it again.
    """

    shard_uri: str
    path: str
    row_groups: tuple[int, ...]
    rows: int
    bytes: int
    footer: pq.FileMetaData = field(compare=False, repr=False)


class ShardDatasource(Datasource):
    """Reads the given Parquet shards of one split, one read unit per Ray task.

    Args:
        shard_uris: The split's shards, in the manifest's order.
        filesystem: The fsspec filesystem serving them.
        columns: The columns to read; every shard must have them.
        unit_rows: Pairs per read unit: whole row groups, packed up to this many rows
            (a row group larger than that is a unit of its own).
        shuffle: A new random order of the read units every pass (epoch); otherwise the
            manifest's order.
        seed: Makes the shuffled order reproducible: pass ``k`` of the dataset reads in
            the order drawn from ``(seed, k)``. ``None`` draws from fresh entropy.
    """

    def __init__(
        self,
        shard_uris: Sequence[str],
        filesystem: fsspec.AbstractFileSystem,
        *,
        columns: Sequence[str],
        unit_rows: int,
        shuffle: bool,
        seed: int | None,
    ) -> None:
        if not shard_uris:
            raise ValueError("no shards to read")
        if unit_rows < 1:
            raise ValueError(f"unit_rows must be positive, got {unit_rows}")
        self._filesystem = arrow_filesystem(filesystem)
        self._columns = list(columns)
        self._shuffle = shuffle
        self._seed = seed
        shards = [(uri, fsspec.core.strip_protocol(uri)) for uri in shard_uris]
        with ThreadPoolExecutor(max_workers=max(1, min(_FOOTER_READERS, len(shards)))) as pool:
            footers = list(pool.map(self._read_footer, shards))
        self._units = [unit for (uri, path), footer in zip(shards, footers) for unit in _pack(uri, path, footer, unit_rows)]
        schema = footers[0].schema.to_arrow_schema()
        self._schema = pa.schema([*(schema.field(name) for name in self._columns), pa.field(PATH_COLUMN, pa.string())])

    @property
    def units(self) -> list[ReadUnit]:
        """The read units in the manifest's order."""
        return list(self._units)

    def _read_footer(self, shard: tuple[str, str]) -> pq.FileMetaData:
        uri, path = shard
        try:
            footer = pq.read_metadata(path, filesystem=self._filesystem)
        except (OSError, pa.ArrowException) as error:
            raise OSError(f"cannot read the Parquet footer of shard {uri}: {error}") from error
        missing = sorted(set(self._columns) - set(footer.schema.names))
        if missing:
            raise ValueError(f"shard {uri} lacks the column(s) {', '.join(missing)}")
        return footer

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.bytes for unit in self._units)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: DataContext | None = None
    ) -> list[ReadTask]:
        # Planned at the start of every pass; ``parallelism`` is ignored, the units are the tasks.
        units = self._units
        if self._shuffle:
            epoch = completed_passes(data_context) if data_context is not None else 0
            generator = np.random.default_rng(None if self._seed is None else [self._seed, epoch])
            units = [units[index] for index in generator.permutation(len(units))]
        return [
            ReadTask(
                functools.partial(_read_unit, self._filesystem, unit, self._columns),
                BlockMetadata(num_rows=unit.rows, size_bytes=unit.bytes, input_files=[unit.shard_uri], exec_stats=None),
                schema=self._schema,
                per_task_row_limit=per_task_row_limit,
            )
            for unit in units
        ]


def _pack(uri: str, path: str, footer: pq.FileMetaData, unit_rows: int) -> Iterator[ReadUnit]:
    """Consecutive row groups of one shard, up to ``unit_rows`` rows per unit."""
    groups: list[int] = []
    rows = size = 0
    for index in range(footer.num_row_groups):
        group = footer.row_group(index)
        if groups and rows + group.num_rows > unit_rows:
            yield ReadUnit(uri, path, tuple(groups), rows, size, footer)
            groups, rows, size = [], 0, 0
        groups.append(index)
        rows += group.num_rows
        size += group.total_byte_size
    if groups:
        yield ReadUnit(uri, path, tuple(groups), rows, size, footer)


def _read_unit(filesystem: pyarrow.fs.FileSystem, unit: ReadUnit, columns: list[str]) -> Iterator[pa.Table]:
    try:
        with filesystem.open_input_file(unit.path) as file:
            # pre_buffer: the unit's column chunks in coalesced, concurrent requests, which
            # pyarrow advises for high-latency filesystems such as S3 (no measurable
            # difference on loopback).
            parquet = pq.ParquetFile(file, metadata=unit.footer, pre_buffer=True)
            table = parquet.read_row_groups(list(unit.row_groups), columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise OSError(f"cannot read row groups {list(unit.row_groups)} of shard {unit.shard_uri}: {error}") from error
    yield table.append_column(PATH_COLUMN, pa.array([unit.shard_uri] * table.num_rows, pa.string()))
