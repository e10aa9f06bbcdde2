"""The laptop's services: a Ray head and an MLflow tracking server, started once and reused.

``hdm local up`` starts what is not already running and records it in
``$HDM_HOME/services.json``; ``hdm local env`` prints the variables that point ``hdm``,
``ray`` and ``mlflow`` at them; ``hdm local down`` stops exactly what ``up`` started.

* **Ray head**: ``ray start --head --block`` in its own process group, so stopping it stops
  this cluster only (``ray stop`` would stop every Ray on the machine). Token
  authentication stays on: a token is generated into ``~/.ray/auth_token`` when there is
  none, and the head runs with ``RAY_AUTH_MODE=token``. Its environment carries
  ``MLFLOW_TRACKING_URI`` and ``HDM_HOME``, so training workers and Serve replicas resolve
  ``models:/...`` against this registry. It gets more logical CPUs than the machine has
  cores (``LOGICAL_CPUS``): two training workers, the input pipeline and the Serve
  replicas must all be schedulable at once; logical CPUs only gate scheduling.
* **MLflow**: ``mlflow server`` over ``$HDM_HOME/mlflow.db`` (SQLite), artifacts proxied
  into ``$HDM_HOME/mlartifacts``; its UI is the tracking URI itself. Without MLflow's
  server-side job execution (:data:`MLFLOW_SERVER_ENVIRONMENT`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from hdm_model.atomic import write_bytes_atomically

__all__ = [
    "LOGICAL_CPUS",
    "MLFLOW_SERVER_ENVIRONMENT",
    "Ports",
    "ServiceError",
    "Services",
    "environment",
    "read_services",
    "start_services",
    "stop_services",
]

#: Logical CPUs of the local head, at least (more if the machine has more cores).
LOGICAL_CPUS = 6
#: ``mlflow server``'s environment. Since MLflow 3.x the server runs jobs (GenAI evaluation,
#: prompt optimisation, trace roll-ups) by default, in about nine Huey consumer processes
#: that together took 0.7 of a core while idle on the 2-core machine, beside training; the
#: platform runs no such jobs.
MLFLOW_SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
_STATE_FILE = "services.json"
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 15.0


class ServiceError(RuntimeError):
    """A local service that did not start or stop; the message names its log."""


@dataclass(frozen=True)
class Ports:
    """Where the services listen on 127.0.0.1."""

    ray: int = 6379
    dashboard: int = 8265
    ray_client: int = 10001
    dashboard_agent: int = 52365
    mlflow: int = 5000
    serve: int = 8000


@dataclass(frozen=True)
class Services:
    """What ``start_services`` started (or found running), as saved in ``services.json``."""

    home: str
    ports: Ports
    ray_pid: int
    ray_temp_dir: str
    mlflow_pid: int

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ports.ray}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.dashboard}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.mlflow}"


def environment(services: Services) -> dict[str, str]:
    """The variables that point ``hdm``, Ray clients and MLflow clients at ``services``."""
    return {
        "HDM_HOME": services.home,
        "RAY_ADDRESS": services.ray_address,
        "RAY_DASHBOARD_ADDRESS": services.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": services.mlflow_url,
    }


def read_services(home: Path) -> Services | None:
    """The services recorded under ``home``, if that file exists and both still run."""
    try:
        saved = json.loads((home / _STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    services = Services(**{**saved, "ports": Ports(**saved["ports"])})
    if _alive(services.ray_pid) and _alive(services.mlflow_pid):
        return services
    return None


def start_services(home: Path, ports: Ports = Ports()) -> tuple[Services, bool]:
    """Start the Ray head and MLflow server for ``home``, or reuse running ones.

    Returns the services and whether they were already running.

    Raises:
        ServiceError: A service did not come up within two minutes; names its log file.
    """
    home = home.resolve()
    running = read_services(home)
    if running is not None:
        return running, True
    stop_services(home)  # whatever half of an earlier pair survived
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mlflow_pid = _start_mlflow(home, ports, logs / "mlflow.log")
    try:
        ray_pid, temp_dir = _start_ray_head(home, ports, logs / "ray-head.log")
    except BaseException:
        _stop_group(mlflow_pid)
        raise
    services = Services(
        home=str(home), ports=ports, ray_pid=ray_pid, ray_temp_dir=temp_dir, mlflow_pid=mlflow_pid
    )
    state = home / _STATE_FILE
    write_bytes_atomically(state, json.dumps(asdict(services), indent=2).encode())
    return services, False


def stop_services(home: Path) -> list[str]:
    """Stop the services recorded under ``home``; returns what was stopped."""
    state = home.resolve() / _STATE_FILE
    try:
        saved = json.loads(state.read_text())
    except FileNotFoundError:
        return []
    stopped = []
    if _stop_group(saved["ray_pid"]):
        stopped.append("ray head")
    # Ray's workers leave the head's process group; their command lines name its temp dir.
    for pid in _processes_mentioning(saved["ray_temp_dir"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _stop_group(saved["mlflow_pid"]):
        stopped.append("mlflow server")
    state.unlink()
    return stopped


def _start_mlflow(home: Path, ports: Ports, log: Path) -> int:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1",
    ]  # fmt: skip
    process = _spawn(command, log, {**os.environ, **MLFLOW_SERVER_ENVIRONMENT})
    _wait_for(f"http://127.0.0.1:{ports.mlflow}/health", process, log, "mlflow server")
    return process.pid


def _start_ray_head(home: Path, ports: Ports, log: Path) -> tuple[int, str]:
    _ensure_auth_token()
    # Ray's unix sockets live under the temp dir and must stay under 107 characters.
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:8]
    temp_dir = tempfile.mkdtemp(prefix=f"hdm-ray-{digest}-", dir="/tmp")
    environment = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "HDM_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
    }
    environment.pop("RAY_ADDRESS", None)
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--port={ports.ray}", f"--dashboard-port={ports.dashboard}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={ports.ray_client}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent}",
        f"--num-cpus={max(os.cpu_count() or 1, LOGICAL_CPUS)}", "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    process = _spawn(command, log, environment)
    _wait_for(f"http://127.0.0.1:{ports.dashboard}/api/version", process, log, "ray head")
    return process.pid, temp_dir


def _ensure_auth_token() -> None:
    """A token in ``~/.ray/auth_token`` for the head and its clients (``ray`` makes one)."""
    if (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
        return
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
        check=True, capture_output=True,
    )  # fmt: skip


def _spawn(command: list[str], log: Path, environment: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as output:
        # A session of its own: stopping it stops its children, and closing the terminal
        # that ran `hdm local up` does not.
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=environment, start_new_session=True,
        )  # fmt: skip


def _wait_for(url: str, process: subprocess.Popen, log: Path, name: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: up, whatever it thinks of an unauthenticated probe
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_group(process.pid)
            tail = log.read_text(errors="replace")[-1500:]
            raise ServiceError(f"{name} did not start (log: {log}):\n{tail}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def _processes_mentioning(text: str) -> list[int]:
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs (macOS): the head's group and reaper stop its workers
        return []
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids
