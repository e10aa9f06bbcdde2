"""Write one side of a split back out as image files, byte for byte as ingested."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from hdm_model.atomic import write_bytes_atomically
from hdm_platform.data.manifest import Manifest

__all__ = ["export_split"]

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


def _file_name(row_id: str, image_format: str | None) -> str:
    # Ids are "dataset/name"-like; keep the readable tail and make it a safe file name.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id.rsplit("/", 1)[-1]) or "image"
    suffix = _SUFFIXES.get((image_format or "").upper(), f".{(image_format or 'img').lower()}")
    return stem if stem.lower().endswith(suffix) else stem + suffix


def export_split(
    uri: str,
    split: str,
    destination: str | os.PathLike[str],
    *,
    side: Literal["input", "target"] = "input",
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the ``side`` images of ``split`` (its original encoded bytes) into ``destination``."""
    manifest = Manifest.load(uri, storage_options)
    if split not in manifest.splits:
        raise ValueError(f"dataset {uri} has no split {split!r} (it has {sorted(manifest.splits)})")
    table = manifest.read_table(split, columns=["id", side, f"{side}_format"])
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for row in table.to_pylist()[:limit]:
        if row[side] is None:
            raise ValueError(f"row {row['id']!r} of {uri} [{split}] has no {side} image")
        path = destination / _file_name(row["id"], row[f"{side}_format"])
        write_bytes_atomically(path, row[side])
        written.append(path)
    return written
