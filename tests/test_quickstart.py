"""The README's first command, ``scripts/quickstart.sh``, end to end at a reduced size.

It runs as a user runs it (a subprocess, services on loopback under a temporary HDM_HOME and
HOME, free ports), then the test checks what it left: the dataset manifest, the registered
model and its alias, the served model answering over HTTP, the comparison table and picture,
and that ``hdm local up`` reuses and ``hdm local down`` stops the services.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HDM = str(Path(sys.executable).parent / "hdm")
PAIRS = 64


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):
    """One reduced quickstart run; yields its environment and output, then stops its services."""
    root = tmp_path_factory.mktemp("quickstart")
    (root / "home").mkdir()
    ray, dashboard, client, agent, mlflow, serve = _free_ports(6)
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("RAY_", "MLFLOW_"))},
        "HOME": str(root / "home"),  # Ray's token goes to this ~/.ray, not the user's
        "HDM_HOME": str(root / "hdm"),
        "QUICKSTART_PAIRS": str(PAIRS),
        "QUICKSTART_EPOCHS": "2",
        "HDM_RAY_PORT": str(ray),
        "HDM_DASHBOARD_PORT": str(dashboard),
        "HDM_RAY_CLIENT_PORT": str(client),
        "HDM_DASHBOARD_AGENT_PORT": str(agent),
        "HDM_MLFLOW_PORT": str(mlflow),
        "HDM_SERVE_PORT": str(serve),
    }
    try:
        run = subprocess.run(
            ["bash", "scripts/quickstart.sh"], cwd=REPO, env=environment,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        )  # fmt: skip
        yield environment, run
    finally:
        subprocess.run([HDM, "local", "down"], env=environment, timeout=120, check=False)


def test_quickstart_runs_every_step(quickstart):
    _, run = quickstart
    assert run.returncode == 0, run.stdout[-6000:]
    for step in range(1, 8):
        assert f"==> [{step}/7]" in run.stdout
    assert "Web page (upload, before/after):  http://127.0.0.1:" in run.stdout
    assert "Stop everything:" in run.stdout


def test_quickstart_writes_the_dataset_with_its_manifest(quickstart):
    environment, _ = quickstart
    manifest = json.loads((Path(environment["HDM_HOME"]) / "datasets/quickstart-dehaze/manifest.json").read_text())
    assert manifest["task"] == "dehaze"
    assert sum(split["rows"] for split in manifest["splits"].values()) == PAIRS
    assert {"train", "val", "test"} <= set(manifest["splits"])


def test_quickstart_registers_the_champion(quickstart):
    environment, _ = quickstart
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{environment['HDM_MLFLOW_PORT']}")
    champion = client.get_model_version_by_alias("hdm-dehaze", "champion")
    assert champion.status == "READY"
    assert client.get_run(champion.run_id).data.metrics["val_psnr"] > 0


def test_the_served_model_answers_over_http(quickstart):
    environment, _ = quickstart
    hazy = sorted((Path(environment["HDM_HOME"]) / "quickstart/hazy").iterdir())
    assert hazy
    image = hazy[0].read_bytes()
    answer = requests.post(
        f"http://127.0.0.1:{environment['HDM_SERVE_PORT']}/v1/enhance/dehaze",
        data=image, headers={"Content-Type": "image/png"}, timeout=120,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as enhanced, Image.open(hazy[0]) as source:
        assert enhanced.size == source.size
    enhanced_files = sorted((Path(environment["HDM_HOME"]) / "quickstart/enhanced").iterdir())
    assert [path.stem for path in enhanced_files] == [path.stem for path in hazy]


def test_quickstart_compares_the_model_with_the_input_and_dcp(quickstart):
    environment, run = quickstart
    out = Path(environment["HDM_HOME"]) / "quickstart"
    table = (out / "comparison.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "PSNR" not in line]
    assert rows == ["hdm", "hazy input", "DCP"]
    verdicts = re.findall(r"^hdm (?:beats|does NOT beat) (.+) by [+-]\d+\.\d\d dB PSNR$", run.stdout, re.MULTILINE)
    assert verdicts == ["hazy input", "DCP"]
    with Image.open(out / "before-after.png") as picture:
        # Four test images, one row each: input, hdm, DCP, target.
        assert picture.width > 4 * 96 and picture.height > 4 * 96


def descendant_commands(pid: int) -> list[str]:
    """The command lines of every process below ``pid``, from ``/proc``."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ValueError, OSError):
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    below, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        below += children
        frontier = children
    return [commands[child] for child in below]


def test_local_services_are_reused_then_stopped(quickstart):
    environment, _ = quickstart
    again = subprocess.run([HDM, "local", "up"], env=environment, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("reusing:")
    state = json.loads((Path(environment["HDM_HOME"]) / "services.json").read_text())
    # After the whole quickstart, the MLflow server has started no job consumers (MLflow 3.x's
    # default: about nine idle processes competing with training for the 2 cores).
    assert not [command for command in descendant_commands(state["mlflow_pid"]) if "huey" in command]
    down = subprocess.run([HDM, "local", "down"], env=environment, capture_output=True, text=True, timeout=120)
    assert down.stdout.strip() == "stopped: ray head, mlflow server"
    for pid in (state["ray_pid"], state["mlflow_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{environment['HDM_MLFLOW_PORT']}/health", timeout=5)
