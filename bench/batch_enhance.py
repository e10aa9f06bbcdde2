"""Batch inference throughput: ``hdm enhance`` on Ray Data against today's local loop, S3 to S3.

Both sides enhance the same PNGs (scikit-image's photos resized to each ``--sizes`` side,
``--images`` of each size, distinct bytes) from a bucket on a moto S3 server (its own
process, on loopback) into the same bucket, with the same model on the same cores:

* **local loop**: what ``hdm enhance`` does in one process for each file (read, decode with
  ``imageio.read_image``, the ``model_refs.load_enhancer`` function, ``imageio.encode_image``,
  write), with the object reads and writes through fsspec (s3fs) and torch on all cores;
* **Ray Data**: ``hdm_platform.batch_enhance.enhance_on_ray`` (listing tasks, read+decode
  tasks, the model in an actor pool, encode+write tasks) on a local Ray started as the
  command starts it (``connect_ray``: one logical CPU more than there are cores), first
  with the pool the command sizes (one-thread actors, one per core), then with
  ``--actors-scan`` actors of ``cores / actors`` threads each (default: one actor of all
  cores' threads, as the local loop runs).

Times are whole runs, as the command's summary reports them (``--rounds`` of every case,
alternating between the sides, since a shared machine drifts; medians reported): listing, the actors' start
(a worker process importing torch and loading the model, a second or two) and the stream;
Ray's own start-up is excluded, the baseline's model load included. Prints images/s per
side and the ratio Ray / local (goal: at least 0.9 on 2 cores). The Ray side pays a fixed
start-up (its actors are new processes importing torch), so the default counts are minutes
of work, a small batch job; fewer images measure mostly that start-up.

The model is a random-weight HDM of the quickstart's size (jobs/configs/quickstart-cpu.yaml:
32 channels, 1 group x 2 blocks, 5 regions); the timing does not depend on the weights.

    .venv/bin/python bench/batch_enhance.py [--sizes 256 1024] [--images 1000 48] [--actors-scan 1] [--rounds 1]
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
import skimage.data
import torch
from PIL import Image

from hdm_model import build_hdm, save_checkpoint
from hdm_platform.batch_enhance import connect_ray, enhance_on_ray
from hdm_platform.config import load_config
from hdm_platform.data.storage import list_files, open_filesystem
from hdm_platform.imageio import encode_image, read_image
from hdm_platform.model_refs import load_enhancer
from s3_process import start_s3

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "bench"
GOAL_RATIO = 0.9
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def upload_photos(prefix: str, size: int, count: int) -> None:
    """``count`` distinct PNGs of ``size`` x ``size``: photos, each with its own noise."""
    filesystem, root = open_filesystem(prefix)
    generator = np.random.default_rng(size)
    for index in range(count):
        photo = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
        photo = np.asarray(
            Image.fromarray(photo).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        )
        noisy = np.clip(photo.astype(np.int16) + generator.integers(-3, 4, photo.shape), 0, 255).astype(
            np.uint8
        )
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="PNG")
        filesystem.pipe_file(f"{root}/{index:04d}.png", buffer.getvalue())


def local_loop(source: str, destination: str, checkpoint: str) -> float:
    """Seconds for ``hdm enhance``'s loop over every image under ``source``."""
    started = time.perf_counter()
    filesystem, root = open_filesystem(source)
    _, out = open_filesystem(destination)
    run = load_enhancer(checkpoint)
    for entry in list_files(filesystem, root):
        image = read_image(filesystem.cat_file(f"{root}/{entry.path}"), name=entry.path)
        result = run(image.unsqueeze(0))[0]
        filesystem.pipe_file(f"{out}/{Path(entry.path).stem}.png", encode_image(result))
    return time.perf_counter() - started


def on_ray(source: str, destination: str, checkpoint: str, count: int, **pool: int) -> float:
    summary = enhance_on_ray([source], destination, [checkpoint], progress=False, **pool)
    if summary.done != count or summary.failures:
        raise RuntimeError(f"Ray Data enhanced {summary.done} of {count}: {summary.failures[:3]}")
    return summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 48], help="images of each size")
    parser.add_argument(
        "--actors-scan", type=int, nargs="*", default=[1], help="also run with these actor counts"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every case; medians are reported")
    args = parser.parse_args()
    if len(args.images) != len(args.sizes):
        parser.error("give one --images count per --sizes entry")
    cores = os.cpu_count() or 1
    cases: list[tuple[str, dict[str, int]]] = [("ray data, the command's pool", {})]
    for actors in args.actors_scan:
        threads = max(1, cores // actors)
        cases.append((f"ray data, {actors} actor(s) x {threads} threads", {"actors": actors, "threads_per_actor": threads}))

    server = start_s3(BUCKET)[0]
    try:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            model = load_config(PROJECT / "jobs" / "configs" / "quickstart-cpu.yaml").model.to_hdm_config()
            checkpoint = str(save_checkpoint(build_hdm(model).eval(), Path(folder) / "quickstart-size"))
            for size, count in zip(args.sizes, args.images):
                upload_photos(f"s3://{BUCKET}/raw-{size}", size, count)
            connect_ray()
            print(
                f"{cores} cores; Ray: {int(ray.cluster_resources()['CPU'])} logical CPUs; model: quickstart size"
            )
            print(
                f"{'size':>5} {'images':>6}  {'side':<34} {'seconds (each round)':>22} {'images/s':>9} {'vs local':>8}"
            )
            for size, count in zip(args.sizes, args.images):
                source = f"s3://{BUCKET}/raw-{size}"
                seconds: dict[str, list[float]] = {"local": [], **{label: [] for label, _ in cases}}
                for round_index in range(args.rounds):
                    seconds["local"].append(
                        local_loop(source, f"s3://{BUCKET}/local-{size}-{round_index}", checkpoint)
                    )
                    for case_index, (label, pool) in enumerate(cases):
                        destination = f"s3://{BUCKET}/ray-{size}-{case_index}-{round_index}"
                        seconds[label].append(on_ray(source, destination, checkpoint, count, **pool))
                local_s = statistics.median(seconds["local"])
                for label, times in seconds.items():
                    median = statistics.median(times)
                    side = f"local loop ({cores} threads)" if label == "local" else label
                    rounds = " ".join(f"{value:.1f}" for value in times)
                    print(
                        f"{size:>5} {count:>6}  {side:<34} {rounds:>22} {count / median:9.2f} {local_s / median:8.2f}"
                    )
            print(f"goal: ray data / local >= {GOAL_RATIO} on 2 cores")
    finally:
        ray.shutdown()
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
