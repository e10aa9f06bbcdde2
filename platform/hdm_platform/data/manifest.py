"""The dataset contract: Parquet shards of image pairs plus a ``manifest.json`` written last.

A dataset is a folder at any fsspec URI::

    DEST/manifest.json                                 # written last, atomically
    DEST/shards/<split>-<generation>-<NNNNN>.parquet   # rows of ROW_SCHEMA

A dataset without its manifest does not exist: writers put every shard in place first and
swap the manifest in one atomic write, so readers never see half a dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from hdm_platform.data.storage import join_uri, open_filesystem, write_atomic
from hdm_platform.vocabulary import SPLITS, TASKS, Split, Task

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ROW_SCHEMA",
    "SPLITS",
    "TASKS",
    "Split",
    "Task",
    "ShardInfo",
    "SplitInfo",
    "SkippedPair",
    "Manifest",
    "DatasetNotFoundError",
    "ShardChecksumError",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("input", pa.binary(), nullable=False),
        pa.field("target", pa.binary(), nullable=True),
        pa.field("input_format", pa.string(), nullable=False),
        pa.field("target_format", pa.string(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source_input", pa.string(), nullable=False),
        pa.field("source_target", pa.string(), nullable=True),
    ]
)
"""One row per pair. ``input``/``target`` hold the original encoded file bytes."""


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a URI holds no ``manifest.json``, i.e. no (complete) dataset."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"no dataset at {uri}: {MANIFEST_NAME} missing")
        self.uri = uri


class ShardChecksumError(ValueError):
    """Raised when a shard's bytes do not match the size or sha256 the manifest records."""


class ShardInfo(BaseModel):
    """One Parquet shard; ``path`` is relative to the dataset folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitInfo(BaseModel):
    """The shards of one split and their total row count."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=0)
    shards: list[ShardInfo]

    @model_validator(mode="after")
    def _rows_add_up(self) -> SplitInfo:
        shard_rows = sum(shard.rows for shard in self.shards)
        if shard_rows != self.rows:
            raise ValueError(f"split has rows={self.rows} but its shards hold {shard_rows}")
        return self


class SkippedPair(BaseModel):
    """A pair left out under ``--on-error skip``, with the reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str | None
    target: str | None
    reason: str


class Manifest(BaseModel):
    """``manifest.json``: what a dataset holds and how it was made.

    ``fingerprint`` hashes the writer's arguments and its source listing, so a re-run with
    the same inputs can be recognised as a no-op; ``generation`` names one write and is
    part of every shard's file name, so a rewrite never mixes with the shards it replaces.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    task: Task
    layout: str
    paired: bool
    source: str
    fingerprint: str
    created: datetime
    generation: str
    splits: dict[Split, SplitInfo]
    skipped: list[SkippedPair] = Field(default_factory=list)

    _uri: str | None = PrivateAttr(default=None)
    _storage_options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def uri(self) -> str:
        """The dataset folder this manifest was loaded from or saved to."""
        if self._uri is None:
            raise ValueError("manifest is not bound to a dataset URI: load() or save() it first")
        return self._uri

    @property
    def rows(self) -> int:
        """Rows over all splits."""
        return sum(split.rows for split in self.splits.values())

    @classmethod
    def load(cls, uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
        """Reads the manifest of the dataset at ``uri`` (the folder or its manifest.json).

        Raises:
            DatasetNotFoundError: there is no manifest, so no dataset, at ``uri``.
            ValueError: the manifest is not valid JSON or breaks the schema.
        """
        root = _dataset_root(uri)
        fs, root_path = open_filesystem(root, storage_options)
        manifest_path = f"{root_path}/{MANIFEST_NAME}"
        try:
            raw = fs.cat_file(manifest_path)
        except FileNotFoundError:
            raise DatasetNotFoundError(root) from None
        try:
            manifest = cls.model_validate(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"invalid {MANIFEST_NAME} at {root}: {error}") from error
        manifest._bind(root, storage_options)
        return manifest

    @classmethod
    def exists(cls, uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether a dataset (its manifest) exists at ``uri``."""
        fs, root_path = open_filesystem(_dataset_root(uri), storage_options)
        return fs.exists(f"{root_path}/{MANIFEST_NAME}")

    def save(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Writes ``manifest.json`` into the dataset folder ``uri`` atomically."""
        root = _dataset_root(uri)
        fs, root_path = open_filesystem(root, storage_options)
        payload = self.model_dump_json(indent=2).encode() + b"\n"
        write_atomic(fs, f"{root_path}/{MANIFEST_NAME}", payload)
        self._bind(root, storage_options)

    def shard_uris(self, split: str) -> list[str]:
        """Absolute URIs of ``split``'s shards (empty if the dataset has no such split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        info = self.splits.get(split)  # type: ignore[call-overload]
        return [join_uri(self.uri, shard.path) for shard in info.shards] if info else []

    def read_table(
        self,
        split: str,
        *,
        columns: Sequence[str] | None = None,
        filters: Any = None,
        verify: bool = False,
    ) -> pa.Table:
        """Reads one split's rows into memory (for small datasets, inspection and tests).

        Args:
            split: the split to read (an absent split gives an empty table).
            columns: a subset of ROW_SCHEMA's columns; all by default.
            filters: a ``pyarrow.parquet.read_table`` row filter, e.g. ``[("id", "in", ids)]``.
            verify: check each shard's size and sha256 against the manifest first.

        Raises:
            ShardChecksumError: under ``verify``, a shard differs from the manifest.
        """
        fs, _ = open_filesystem(self.uri, self._storage_options)
        info = self.splits.get(split)  # type: ignore[call-overload]
        shards = info.shards if info else []
        tables = [ROW_SCHEMA.empty_table().select(list(columns or ROW_SCHEMA.names))]
        for shard, shard_uri in zip(shards, self.shard_uris(split), strict=True):
            _, shard_path = open_filesystem(shard_uri, self._storage_options)
            data = fs.cat_file(shard_path)
            if verify:
                _check_shard(shard, shard_uri, data)
            tables.append(
                pq.read_table(pa.BufferReader(data), columns=columns, filters=filters, schema=ROW_SCHEMA)
            )
        return pa.concat_tables(tables)

    def _bind(self, root: str, storage_options: Mapping[str, Any] | None) -> None:
        self._uri = root.rstrip("/")
        self._storage_options = dict(storage_options or {})


def _dataset_root(uri: str) -> str:
    """The dataset folder of ``uri``, which may name the folder or its manifest.json."""
    stripped = str(uri).rstrip("/")
    if stripped.endswith(f"/{MANIFEST_NAME}") or stripped == MANIFEST_NAME:
        stripped = stripped[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return stripped


def _check_shard(shard: ShardInfo, shard_uri: str, data: bytes) -> None:
    if len(data) != shard.bytes:
        raise ShardChecksumError(f"{shard_uri}: {len(data)} bytes, manifest says {shard.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ShardChecksumError(f"{shard_uri}: sha256 {digest}, manifest says {shard.sha256}")
