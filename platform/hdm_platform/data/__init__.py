"""Datasets as Parquet shards plus a manifest: the contract, ingest, synthesis, inspection.

``manifest`` and ``storage`` are the contract every reader uses; ``ingest``, ``synth`` and
``inspect`` write and check datasets (``hdm data ...``).
"""

from hdm_platform.data.manifest import (
    MANIFEST_NAME,
    ROW_SCHEMA,
    SPLITS,
    TASKS,
    DatasetNotFoundError,
    Manifest,
    ShardInfo,
    SkippedPair,
    SplitInfo,
)
from hdm_platform.data.storage import join_uri, open_filesystem, write_atomic

__all__ = [
    "MANIFEST_NAME",
    "ROW_SCHEMA",
    "SPLITS",
    "TASKS",
    "DatasetNotFoundError",
    "Manifest",
    "ShardInfo",
    "SkippedPair",
    "SplitInfo",
    "join_uri",
    "open_filesystem",
    "write_atomic",
]
