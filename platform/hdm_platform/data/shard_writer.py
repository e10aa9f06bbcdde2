"""Writes rows into Parquet shards of a new generation, then swaps the manifest in.

The order of a write is what makes it safe for readers:

1. every shard goes to ``shards/<split>-<generation>-<NNNNN>.parquet`` (an atomic put or
   rename each; the generation is new, so no file a reader uses is touched);
2. ``manifest.json`` is replaced atomically: the dataset now names the new shards;
3. shards the new manifest does not name (the old generation, leftovers of a crashed
   write) are deleted.

A failure before step 2 deletes the shards written so far and leaves the previous
dataset, if any, exactly as it was. One writer per dataset URI at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hdm_platform.data.manifest import (
    ROW_SCHEMA,
    SCHEMA_VERSION,
    DatasetNotFoundError,
    Manifest,
    ShardInfo,
    SkippedPair,
    SplitInfo,
)
from hdm_platform.data.storage import open_filesystem, write_atomic

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Row",
    "DatasetWriter",
    "current_manifest",
    "fingerprint",
]

DEFAULT_SHARD_SIZE = 256 * 2**20
SHARDS_DIR = "shards"
# A row group is the smallest unit a Ray Data read task can take, so it holds about one
# decode batch of pairs (hdm_platform.data.pipeline.CROPPED_DECODE_BATCH_SIZE), and at
# most ~32 MiB so that readers' memory stays flat with large photos.
_ROW_GROUP_ROWS = 32
_ROW_GROUP_BYTES = 32 * 2**20
# Statistics on encoded image bytes would only bloat the footer.
_STATISTICS_COLUMNS = ["id", "task", "split", "width", "height"]


@dataclass(frozen=True)
class Row:
    """One pair as stored; fields and order are those of ``ROW_SCHEMA``."""

    id: str
    task: str
    split: str
    input: bytes
    target: bytes | None
    input_format: str
    target_format: str | None
    width: int
    height: int
    source_input: str
    source_target: str | None

    @property
    def nbytes(self) -> int:
        return len(self.input) + len(self.target or b"")


assert [f.name for f in fields(Row)] == ROW_SCHEMA.names, "Row must mirror ROW_SCHEMA"


def fingerprint(kind: str, arguments: Mapping[str, Any], listing: Iterable[Sequence[Any]]) -> str:
    """sha256 over what determines a dataset: the writer, its arguments, its source files."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "arguments": dict(arguments),
        "listing": [list(entry) for entry in listing],
    }
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def current_manifest(
    uri: str, fingerprint: str, storage_options: Mapping[str, Any] | None = None
) -> Manifest | None:
    """The manifest at ``uri`` if it has this fingerprint and all its shards exist."""
    try:
        manifest = Manifest.load(uri, storage_options)
    except (DatasetNotFoundError, ValueError):
        return None
    if manifest.fingerprint != fingerprint:
        return None
    fs, root = open_filesystem(uri, storage_options)
    for split in manifest.splits.values():
        for shard in split.shards:
            if not fs.exists(f"{root}/{shard.path}"):
                return None
    return manifest


class DatasetWriter:
    """Buffers rows per split and writes shards of about ``shard_size`` bytes in parallel.

    Use as a context manager: leaving the block with an exception before :meth:`commit`
    deletes the shards this writer wrote.

    Args:
        uri: the dataset folder (any fsspec URI).
        storage_options: filesystem options for ``uri``.
        shard_size: bytes of encoded images per shard (each shard holds at least one row).
        workers: shard uploads in flight at once.
    """

    def __init__(
        self,
        uri: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        workers: int = 4,
    ) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.shard_size = shard_size
        self.generation = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:8]}"
        self._fs, self._root = open_filesystem(self.uri, self.storage_options)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard")
        self._max_pending = max(1, workers)
        self._buffers: dict[str, list[Row]] = {}
        self._buffer_bytes: dict[str, int] = {}
        self._shard_counts: dict[str, int] = {}
        self._pending: list[Future[tuple[str, ShardInfo]]] = []
        self._written: dict[str, list[ShardInfo]] = {}
        self._committed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abort()
        self._pool.shutdown(wait=True)

    def add(self, row: Row) -> None:
        """Adds a row to its split; a full buffer is handed to the upload pool."""
        buffer = self._buffers.setdefault(row.split, [])
        buffer.append(row)
        self._buffer_bytes[row.split] = self._buffer_bytes.get(row.split, 0) + row.nbytes
        if self._buffer_bytes[row.split] >= self.shard_size:
            self._flush(row.split)

    def commit(
        self,
        *,
        name: str,
        task: str,
        layout: str,
        paired: bool,
        source: str,
        fingerprint: str,
        skipped: Sequence[SkippedPair] = (),
    ) -> Manifest:
        """Writes the remaining shards, then the manifest, then deletes stale shards."""
        for split in list(self._buffers):
            self._flush(split)
        self._drain(0)
        splits = {
            split: SplitInfo(rows=sum(s.rows for s in shards), shards=shards)
            for split, shards in sorted(self._written.items())
        }
        manifest = Manifest(
            name=name,
            task=task,  # type: ignore[arg-type]
            layout=layout,
            paired=paired,
            source=source,
            fingerprint=fingerprint,
            created=datetime.now(UTC),
            generation=self.generation,
            splits=splits,  # type: ignore[arg-type]
            skipped=list(skipped),
        )
        manifest.save(self.uri, self.storage_options)
        self._committed = True
        self._delete_stale(manifest)
        return manifest

    def abort(self) -> None:
        """Deletes this writer's shards; the dataset's manifest is never touched."""
        self._buffers.clear()
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            if not future.cancelled() and future.exception() is None:
                split, shard = future.result()
                self._written.setdefault(split, []).append(shard)
        self._pending.clear()
        paths = [f"{self._root}/{s.path}" for shards in self._written.values() for s in shards]
        self._written.clear()
        existing = [path for path in paths if self._fs.exists(path)]
        if existing:
            self._fs.rm(existing)

    def _flush(self, split: str) -> None:
        rows = self._buffers.pop(split, [])
        self._buffer_bytes.pop(split, None)
        if not rows:
            return
        index = self._shard_counts.get(split, 0)
        self._shard_counts[split] = index + 1
        relative = f"{SHARDS_DIR}/{split}-{self.generation}-{index:05d}.parquet"
        self._drain(self._max_pending - 1)
        self._pending.append(self._pool.submit(self._write_shard, split, relative, rows))

    def _drain(self, keep: int) -> None:
        """Waits until at most ``keep`` uploads are in flight; re-raises their errors."""
        while len(self._pending) > keep:
            future = self._pending.pop(0)
            split, shard = future.result()
            self._written.setdefault(split, []).append(shard)
        for shards in self._written.values():
            shards.sort(key=lambda shard: shard.path)

    def _write_shard(self, split: str, relative: str, rows: list[Row]) -> tuple[str, ShardInfo]:
        columns = list(zip(*(astuple(row) for row in rows), strict=True))
        table = pa.Table.from_arrays(
            [pa.array(values, type=f.type) for values, f in zip(columns, ROW_SCHEMA, strict=True)],
            schema=ROW_SCHEMA,
        )
        total = sum(row.nbytes for row in rows)
        row_group_size = min(_ROW_GROUP_ROWS, max(1, math.ceil(len(rows) * _ROW_GROUP_BYTES / max(total, 1))))
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            row_group_size=row_group_size,
            # The images are PNG/JPEG already: compressing them again only costs time.
            compression="none",
            write_statistics=_STATISTICS_COLUMNS,
        )
        data = sink.getvalue().to_pybytes()
        write_atomic(self._fs, f"{self._root}/{relative}", data)
        digest = hashlib.sha256(data).hexdigest()
        return split, ShardInfo(path=relative, rows=len(rows), bytes=len(data), sha256=digest)

    def _delete_stale(self, manifest: Manifest) -> None:
        shards_dir = f"{self._root}/{SHARDS_DIR}"
        keep = {f"{self._root}/{s.path}" for split in manifest.splits.values() for s in split.shards}
        if not self._fs.exists(shards_dir):
            return
        stale = [path for path in self._fs.find(shards_dir) if path not in keep]
        if stale:
            self._fs.rm(stale)
