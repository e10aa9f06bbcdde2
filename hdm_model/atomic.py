"""Atomic file replacement: the one implementation every writer of the project uses.

A reader of ``target`` sees the old file or the whole new one, never a part: the content is
written to a uniquely named hidden sibling (same folder, so the same file system), flushed
to disk, and renamed over ``target`` with ``os.replace``, which is atomic on POSIX and
Windows. On failure the temporary file is removed and ``target`` is untouched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_bytes_atomically"]


def write_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the result over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Opened with "x" rather than mkstemp's 0600 file, so the result gets the umask's
    # permissions like any other file the user writes.
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def write_bytes_atomically(target: str | Path, data: bytes) -> Path:
    """:func:`write_atomically` for bytes already in memory."""

    def write(path: Path) -> None:
        with open(path, "xb") as handle:
            handle.write(data)

    return write_atomically(target, write)
