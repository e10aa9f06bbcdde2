"""Filesystem access for datasets at any fsspec URI, and atomic writes on top of it.

Plain paths, ``file://``, ``s3://``, ``gs://``, ``memory://`` ... all go through
:func:`open_filesystem`. For S3 the endpoint, region and credentials come from the standard
AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) unless the config's ``storage:`` section
passes explicit options such as ``{"endpoint_url": ..., "region": ...}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hdm_model.atomic import write_bytes_atomically

__all__ = [
    "FileEntry",
    "open_filesystem",
    "join_uri",
    "list_files",
    "write_atomic",
    "is_local",
    "is_remote",
]

_S3_PROTOCOLS = ("s3", "s3a")


def _s3_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Translates the config's storage options into ``s3fs.S3FileSystem`` arguments.

    The endpoint from ``AWS_ENDPOINT_URL`` is passed explicitly rather than left to botocore:
    s3fs caches filesystem instances by their arguments, so an endpoint that only lives in
    the environment would let an instance built for one endpoint be reused for another.
    """
    options = dict(storage_options)
    client_kwargs = dict(options.pop("client_kwargs", {}) or {})
    region = options.pop("region", None) or options.pop("region_name", None)
    region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs.setdefault("region_name", region)
    endpoint = options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def open_filesystem(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns the filesystem serving ``uri`` and the path inside it (no protocol).

    Args:
        uri: a plain path or any fsspec URL (``file://``, ``s3://bucket/key``, ...).
        storage_options: filesystem options; for S3 ``endpoint_url`` and ``region`` are
            understood in addition to every ``s3fs.S3FileSystem`` argument.
    """
    uri = os.fspath(uri)
    options = dict(storage_options or {})
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol in _S3_PROTOCOLS:
        options = _s3_options(options)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


def join_uri(base: str, *parts: str) -> str:
    """Joins path parts onto a URI or plain path with ``/``, keeping its protocol."""
    joined = base.rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


@dataclass(frozen=True, order=True)
class FileEntry:
    """A file under a listed folder: its ``/``-separated path relative to that folder."""

    path: str
    size: int
    modified: str


# Where each fsspec implementation reports a file's modification time.
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[FileEntry]:
    """Every file below ``root`` (recursively), sorted by relative path.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
    """
    if not fs.isdir(root):
        raise FileNotFoundError(f"not a folder: {fs.unstrip_protocol(root)}")
    prefix = root.rstrip("/") + "/"
    entries = []
    for name, info in fs.find(root, detail=True).items():
        if info.get("type", "file") != "file" or not name.startswith(prefix):
            continue
        modified = next((info[key] for key in _MODIFIED_KEYS if info.get(key) is not None), "")
        entries.append(FileEntry(name[len(prefix) :], int(info.get("size") or 0), str(modified)))
    return sorted(entries)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk, where atomic replacement is a rename."""
    return isinstance(fs, LocalFileSystem)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names storage other than this machine's disk (``s3://``, ``gs://``, ...)."""
    return fsspec.core.split_protocol(os.fspath(uri))[0] not in (None, "file", "local")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a reader sees either nothing or the whole file.

    On a local disk the bytes go to a hidden temporary name in the same folder and are then
    renamed over ``path`` (:func:`hdm_model.atomic.write_atomically`). On object stores a single put
    (or a multipart upload, which becomes visible only when completed) is already atomic.
    """
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if not is_local(fs):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return
    write_bytes_atomically(fsspec.core.strip_protocol(path), data)
