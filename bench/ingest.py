"""Ingest throughput (MiB/s of encoded images) against a plain copy of the same files.

Baseline: ``shutil.copytree`` of the source folder (read + write every byte, nothing else).
Ingest: ``hdm data ingest --layout sots`` into a local folder (pairing, a full PIL decode of
every image, Parquet shards, checksums, manifest), with 1 and with N worker threads. The
source is a SOTS-like folder of 256x256 PNG pairs cut from scikit-image's photos, so the
PNGs compress like real ones. Also times ``hdm data synth`` per task (pairs per second).

    python bench/ingest.py [--pairs 120] [--workers 8] [--synth-count 24]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from hdm_platform.data.ingest import IngestOptions, ingest
from hdm_platform.data.synth import builtin_images, synthesize

SOTS = IngestOptions(layout="sots")


def make_source(root: Path, pairs: int, size: int = 256) -> int:
    """Writes ``pairs`` hazy/gt PNG pairs; returns their total size in bytes."""
    rng = np.random.default_rng(0)
    photos = [image.pixels for image in builtin_images()]
    total = 0
    for index in range(pairs):
        photo = photos[index % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        clear = photo[top : top + size, left : left + size]
        hazy = (clear * 0.6 + 0.4 * 230).astype(np.uint8)
        for folder, name, pixels in (("gt", f"{index}", clear), ("hazy", f"{index}_1", hazy)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{name}.png").write_bytes(buffer.getvalue())
            total += len(buffer.getvalue())
    return total


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--synth-count", type=int, default=24)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "source"
        total = make_source(source, args.pairs)
        mib = total / 2**20
        print(f"source: {args.pairs} pairs, {mib:.1f} MiB of PNG, {os.cpu_count()} CPU cores")
        copy_s = timed(lambda: shutil.copytree(source, work / "copy"))
        print(f"baseline copytree: {copy_s:.2f} s, {mib / copy_s:.1f} MiB/s")
        for workers in sorted({1, args.workers}):
            dest = work / f"ingest-{workers}"
            seconds = timed(
                lambda: ingest(str(source), str(dest), replace(SOTS, workers=workers), progress=False)
            )
            print(
                f"ingest, {workers} worker(s): {seconds:.2f} s, {mib / seconds:.1f} MiB/s, "
                f"{args.pairs / seconds:.0f} pairs/s, {seconds / copy_s:.1f}x the copy time"
            )
        rerun = timed(
            lambda: ingest(str(source), str(work / f"ingest-{args.workers}"), SOTS, progress=False)
        )
        print(f"re-run (no-op, fingerprint match): {rerun:.3f} s")
        for task in ("dehaze", "derain", "lowlight"):
            seconds = timed(
                lambda task=task: synthesize(
                    "builtin",
                    str(work / f"synth-{task}"),
                    task=task,
                    count=args.synth_count,
                    size=(256, 256),
                    progress=False,
                )
            )
            print(f"synth {task}: {args.synth_count / seconds:.1f} pairs/s (256x256)")


if __name__ == "__main__":
    main()
