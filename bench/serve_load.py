"""HTTP throughput of the Ray Serve application against the same model called in-process.

Each case is an image size (256x256 and 1024x1024 by default) and a client concurrency (1,
4, 16): that many threads, each on its own keep-alive connection, POST the same PNG to
``/v1/enhance/{task}`` on loopback until the case's request count is sent or its time
limit passes. A case reports images/s (answers over the wall time from the first send to
the last answer), p50/p95/p99 latency, errors (connection failures, non-200 answers,
answers that are not a PNG of the input's size), the mean batch the replica ran
(``X-Batch-Size``) and the replica's network time per image (``X-Inference-Time-Ms`` over
the batch size): next to the in-process time it tells transport and codec overhead from a
replica slowed by other work on the machine. Under each case, where a request's time went
(means, from the ingress's ``Server-Timing``): upload (read + decode), the handle call
split into the network's batch (``X-Inference-Time-Ms``) and the rest of the call (queue,
batch wait, the tensors' transfer), encode, and outside the ingress (Serve's proxy, HTTP,
the client).

Baseline, measured in the same run before and after each size's cases (their mean; both
are printed, since a shared machine drifts): the enhancer
``hdm_platform.model_refs.load_enhancer`` in this process, at the replica's precision and on
as many torch threads as the replica has CPUs, called back to back on one decoded image:
the model alone, with no decoding, encoding or transport. Goal: HTTP / in-process >= 0.85
at concurrency 4 and above, with zero errors.

The bench starts a Ray cluster of its own (``ray.init(address="local")``, a temp dir of its
own, free ports) with ``replica CPUs + 1`` logical CPUs and deploys one application through
the Serve REST API, as ``hdm serve up`` does: the task's model deployment, one replica on
``--replica-cpus`` CPUs, and the ingress on one. Without ``--model`` it serves a
random-weight HDM of the quickstart's size (jobs/configs/quickstart-cpu.yaml: 32 channels,
1 group x 2 blocks, 5 regions) saved to a temp folder; the timing does not depend on the
weights.

    .venv/bin/python bench/serve_load.py [--model PATH|models:/NAME@ALIAS] [--task dehaze]
        [--sizes 256 1024] [--concurrency 1 4 16] [--requests 24] [--max-seconds 20]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import skimage.data
import torch
from PIL import Image

from hdm_model import build_hdm, save_checkpoint, variant_config
from hdm_model.inference import resolve_precision
from hdm_platform.model_refs import load_enhancer
from hdm_platform.imageio import read_image
from hdm_platform.serve.control import deploy, remove_application, wait_until_running

APP_NAME = "hdm-bench"
GOAL_RATIO = 0.85
GOAL_MIN_CONCURRENCY = 4
#: jobs/configs/quickstart-cpu.yaml's model.
QUICKSTART_MODEL = {
    "channels": 32, "num_groups": 1, "blocks_per_group": 2, "num_regions": 5,
    "dcp_patch_size": 3, "dcp_guided_radius": 4,
}  # fmt: skip
_STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def photo_png(size: int) -> bytes:
    """scikit-image's astronaut photo resized to ``size`` x ``size``, as PNG: a real photo
    compresses (and so uploads and decodes) like the images a client sends."""
    photo = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    return buffer.getvalue()


def quickstart_checkpoint(directory: Path) -> str:
    torch.manual_seed(0)
    network = build_hdm(variant_config("HDM", **QUICKSTART_MODEL)).eval()
    return str(save_checkpoint(network, directory))


def in_process_images_per_second(
    enhancer: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, count: int, max_seconds: float
) -> float:
    """Sequential calls on one ``[1, 3, H, W]`` image after one untimed warm-up call."""
    with torch.inference_mode():
        enhancer(image)
        started = time.perf_counter()
        done = 0
        while done < count and time.perf_counter() - started < max_seconds:
            enhancer(image)
            done += 1
        return done / (time.perf_counter() - started)


@dataclass
class CaseResult:
    concurrency: int
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    network_ms_per_image: list[float] = field(default_factory=list)
    #: Per answered request: ms of upload, handle call, encode (``Server-Timing``) and the
    #: network's batch (``X-Inference-Time-Ms``).
    phases_ms: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def latency_ms(self, percentile: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(self.latencies_s, percentile)) * 1000.0


def _png_size(body: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(body)) as image:  # reads the header only
            return image.size if image.format == "PNG" else None
    except OSError:
        return None


def server_timing(header: str) -> dict[str, float]:
    """``"upload;dur=1.5, model;dur=130.2"`` -> ``{"upload": 1.5, "model": 130.2}``."""
    phases = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        phases[name] = float(duration)
    return phases


def time_breakdown(result: CaseResult) -> str:
    """Where a request's time went, in ms (means over the case's answered requests)."""
    if not result.phases_ms:
        return "    no answered request"

    def mean(phase: str) -> float:
        return statistics.fmean(phases[phase] for phases in result.phases_ms)

    outside = 1000.0 * statistics.fmean(result.latencies_s) - mean("upload") - mean("model") - mean("encode")
    return (
        f"    ms per request: upload {mean('upload'):.1f}, handle call {mean('model'):.0f} "
        f"(network's batch {mean('network'):.0f}, queue + batch wait + transfer "
        f"{mean('model') - mean('network'):.0f}), encode {mean('encode'):.1f}, "
        f"outside the ingress {outside:.1f}"
    )


def http_load(
    port: int, path: str, body: bytes, size: int, *, concurrency: int, count: int, max_seconds: float
) -> CaseResult:
    """``concurrency`` clients, each on its own keep-alive connection, share ``count``
    requests; none starts a request after ``max_seconds``."""
    result = CaseResult(concurrency)
    lock = threading.Lock()
    remaining = [count]
    headers = {"Content-Type": "image/png"}

    def take_one() -> bool:
        with lock:
            if remaining[0] == 0 or time.perf_counter() - started > max_seconds:
                return False
            remaining[0] -= 1
            return True

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while take_one():
                sent = time.perf_counter()
                try:
                    connection.request("POST", path, body=body, headers=headers)
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as error:
                    connection.close()  # reconnects on the next request
                    with lock:
                        result.errors.append(f"{type(error).__name__}: {error}")
                    continue
                latency = time.perf_counter() - sent
                with lock:
                    if response.status != 200:
                        result.errors.append(f"HTTP {response.status}: {answer[:200]!r}")
                    elif _png_size(answer) != (size, size):
                        result.errors.append(f"answer is not a {size}x{size} PNG")
                    else:
                        result.latencies_s.append(latency)
                        batch = int(response.getheader("X-Batch-Size"))
                        result.batch_sizes.append(batch)
                        network_ms = float(response.getheader("X-Inference-Time-Ms"))
                        result.network_ms_per_image.append(network_ms / batch)
                        result.phases_ms.append(
                            {**server_timing(response.getheader("Server-Timing")), "network": network_ms}
                        )
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


def serve_config(
    *, http_port: int, task: str, model: str, tracking_uri: str | None, precision: str, replica_cpus: int
) -> dict[str, Any]:
    """One application: the task's model on one replica of ``replica_cpus`` CPUs (Ray sets
    its OMP_NUM_THREADS, hence its torch threads, to that) and the ingress on one CPU."""
    settings = {"model": model, "tracking_uri": tracking_uri, "device": "cpu", "precision": precision}
    return {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "hdm_platform.serve.app:build_app",
                # Open, even when this shell has HDM_API_KEYS set.
                "args": {"tasks": {task: settings}, "api_keys": {"env_var": None}},
                "deployments": [
                    {"name": task, "num_replicas": 1, "ray_actor_options": {"num_cpus": replica_cpus}},
                    {"name": "ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                ],
            }
        ],
    }


def run_cases(
    args: argparse.Namespace, enhancer: Callable[[torch.Tensor], torch.Tensor], port: int
) -> list[str]:
    """Per size: the in-process baseline, one untimed request, each concurrency, the
    baseline again; one table row per case."""
    rows = []
    path = f"/v1/enhance/{args.task}"
    for size in args.sizes:
        body = photo_png(size)
        image = read_image(body)[None]
        bounds = {"count": args.requests, "max_seconds": args.max_seconds / 2}
        before = in_process_images_per_second(enhancer, image, **bounds)
        # The replica warmed up on a small image; the first call at this size builds kernels.
        warmup = http_load(port, path, body, size, concurrency=1, count=1, max_seconds=args.max_seconds)
        if warmup.errors:
            raise RuntimeError(f"warm-up request at {size}x{size} failed: {warmup.errors[0]}")
        results = [
            http_load(
                port, path, body, size,
                concurrency=concurrency, count=args.requests, max_seconds=args.max_seconds,
            )  # fmt: skip
            for concurrency in args.concurrency
        ]
        after = in_process_images_per_second(enhancer, image, **bounds)
        in_process = (before + after) / 2
        rows.append(
            f"{size}x{size} in-process: {before:.2f} img/s before, {after:.2f} after the HTTP cases; "
            f"{1000 / in_process:.0f} ms/img"
        )
        for result in results:
            ratio = result.images_per_second / in_process
            missed = result.concurrency >= GOAL_MIN_CONCURRENCY and (ratio < GOAL_RATIO or result.errors)
            rows.append(
                f"{f'{size}x{size}':>9} {result.concurrency:>4} {len(result.latencies_s):>4} "
                f"{len(result.errors):>3} {result.images_per_second:>7.2f} {result.latency_ms(50):>8.0f} "
                f"{result.latency_ms(95):>8.0f} {result.latency_ms(99):>8.0f} "
                f"{_mean(result.batch_sizes):>5.2f} {_mean(result.network_ms_per_image):>10.0f} "
                f"{in_process:>7.2f} {ratio:>6.2f}{' *' if missed else ''}"
            )
            rows.append(time_breakdown(result))
            for error in sorted(set(result.errors)):
                rows.append(f"    error: {error}")
    return rows


def _mean(values: list[float] | list[int]) -> float:
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="checkpoint folder or models:/ URI (default: a random quickstart-size HDM)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for a models:/ --model")
    parser.add_argument("--task", default="dehaze", choices=["dehaze", "derain", "lowlight"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=24, help="requests (in-process: calls) per case at most"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=20.0,
        help="no request starts later in a case; each in-process measurement gets half",
    )  # fmt: skip
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument(
        "--replica-cpus", type=int, default=1, help="CPUs (torch threads) of the model replica"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="hdmbench-", dir="/tmp"))  # short: Ray's socket paths
    try:
        model = args.model or quickstart_checkpoint(workdir / "checkpoint")
        torch.set_num_threads(args.replica_cpus)
        enhancer = load_enhancer(model, precision=args.precision, tracking_uri=args.tracking_uri)

        dashboard_port, http_port = free_port(), free_port()
        ray.init(
            address="local",
            num_cpus=args.replica_cpus + 1,
            include_dashboard=True,  # the Serve REST API that deploys configs
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            _temp_dir=str(workdir / "ray"),
            logging_level="WARNING",
        )
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        # No headers of our own: the REST client adds the cluster's token when Ray's token
        # authentication is on.
        try:
            started = time.perf_counter()
            config = serve_config(
                http_port=http_port, task=args.task, model=model, tracking_uri=args.tracking_uri,
                precision=args.precision, replica_cpus=args.replica_cpus,
            )  # fmt: skip
            deploy(config, address=dashboard, headers={})
            wait_until_running([APP_NAME], address=dashboard, headers={}, timeout_s=_STARTUP_TIMEOUT_S)
            startup_s = time.perf_counter() - started
            rows = run_cases(args, enhancer, http_port)
        finally:
            remove_application(None, address=dashboard, headers={})
            ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    model_label = args.model or "random-weight HDM of the quickstart's size (32 channels, 1 x 2 blocks, K=5)"
    print(
        f"model {model_label}, task {args.task}, precision {resolve_precision(args.precision, 'cpu')}; "
        f"replica 1 x {args.replica_cpus} CPU(s) + ingress 1 CPU; "
        f"in-process {args.replica_cpus} torch thread(s); "
        f"app started in {startup_s:.0f} s"
    )
    print(f"bounds per case: {args.requests} requests, no new request after {args.max_seconds:g} s")
    header = (
        f"{'size':>9} {'conc':>4} {'done':>4} {'err':>3} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'batch':>5} {'net ms/img':>10} {'in-proc':>7} {'ratio':>6}"
    )
    print("img/s, latency, batch and net ms/img (the replica's network time per image): over HTTP;")
    print("in-proc: the in-process baseline's img/s; ratio: HTTP / in-process (* misses the goal)")
    print(header)
    print("-" * len(header))
    for line in rows:
        print(line)
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print(f"goal: HTTP/in-process >= {GOAL_RATIO} at concurrency >= {GOAL_MIN_CONCURRENCY}, zero errors")


if __name__ == "__main__":
    main()
