"""``hdm data inspect``: check a dataset before spending GPU hours on it.

Per split: row and shard counts, image sizes (min/median/max) and the PSNR between each
input and its target over a sample of pairs (a dehazing set whose inputs score 40 dB
against their targets is not hazy; one at 5 dB is probably mis-paired). Optionally a
contact sheet PNG with one ``input | target`` row per sampled pair.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from hdm_model.metrics import psnr
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.storage import open_filesystem, write_atomic

__all__ = [
    "Range",
    "PsnrStats",
    "SplitReport",
    "DatasetReport",
    "inspect_dataset",
    "render_contact_sheet",
]

_THUMB_HEIGHT = 160
_LABEL_HEIGHT = 16
_GAP = 4


@dataclass(frozen=True)
class Range:
    """Minimum, median and maximum of a sample."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Range:
        return cls(min(values), statistics.median(values), max(values))

    def __str__(self) -> str:
        return f"{self.min:g}/{self.median:g}/{self.max:g}"


@dataclass(frozen=True)
class PsnrStats:
    """Input-vs-target PSNR (dB, 8-bit RGB) over ``pairs`` sampled pairs.

    Identical pairs have infinite PSNR; they are counted in ``identical`` and left out of
    the mean, min and max (which are None if every sampled pair is identical).
    """

    pairs: int
    mean: float | None
    min: float | None
    max: float | None
    identical: int

    def __str__(self) -> str:
        if self.mean is None:
            return f"all {self.pairs} sampled pairs identical"
        text = f"mean {self.mean:.2f} dB, min {self.min:.2f}, max {self.max:.2f} over {self.pairs} pairs"
        return text + (f" ({self.identical} identical pairs left out)" if self.identical else "")


@dataclass(frozen=True)
class SplitReport:
    """What one split holds."""

    split: str
    rows: int
    shards: int
    bytes: int
    width: Range
    height: Range
    psnr: PsnrStats | None


@dataclass(frozen=True)
class DatasetReport:
    """The result of :func:`inspect_dataset`."""

    manifest: Manifest
    splits: list[SplitReport]
    contact_sheet: str | None

    def render(self) -> str:
        manifest = self.manifest
        lines = [
            f"dataset {manifest.name!r} at {manifest.uri}",
            f"  task {manifest.task}, layout {manifest.layout}, "
            f"{'paired' if manifest.paired else 'unpaired'}, generation {manifest.generation}, "
            f"created {manifest.created:%Y-%m-%d %H:%M:%S}",
            f"  source {manifest.source}",
        ]
        for report in self.splits:
            lines.append(
                f"  {report.split}: {report.rows} rows in {report.shards} shard(s), "
                f"{report.bytes / 2**20:.1f} MiB; "
                f"width {report.width}, height {report.height} (min/median/max)"
            )
            if report.psnr is not None:
                lines.append(f"    input vs target PSNR: {report.psnr}")
        if manifest.skipped:
            lines.append(f"  skipped at ingest: {len(manifest.skipped)} pair(s)")
            lines.extend(f"    {s.input or s.target}: {s.reason}" for s in manifest.skipped[:10])
        if self.contact_sheet:
            lines.append(f"  contact sheet: {self.contact_sheet}")
        return "\n".join(lines)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _pair_psnr(input_bytes: bytes, target_bytes: bytes) -> float:
    def to_tensor(data: bytes) -> torch.Tensor:
        pixels = np.asarray(_decode(data), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)

    return float(psnr(to_tensor(input_bytes), to_tensor(target_bytes))[0])


def _evenly(ids: Sequence[str], count: int) -> list[str]:
    if count <= 0 or not ids:
        return []
    if len(ids) <= count:
        return list(ids)
    positions = np.linspace(0, len(ids) - 1, count).round().astype(int)
    return [ids[i] for i in sorted(set(positions.tolist()))]


def _thumbnail(image: Image.Image) -> Image.Image:
    width = max(1, round(image.width * _THUMB_HEIGHT / image.height))
    return image.resize((width, _THUMB_HEIGHT), Image.Resampling.BILINEAR)


def render_contact_sheet(rows: Sequence[Mapping[str, Any]]) -> Image.Image:
    """One ``input | target`` line per row (ROW_SCHEMA dicts), each labelled with its id."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    lines = []
    for row in rows:
        left = _thumbnail(_decode(row["input"]))
        if row["target"] is None:
            right = Image.new("RGB", left.size, (64, 64, 64))
            ImageDraw.Draw(right).text((8, 8), "no target", fill=(220, 220, 220))
        else:
            right = _thumbnail(_decode(row["target"]))
        label = f"{row['id']} ({row['split']}, {row['width']}x{row['height']})"
        lines.append((label, left, right))
    sheet_width = max(left.width + right.width for _, left, right in lines) + 3 * _GAP
    line_height = _LABEL_HEIGHT + _THUMB_HEIGHT + _GAP
    sheet = Image.new("RGB", (sheet_width, _GAP + line_height * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (label, left, right) in enumerate(lines):
        top = _GAP + index * line_height
        draw.text((_GAP, top), label, fill=(0, 0, 0))
        sheet.paste(left, (_GAP, top + _LABEL_HEIGHT))
        sheet.paste(right, (2 * _GAP + left.width, top + _LABEL_HEIGHT))
    return sheet


def inspect_dataset(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    psnr_pairs: int = 64,
    contact_sheet: str | None = None,
    sheet_pairs: int = 6,
) -> DatasetReport:
    """Summarises the dataset at ``uri``; optionally writes a contact sheet PNG.

    Args:
        uri: the dataset folder (any fsspec URI).
        psnr_pairs: pairs per split (evenly spaced by id) whose PSNR is measured.
        contact_sheet: where to write the sheet (path or URI); None for no sheet.
        sheet_pairs: pairs on the sheet, spread over all splits.

    Raises:
        DatasetNotFoundError: no manifest at ``uri``.
    """
    manifest = Manifest.load(uri, storage_options)
    reports = []
    sheet_candidates: list[tuple[str, str]] = []
    for split, info in manifest.splits.items():
        meta = manifest.read_table(split, columns=["id", "width", "height"])
        ids = sorted(meta.column("id").to_pylist())
        sheet_candidates.extend((split, pair_id) for pair_id in ids)
        psnr_stats = None
        if manifest.paired and ids:
            sample = _evenly(ids, psnr_pairs)
            pairs = manifest.read_table(
                split, columns=["input", "target"], filters=[("id", "in", sample)]
            ).to_pylist()
            values = [_pair_psnr(p["input"], p["target"]) for p in pairs if p["target"] is not None]
            finite = [v for v in values if math.isfinite(v)]
            psnr_stats = PsnrStats(
                pairs=len(values),
                mean=statistics.fmean(finite) if finite else None,
                min=min(finite) if finite else None,
                max=max(finite) if finite else None,
                identical=len(values) - len(finite),
            )
        reports.append(
            SplitReport(
                split=split,
                rows=info.rows,
                shards=len(info.shards),
                bytes=sum(shard.bytes for shard in info.shards),
                width=Range.of(meta.column("width").to_pylist() or [0]),
                height=Range.of(meta.column("height").to_pylist() or [0]),
                psnr=psnr_stats,
            )
        )

    if contact_sheet is not None:
        chosen = _evenly([f"{split}\0{pair_id}" for split, pair_id in sheet_candidates], sheet_pairs)
        rows = []
        for split in manifest.splits:
            wanted = [key.split("\0", 1)[1] for key in chosen if key.split("\0", 1)[0] == split]
            if wanted:
                table = manifest.read_table(split, filters=[("id", "in", wanted)])
                rows.extend(sorted(table.to_pylist(), key=lambda row: row["id"]))
        buffer = io.BytesIO()
        render_contact_sheet(rows).save(buffer, format="PNG")
        fs, path = open_filesystem(contact_sheet, storage_options)
        write_atomic(fs, path, buffer.getvalue())
    return DatasetReport(manifest, reports, contact_sheet)
