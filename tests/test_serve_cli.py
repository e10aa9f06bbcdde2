"""``hdm serve up|status|down`` against the ``served_app`` fixture's Ray head, through the
Serve REST API with the head's token (``hdm serve reload`` runs in test_serve.py's alias
test)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner
from hdm_platform.cli.serve import serve
from serving import MAIN_APP, STRICT_APP, replica_pids

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "serve_configs"
SCRATCH_APP = "scratch"


@pytest.fixture
def head_token(served_app, monkeypatch):
    """This shell holds the head's token, as a user's would (``RAY_AUTH_TOKEN``); Ray's
    token loader caches per process, so it is left clean for whoever runs next."""
    from ray._raylet import AuthenticationTokenLoader

    monkeypatch.setenv("RAY_AUTH_TOKEN", served_app.head.token)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    yield served_app.head.token
    AuthenticationTokenLoader.instance().reset_cache()


def _invoke(*args: str):
    return CliRunner().invoke(serve, list(args), catch_exceptions=False)


def test_up_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    config = yaml.safe_load((CONFIGS / "local.yaml").read_text())
    config["applications"][0]["args"]["limits"]["max_pixels"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = _invoke("up", str(tmp_path / "bad.yaml"), "--address", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert (
        "applications[0].args.limits.max_pixels: Input should be greater than or equal to 1"
        in result.output
    )


def test_status_of_an_unreachable_cluster_is_a_clear_error(head_token):
    result = _invoke("status", "--address", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "Serve REST API at http://127.0.0.1:9" in result.output


def test_up_adds_an_application_status_lists_it_and_down_removes_only_it(
    served_app, head_token, tmp_path
):
    address = served_app.head.dashboard_url
    before = {
        task: replica_pids(served_app, MAIN_APP, task) for task in ("ingress", "dehaze", "derain")
    }

    # Serve's declarative config is the cluster's whole state: the running applications
    # stay in it, unchanged, and one is added.
    config = copy.deepcopy(served_app.config)
    config["applications"].append(
        {
            "name": SCRATCH_APP,
            "route_prefix": f"/{SCRATCH_APP}",
            "import_path": "hdm_platform.serve.app:build_app",
            "args": {
                "tasks": {
                    "derain": {"model": str(served_app.checkpoints["derain"]), "device": "cpu"}
                },
                "api_keys": {"env_var": None},
            },
            "deployments": [
                {"name": "derain", "ray_actor_options": {"num_cpus": 0.25}},
                {"name": "ingress", "ray_actor_options": {"num_cpus": 0.25}},
            ],
        }
    )
    (tmp_path / "with-scratch.yaml").write_text(yaml.safe_dump(config))
    up = _invoke(
        "up", str(tmp_path / "with-scratch.yaml"), "--address", address, "--timeout", "600"
    )
    assert up.exit_code == 0, up.output
    scratch_url = f"{served_app.base_url}/{SCRATCH_APP}"
    assert f"{SCRATCH_APP}: RUNNING  {scratch_url}" in up.output
    # While it waits: one line each time the applications' state changes, the last one all running.
    progress = [line for line in up.output.splitlines() if re.match(r"\[\s*\d+ s\] ", line)]
    assert progress and len(set(progress)) == len(progress)
    assert f"{SCRATCH_APP} RUNNING (" in progress[-1] and "derain 1/1" in progress[-1]
    assert requests.get(f"{scratch_url}/healthz", timeout=60).json()["tasks"] == ["derain"]
    # Deploying the same config again restarted nothing.
    assert {task: replica_pids(served_app, MAIN_APP, task) for task in before} == before

    status = _invoke("status", "--address", address)
    assert status.exit_code == 0, status.output
    for name in (MAIN_APP, STRICT_APP, SCRATCH_APP):
        assert f"{name}: RUNNING" in status.output
    assert "dehaze     HEALTHY    1/1 replicas running" in status.output

    down = _invoke("down", "--app", SCRATCH_APP, "--yes", "--address", address)
    assert down.exit_code == 0, down.output
    assert f"removed application {SCRATCH_APP}" in down.output
    status = _invoke("status", "--address", address)
    assert SCRATCH_APP not in status.output and f"{MAIN_APP}: RUNNING" in status.output
    assert requests.get(f"{served_app.base_url}/healthz", timeout=60).status_code == 200
    assert {task: replica_pids(served_app, MAIN_APP, task) for task in before} == before

    missing = _invoke("down", "--app", SCRATCH_APP, "--yes", "--address", address)
    assert missing.exit_code == 1 and f"no application '{SCRATCH_APP}'" in missing.output
