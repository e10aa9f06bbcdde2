"""A running HDM Serve application for HTTP tests, on a Ray head of its own.

For the web page's tests (or any test over HTTP), take the session fixture ``served_app``
(registered in ``conftest.py``); it yields a :class:`ServedApp`. The first test that asks
for it pays about a minute (a Ray head, then the replicas); later ones share it. This
process never connects to Ray (other test modules ``ray.init`` their own clusters): the
head is a ``ray start`` subprocess with its own temp dir, ports and token, driven through
the Serve REST API, and it is stopped (only it) at the end of the session.

Two applications run, CPU only, one replica per deployment, on 127.0.0.1:

* ``hdm`` at ``served_app.base_url`` (``http://127.0.0.1:PORT``): no API keys, the default
  limits. Tasks ``dehaze`` (``models:/<served_app.registered_model>@champion`` in the
  ``mlflow_server`` registry), ``derain`` and ``lowlight`` (checkpoint folders). The models
  are tiny HDMs with random weights: results have the input's size and are valid images,
  not meaningful enhancements. ``GET /`` serves ``hdm_platform/web/index.html``.
* ``strict`` at ``served_app.strict_url`` (``base_url + "/strict"``): every route but
  ``/healthz`` needs ``Authorization: Bearer KEY`` (``served_app.api_keys``), and the
  limits are tight (``STRICT_LIMITS``); only ``lowlight``, one request at a time with one
  queued. Its tests exercise refusals; do not use it for anything that must succeed.

The HTTP contract the page codes against is in the README (and ``/docs`` on a running
server): ``POST /v1/enhance/{task}``, ``POST /v1/pipeline?tasks=derain,dehaze`` (raw image
body with ``Content-Type: image/*``, or multipart field ``file``; ``?format=png|jpeg|webp``)
answer the image with ``X-Model-Version``, ``X-Inference-Time-Ms``,
``X-Processing-Time-Ms`` and ``X-Batch-Size`` headers; ``POST /v1/explain/{task}`` answers a
PNG; ``GET /v1/models`` lists ``{task, registered_model, version, alias, parameters, ...}``;
errors are ``{"error": {"kind": ..., "message": ...}}`` with their HTTP status.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hdm_platform.serve.control import (
    deploy,
    remove_application,
    serve_client,
    serve_details,
    wait_until_running,
)
from hdm_platform.tracking.mlflow_run import TrackedRun
from hdm_platform.tracking.registry import register_model, registry_client
from PIL import Image

from hdm_model import build_hdm, save_checkpoint, variant_config

__all__ = [
    "MAIN_APP",
    "STRICT_APP",
    "STRICT_LIMITS",
    "STRICT_RETRY_AFTER_S",
    "RayHead",
    "ServedApp",
    "free_port",
    "png_bytes",
    "register_tiny_model",
    "replica_pids",
    "running_served_app",
    "save_tiny_checkpoint",
    "smooth_png",
    "start_ray_head",
]

MAIN_APP = "hdm"
STRICT_APP = "strict"
#: The strict application's limits: 256 KiB uploads, 2.1 MPix, half a second per request.
STRICT_LIMITS = {"max_body_bytes": 256 * 1024, "max_pixels": 2_100_000, "request_timeout_s": 0.5}
#: The strict application's Retry-After on overload (its deployment's backpressure_config).
STRICT_RETRY_AFTER_S = 3
_STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tiny_checkpoint(directory: Path, *, seed: int, variant: str = "HDM") -> Path:
    """A one-block, 8-channel HDM (random weights, ``seed``) saved as a checkpoint folder."""
    torch.manual_seed(seed)
    network = build_hdm(variant_config(variant, channels=8, num_groups=1, blocks_per_group=1))
    return save_checkpoint(network.eval(), directory)


def register_tiny_model(tracking_uri: str, name: str, *, seed: int, alias: str) -> Any:
    """Log a tiny HDM to a new MLflow run and register it as a new version of ``name``."""
    torch.manual_seed(seed)
    network = build_hdm(variant_config("HDM", channels=8, num_groups=1, blocks_per_group=1)).eval()
    run = TrackedRun.start_or_resume(
        tracking_uri=tracking_uri,
        experiment="serve-test",
        run_name=f"{name}-seed{seed}",
        storage_path="/runs",
    )
    with tempfile.TemporaryDirectory(prefix="hdm-model-") as staging:
        source = run.log_model_folder(save_checkpoint(network, staging, metadata={"task": "dehaze"}))
    version = register_model(
        registry_client(tracking_uri), name=name, source=source, run_id=run.run_id, alias=alias
    )
    run.finish()
    return version


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(height: int, width: int, *, seed: int = 0) -> bytes:
    """A random RGB PNG (about 3 bytes per pixel: noise does not compress)."""
    return _png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_png(height: int, width: int) -> bytes:
    """A colour-gradient RGB PNG: many pixels in few bytes."""
    rows = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    columns = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    return _png(np.stack([rows, columns, np.full_like(rows, 128)], axis=-1))


@dataclass(frozen=True)
class RayHead:
    """A ``ray start --head`` of a test's own, with token authentication on."""

    gcs_address: str
    dashboard_url: str
    metrics_url: str
    token: str
    env: dict[str, str]  # for subprocesses that should reach this head (its HOME and token)
    temp_dir: str

    @property
    def headers(self) -> dict[str, str]:
        """What the Serve REST API needs (``hdm serve`` sends the same)."""
        return {"Authorization": f"Bearer {self.token}"}


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def stop_head(pgid: int, temp_dir: str) -> None:
    """Stop only this head: its process group, then any worker naming its temp dir (workers
    leave the group; their command lines name the head's temp dir)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    for pid in _processes_mentioning(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _ray_start(
    env: dict[str, str], ports: dict[str, int], num_cpus: int, temp_dir: str
) -> tuple[int, str]:
    """Run ``ray start --head``; its process group and output (empty when it worked)."""
    start = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={ports['gcs']}",
            f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--metrics-export-port={ports['metrics']}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = start.communicate(timeout=180)
    return start.pid, "" if start.returncode == 0 else output


@contextlib.contextmanager
def start_ray_head(root: Path, *, num_cpus: int = 4, attempts: int = 3) -> Iterator[RayHead]:
    """A Ray head with a dashboard (the Serve REST API) and Prometheus metrics on free
    ports, token authentication on (a fresh token in a HOME of its own), stopped on exit.

    A short /tmp temp dir keeps Ray's unix sockets under the 107-character limit. ``ray
    start`` gives its raylet a fixed 30 s to register, which a machine loaded by other
    clusters can miss: a failed start is cleaned up and tried again, ``attempts`` times.
    """
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(16)
    (home / ".ray" / "auth_token").write_text(token)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for attempt in range(1, attempts + 1):
        temp_dir = tempfile.mkdtemp(prefix="hdmserve-", dir="/tmp")
        ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "metrics")}
        pgid, failure = _ray_start(env, ports, num_cpus, temp_dir)
        if not failure:
            break
        stop_head(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == attempts:
            raise RuntimeError(f"ray start failed {attempts} times; the last time:\n{failure}")
    try:
        yield RayHead(
            gcs_address=f"127.0.0.1:{ports['gcs']}",
            dashboard_url=f"http://127.0.0.1:{ports['dashboard']}",
            metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            token=token,
            env=env,
            temp_dir=temp_dir,
        )
    finally:
        stop_head(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_rest_api(head: RayHead) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while True:
        try:
            serve_client(head.dashboard_url, head.headers)
            return
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@dataclass(frozen=True)
class ServedApp:
    """The running applications (see the module docstring) and what they were made from."""

    base_url: str  # the open "hdm" application: "http://127.0.0.1:PORT"
    strict_url: str  # the "strict" application: base_url + "/strict"
    api_keys: tuple[
        str, ...
    ]  # keys the strict application accepts (one from its env, one from a file)
    models: dict[str, str]  # task -> the model reference "hdm" serves it with
    checkpoints: dict[
        str, Path
    ]  # name -> tiny checkpoint folder ("derain", "lowlight", "strict-lowlight")
    registered_model: str  # dehaze's registered model (alias "champion")
    tracking_uri: str  # the MLflow server holding it
    config: dict[str, Any]  # the Serve config deployed (both applications)
    head: RayHead = field(repr=False)

    @property
    def strict_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_keys[0]}"}


def _served_app_config(
    *,
    http_port: int,
    models: dict[str, str],
    tracking_uri: str,
    strict_model: Path,
    key_file: Path,
    env_key: str,
) -> dict[str, Any]:
    def model(reference: str) -> dict[str, Any]:
        return {"model": reference, "tracking_uri": tracking_uri, "device": "cpu"}

    def model_deployment(name: str, **options: Any) -> dict[str, Any]:
        return {"name": name, "ray_actor_options": {"num_cpus": 0.5}, **options}

    return {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": MAIN_APP,
                "route_prefix": "/",
                "import_path": "hdm_platform.serve.app:build_app",
                # Open even when the shell running the tests has HDM_API_KEYS set.
                "args": {
                    "tasks": {task: model(reference) for task, reference in models.items()},
                    "api_keys": {"env_var": None},
                },
                "deployments": [
                    *(
                        model_deployment(task, max_ongoing_requests=8, max_queued_requests=32)
                        for task in models
                    ),
                    {"name": "ingress", "ray_actor_options": {"num_cpus": 0.5}},
                ],
            },
            {
                "name": STRICT_APP,
                "route_prefix": f"/{STRICT_APP}",
                "import_path": "hdm_platform.serve.app:build_app",
                "runtime_env": {"env_vars": {"HDM_TEST_API_KEYS": env_key}},
                "args": {
                    "tasks": {"lowlight": {**model(str(strict_model)), "max_batch_size": 1}},
                    "limits": STRICT_LIMITS,
                    "api_keys": {"env_var": "HDM_TEST_API_KEYS", "file": str(key_file)},
                },
                "deployments": [
                    model_deployment(
                        "lowlight",
                        max_ongoing_requests=1,
                        max_queued_requests=1,
                        backpressure_config={"retry_after_s": STRICT_RETRY_AFTER_S},
                    ),
                    {"name": "ingress", "ray_actor_options": {"num_cpus": 0.25}},
                ],
            },
        ],
    }


@contextlib.contextmanager
def running_served_app(root: Path, tracking_uri: str) -> Iterator[ServedApp]:
    """Models, a Ray head and both applications; everything stopped on exit."""
    registered_model = f"hdm-serve-test-{secrets.token_hex(4)}"
    register_tiny_model(tracking_uri, registered_model, seed=1, alias="champion")
    checkpoints = {
        "derain": save_tiny_checkpoint(root / "derain", seed=2),
        "lowlight": save_tiny_checkpoint(root / "lowlight", seed=3),
        # Learned masks (HDM-F): a model /v1/explain cannot draw DCP masks for.
        "strict-lowlight": save_tiny_checkpoint(root / "strict-lowlight", seed=4, variant="HDM-F"),
    }
    models = {
        "dehaze": f"models:/{registered_model}@champion",
        "derain": str(checkpoints["derain"]),
        "lowlight": str(checkpoints["lowlight"]),
    }
    api_keys = (f"file-key-{secrets.token_hex(8)}", f"env-key-{secrets.token_hex(8)}")
    key_file = root / "api-keys"
    key_file.write_text(f"# keys of the strict test application\n{api_keys[0]}\n")
    http_port = free_port()
    config = _served_app_config(
        http_port=http_port,
        models=models,
        tracking_uri=tracking_uri,
        strict_model=checkpoints["strict-lowlight"],
        key_file=key_file,
        env_key=api_keys[1],
    )
    with start_ray_head(root) as head:
        _wait_for_rest_api(head)
        deploy(config, address=head.dashboard_url, headers=head.headers)
        try:
            wait_until_running(
                [MAIN_APP, STRICT_APP],
                address=head.dashboard_url,
                headers=head.headers,
                timeout_s=_STARTUP_TIMEOUT_S,
            )
            base_url = f"http://127.0.0.1:{http_port}"
            yield ServedApp(
                base_url=base_url,
                strict_url=f"{base_url}/{STRICT_APP}",
                api_keys=api_keys,
                models=models,
                checkpoints=checkpoints,
                registered_model=registered_model,
                tracking_uri=tracking_uri,
                config=config,
                head=head,
            )
        finally:
            # Serve first (replicas finish what they hold), then the head.
            with contextlib.suppress(ConnectionError, RuntimeError):
                remove_application(None, address=head.dashboard_url, headers=head.headers)


def replica_pids(served_app: ServedApp, app_name: str, deployment: str) -> list[int]:
    """Process ids of the deployment's RUNNING replicas."""
    details = serve_details(address=served_app.head.dashboard_url, headers=served_app.head.headers)
    replicas = details["applications"][app_name]["deployments"][deployment]["replicas"]
    return [replica["pid"] for replica in replicas if replica["state"] == "RUNNING"]
