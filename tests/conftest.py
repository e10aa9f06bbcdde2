"""Shared fixtures: an S3 endpoint served by moto and an MLflow tracking server, both on
loopback; fresh buckets; tiny generated images."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

from hdm_platform.local import MLFLOW_SERVER_ENVIRONMENT

_S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; AWS_* variables point at it for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _S3_ENVIRONMENT.items():
            patch.setenv(name, value)
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        # A cached S3FileSystem made before these variables were set would still talk to
        # its old endpoint with its old credentials.
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A new empty bucket on the moto endpoint, as ``s3://<bucket>``."""
    bucket = f"hdm-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    """Writes a small random RGB PNG (parents created) and returns its bytes."""

    def write(path: Path, width: int = 12, height: int = 8, seed: int = 0) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        return buffer.getvalue()

    return write


_MLFLOW_STARTUP_TIMEOUT_S = 90.0


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``mlflow server`` (SQLite backend, local artifact root) and yield its URI."""
    root: Path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # Its own process group: `mlflow server` starts uvicorn as a child, and both must stop.
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **MLFLOW_SERVER_ENVIRONMENT},
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + _MLFLOW_STARTUP_TIMEOUT_S
        while not _healthy(uri):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def served_app(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> Iterator[object]:
    """The HDM Serve applications running on a Ray head of their own, over HTTP on loopback.

    Yields ``serving.ServedApp``: ``.base_url`` (the open application, ``http://127.0.0.1:PORT``),
    ``.strict_url`` and ``.api_keys`` (API keys and tight limits), ``.models``,
    ``.checkpoints``, ``.registered_model``, ``.tracking_uri``. See tests/serving.py.
    """
    from serving import running_served_app

    with running_served_app(tmp_path_factory.mktemp("served-app"), mlflow_server) as app:
        yield app
