"""Input pipeline throughput: Ray Data over Parquet shards in S3 vs a BasicSR-style DataLoader.

Both sides deliver the same thing to a training loop: batches of 16 randomly cropped
(256 x 256), randomly flipped/rotated (input, target) float32 pairs from ~512 x 512 PNG
pairs of real photos (hazy renderings of scikit-image's bundled photos, made by
``hdm data synth``), using the same number of CPU cores.

* **Ray Data** (``hdm_platform.data.pipeline``): the pairs are Parquet shards in an S3
  bucket served by moto (``moto_server``, its own process) on loopback, read by ``build_dataset`` + ``iter_pairs``.
* **Baseline**: the same PNG files on local disk, read the way BasicSR's
  ``PairedImageDataset`` does (decode with OpenCV's ``cv2.imdecode`` as
  ``basicsr.utils.imfrombytes`` does, convert the whole image to float32, paired random
  crop, flip/rotate, HWC -> CHW tensor), in a ``torch.utils.data.DataLoader`` with
  ``num_workers`` = cores; ``--baseline-decoder pil`` decodes with PIL instead (the
  baseline of the first sessions' figures). OpenCV comes with the ``bench`` extra.

Each side makes timed passes over all pairs: a cold one (worker processes start and
import their modules), then ``--warm-passes`` warm ones (the steady state of a long
training run), alternating between the two sides and reported by their median, since a
shared 2-core machine drifts by 10-20% over minutes; Ray's cluster start-up is excluded.
The DataLoader keeps its workers between passes (``persistent_workers``). Prints pairs/s
for both sides, per core, and their ratios.

An epoch of a real benchmark is thousands of pairs (RESIDE ITS: 13,990), while Ray Data
pays a fixed second or two per pass (starting its executor and the first read tasks). ``--copies``
stores every rendered pair that many times (distinct ids, same bytes) so the pass has an
epoch's length without minutes of rendering; ``--copies 1`` measures the bare 200 pairs.

    python bench/data_pipeline.py [--pairs 200] [--copies 5] [--size 512] [--crop 256] [--batch 16] [--warm-passes 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray.data import DataContext
from torch.utils.data import DataLoader, Dataset

try:
    import cv2
except ModuleNotFoundError:
    raise SystemExit("the BasicSR baseline decodes with OpenCV: .venv/bin/pip install -e '.[bench]'") from None

from hdm_platform.data.manifest import Manifest
from hdm_platform.data.pipeline import build_dataset, iter_pairs
from hdm_platform.data.synth import synthesize
from hdm_platform.data.shard_writer import DatasetWriter, Row
from s3_process import start_s3


def _decode_cv2(data: bytes) -> np.ndarray:
    # basicsr.utils.imfrombytes(content, float32=True); BGR as in BasicSR (it flips later).
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.float32) / 255.0


def _decode_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0


BASELINE_DECODERS = {"cv2": _decode_cv2, "pil": _decode_pil}


class PairedPNGFolder(Dataset):
    """BasicSR's ``PairedImageDataset`` training path."""

    def __init__(self, root: Path, crop_size: int, decoder: str) -> None:
        self.inputs = sorted((root / "input").iterdir())
        self.targets = sorted((root / "target").iterdir())
        self.crop_size = crop_size
        self.decode = BASELINE_DECODERS[decoder]

    def __len__(self) -> int:
        return len(self.inputs)

    def _load(self, path: Path) -> np.ndarray:
        # The whole image as float32 in [0, 1], as BasicSR loads it.
        return self.decode(path.read_bytes())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        target, source = self._load(self.targets[index]), self._load(self.inputs[index])
        # basicsr.data.transforms.paired_random_crop
        height, width = source.shape[:2]
        top = np.random.randint(0, height - self.crop_size + 1)
        left = np.random.randint(0, width - self.crop_size + 1)
        window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        source, target = source[window], target[window]
        # basicsr.data.transforms.augment(hflip=True, rotation=True)
        hflip, vflip, rot90 = np.random.rand(3) < 0.5
        images = []
        for image in (source, target):
            if hflip:
                image = image[:, ::-1]
            if vflip:
                image = image[::-1]
            if rot90:
                image = image.transpose(1, 0, 2)
            images.append(image)
        # basicsr.utils.img2tensor
        return tuple(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) for image in images)


def _replicate(manifest: Manifest, uri: str, copies: int, shard_size: int) -> Manifest:
    """A dataset at ``uri`` holding every train pair of ``manifest`` ``copies`` times."""
    rows = manifest.read_table("train").to_pylist()
    with DatasetWriter(uri, shard_size=shard_size) as writer:
        for copy in range(copies):
            for row in rows:
                writer.add(Row(**{**row, "id": f"{row['id']}-copy{copy}"}))
        return writer.commit(
            name="bench-epoch", task=manifest.task, layout="synth", paired=True,
            source=manifest.uri, fingerprint=f"{manifest.fingerprint}-x{copies}",
        )  # fmt: skip


def _export_pngs(manifest: Manifest, root: Path) -> None:
    """The dataset's own PNG bytes as files, so both sides decode identical encodings."""
    table = manifest.read_table("train", columns=["id", "input", "target"]).to_pylist()
    for role in ("input", "target"):
        (root / role).mkdir(parents=True)
    for row in table:
        name = row["id"].replace("/", "_") + ".png"
        (root / "input" / name).write_bytes(row["input"])
        (root / "target" / name).write_bytes(row["target"])


def _pairs_per_second(batches, expected: int) -> float:
    """Pairs/s of one pass over ``batches``."""
    started = time.perf_counter()
    pairs = 0
    for source, target in batches:
        assert source.dtype == target.dtype == torch.float32
        pairs += source.shape[0]
    assert pairs == expected, (pairs, expected)
    return pairs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs rendered")
    parser.add_argument("--copies", type=int, default=5, help="times each pair is stored (epoch length)")
    parser.add_argument("--size", type=int, default=512, help="side of the stored images")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-mb", type=float, default=16.0, help="encoded image MiB per Parquet shard")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--baseline-decoder", choices=sorted(BASELINE_DECODERS), default="cv2")
    parser.add_argument("--warm-passes", type=int, default=3)
    args = parser.parse_args()

    server, endpoint = start_s3("bench")
    try:
        uri = "s3://bench/synth-dehaze"
        started = time.perf_counter()
        result = synthesize(
            "builtin", uri, task="dehaze", count=args.pairs, seed=0, size=(args.size, args.size),
            shard_size=int(args.shard_mb * 2**20), workers=args.cores, progress=False,
        )
        manifest = result.manifest
        if args.copies > 1:
            uri = "s3://bench/epoch"
            manifest = _replicate(manifest, uri, args.copies, int(args.shard_mb * 2**20))
        shards = len(manifest.splits["train"].shards)
        print(f"dataset: {manifest.rows} pairs of {args.size}x{args.size} PNG in {shards} shards on {endpoint} "
              f"(made in {time.perf_counter() - started:.0f} s)")

        with tempfile.TemporaryDirectory() as folder:
            _export_pngs(manifest, Path(folder))
            # Persistent workers, forked here before Ray starts its threads (forking a
            # process that runs gRPC threads is unsafe), serve every baseline pass.
            loader = DataLoader(
                PairedPNGFolder(Path(folder), args.crop, args.baseline_decoder), batch_size=args.batch, shuffle=True,
                num_workers=args.cores, persistent_workers=True,
            )  # fmt: skip
            baseline_cold = _pairs_per_second(loader, manifest.rows)

            ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
            DataContext.get_current().enable_progress_bars = False
            try:
                dataset = build_dataset(uri, "train", crop_size=args.crop, train=True, seed=0)

                def pipeline_batches():
                    return iter_pairs(dataset, batch_size=args.batch, local_shuffle_buffer_size=4 * args.batch, seed=0)

                pipeline_cold = _pairs_per_second(pipeline_batches(), manifest.rows)
                # Warm passes alternate between the two sides: a shared machine's speed
                # drifts over minutes, and alternating exposes both sides to the same drift.
                baseline_warm, pipeline_warm = [], []
                for _ in range(args.warm_passes):
                    baseline_warm.append(_pairs_per_second(loader, manifest.rows))
                    pipeline_warm.append(_pairs_per_second(pipeline_batches(), manifest.rows))
            finally:
                ray.shutdown()
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}; using {args.cores}")
    sides = {
        "ray data, parquet on s3 (moto)": (pipeline_cold, pipeline_warm),
        f"dataloader ({args.baseline_decoder}), png on local disk": (baseline_cold, baseline_warm),
    }
    for name, (cold, warm) in sides.items():
        median = statistics.median(warm)
        print(f"{name}: cold {cold:6.1f} pairs/s, warm median {median:6.1f} pairs/s ({median / args.cores:.1f} per core; "
              f"passes {', '.join(f'{rate:.1f}' for rate in warm)})")
    ratio = statistics.median(pipeline_warm) / statistics.median(baseline_warm)
    print(f"ratio ray / dataloader: warm {ratio:.2f}x, cold {pipeline_cold / baseline_cold:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
