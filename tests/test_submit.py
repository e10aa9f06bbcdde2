"""``hdm submit``: runtime environment, token auth, early refusals, and real jobs on a local head."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from hdm_platform.cli.submit import (
    auth_headers,
    find_project_dir,
    job_entrypoint,
    job_runtime_env,
    submit,
)
from serving import stop_head

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/tiny-cpu.yaml"


@pytest.fixture
def token_loader():
    """Ray's token loader caches per process: leave it clean for whoever runs next."""
    from ray._raylet import AuthenticationTokenLoader

    yield AuthenticationTokenLoader.instance()
    AuthenticationTokenLoader.instance().reset_cache()


def test_entrypoint_runs_the_job_script_with_config_and_overrides():
    command = job_entrypoint("jobs/train.py", TINY, ["train.lr=1e-3", "run.name=a b"], ["--x"])
    assert shlex.split(command) == [
        "python", "jobs/train.py", "--config", TINY,
        "--set", "train.lr=1e-3", "--set", "run.name=a b", "--x",
    ]  # fmt: skip


def test_runtime_env_ships_the_checkout_and_passes_settings_through():
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "",  # empty: not passed
        "AWS_PROFILE": "laptop-only",  # names a local file: not passed
        "HOME": "/home/me",
    }
    env = job_runtime_env(PROJECT, environ)
    assert env["working_dir"] == str(PROJECT)
    assert env["py_modules"] == [str(PROJECT / "platform" / "hdm_platform")]
    assert {".venv", ".git", ".hdm", "bench/out"} <= set(env["excludes"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ACCESS_KEY_ID": "id"}


def test_project_dir_is_found_from_a_subfolder(tmp_path):
    assert find_project_dir(PROJECT / "jobs" / "configs") == PROJECT
    with pytest.raises(Exception, match="no HDM project checkout"):
        find_project_dir(tmp_path)


def test_auth_header_carries_the_token_ray_would_use(tmp_path, monkeypatch, token_loader):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers(os.environ) == {}

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token")
    assert auth_headers(os.environ) == {"Authorization": "Bearer file-token"}

    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")  # Ray's precedence: env var first
    assert auth_headers(os.environ) == {"Authorization": "Bearer env-token"}

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers(os.environ) == {}


def test_unreadable_token_path_is_a_clear_error(tmp_path, monkeypatch, token_loader):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    result = CliRunner().invoke(submit, ["train", "--config", str(PROJECT / TINY)])
    assert result.exit_code == 1
    assert "cannot read the Ray authentication token" in result.output
    assert "missing" in result.output


# An address nothing listens on: each refusal below must happen before connecting.
UNREACHABLE = ["--address", "http://127.0.0.1:9"]


def test_placeholder_values_are_refused_before_submitting():
    config = str(PROJECT / "jobs" / "configs" / "dehaze-reside-its.yaml")
    result = CliRunner().invoke(submit, ["train", "--config", config, *UNREACHABLE])
    assert result.exit_code == 2
    assert "data.uri" in result.output and "YOUR-BUCKET" in result.output


def test_bad_override_is_refused_naming_the_field():
    result = CliRunner().invoke(
        submit, ["train", "--config", str(PROJECT / TINY), "--set", "train.lr=-1", *UNREACHABLE]
    )
    assert result.exit_code == 2
    assert "train.lr" in result.output


def test_config_outside_the_checkout_is_refused(tmp_path):
    outside = tmp_path / "exp.yaml"
    shutil.copy(PROJECT / TINY, outside)
    result = CliRunner().invoke(
        submit, ["train", "--config", str(outside), "--project-dir", str(PROJECT), *UNREACHABLE]
    )
    assert result.exit_code == 2
    assert "outside the project" in result.output


def test_evaluate_needs_only_the_settings_it_reads(monkeypatch, token_loader):
    # The paper configs' VGG weights and run storage placeholders do not matter to evaluation.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = str(PROJECT / "jobs" / "configs" / "dehaze-reside-its.yaml")
    refused = CliRunner().invoke(submit, ["evaluate", "--config", config, *UNREACHABLE])
    assert refused.exit_code == 2 and "data.uri" in refused.output
    assert "vgg_weights" not in refused.output
    passed = CliRunner().invoke(
        submit, ["evaluate", "--config", config, "--set", "data.uri=s3://lab/x", *UNREACHABLE]
    )
    assert passed.exit_code == 1 and "Ray job server http://127.0.0.1:9" in passed.output


def test_unreachable_job_server_is_a_clear_error(monkeypatch, token_loader):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    result = CliRunner().invoke(submit, ["train", "--config", str(PROJECT / TINY), *UNREACHABLE])
    assert result.exit_code == 1
    assert "http://127.0.0.1:9" in result.output


# --- a real local Ray head -----------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of this test's own, with token authentication on as Ray sets it by default.

    ``ray start --head`` turns token auth on when a token exists; the head gets its own HOME
    holding one, so the test does not depend on (or touch) the user's ~/.ray. A short
    /tmp path keeps Ray's unix sockets under the 107-character limit.
    """
    temp_dir = tempfile.mkdtemp(prefix="hdmray-", dir="/tmp")
    home = tmp_path_factory.mktemp("ray-home")
    (home / ".ray").mkdir()
    token = secrets.token_hex(16)
    (home / ".ray" / "auth_token").write_text(token)
    gcs, dashboard, client, agent = _free_ports(4)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["HOME"] = str(home)
    # The job's `python` must be this interpreter, with the project's dependencies.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", "--dashboard-host=127.0.0.1",
            "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],  # fmt: skip
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = start.communicate(timeout=90)
        assert start.returncode == 0, output
        yield {"address": f"http://127.0.0.1:{dashboard}", "home": home, "token": token}
    finally:
        stop_head(start.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the module: creating a SQLite store costs seconds each time."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client_env(ray_head, monkeypatch, tmp_path, token_loader, tracking_uri):
    """The submitting shell: the head's token in ~/.ray, no RAY_AUTH_MODE, a stale RAY_ADDRESS."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(ray_head["home"]))
    # --address must win over RAY_ADDRESS, which Ray's client would otherwise prefer.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    monkeypatch.setenv("HDM_HOME", str(tmp_path / "hdm-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tmp_path


def test_head_rejects_a_client_without_the_token(ray_head, client_env, monkeypatch):
    # A fresh process: an earlier ray.init() in this one switched it to token mode for good
    # (Ray sets RAY_AUTH_MODE=token in os.environ and caches it in its config).
    monkeypatch.delenv("RAY_ADDRESS")
    probe = (
        "from ray.exceptions import AuthenticationError\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "try:\n"
        f"    JobSubmissionClient({ray_head['address']!r}).list_jobs()\n"
        "except AuthenticationError:\n"
        "    raise SystemExit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from hdm_platform.data.synth import synthesize

    dest = tmp_path_factory.mktemp("synth") / "dehaze"
    synthesize(
        "builtin", str(dest), task="dehaze", count=12, size=(64, 64), val_fraction=0.34,
        workers=1, progress=False,
    )  # fmt: skip
    return dest


def test_failed_job_exits_non_zero_and_streams_its_error(ray_head, client_env, tiny_dataset):
    # Arguments after -- reach jobs/evaluate.py, which fails on the split the data lacks.
    result = CliRunner().invoke(
        submit,
        ["evaluate", "--config", TINY, "--address", ray_head["address"], "--follow",
         "--project-dir", str(PROJECT), "--set", f"data.uri={tiny_dataset}",
         "--", "--model", "dcp", "--split", "no-such-split"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "no split 'no-such-split'" in result.stdout  # the job's own error, streamed
    assert f"job {job_id} FAILED" in result.stderr


def test_tiny_training_job_runs_to_completion(ray_head, client_env, tiny_dataset):
    import mlflow

    result = CliRunner().invoke(
        submit,
        ["train", "--config", TINY, "--address", ray_head["address"], "--follow",
         "--project-dir", str(PROJECT), "--set", f"data.uri={tiny_dataset}",
         "--set", "train.epochs=1", "--set", "run.name=submitted",
         # One worker: this checks the submission path; Ray Train DDP has its own tests.
         "--set", "scaling.num_workers=1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = result.stdout.splitlines()[0]
    assert "run submitted: checkpoint" in result.stdout  # jobs/train.py's summary, streamed
    assert f"job {job_id} SUCCEEDED" in result.stderr

    # The job saw this shell's MLflow settings: the run and its registered model are here.
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("hdm-tiny").experiment_id],
        filter_string="attributes.run_name = 'submitted'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias("hdm-tiny-dehaze", "challenger").run_id == runs[0].info.run_id


def test_enhance_job_runs_hdm_enhance_on_the_cluster(ray_head, client_env, tmp_path):
    from PIL import Image

    source = tmp_path / "photos"
    (source / "day").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (24, 16), (40 * index, 90, 200)).save(source / "day" / f"{index}.jpg")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        submit,
        ["enhance", "--address", ray_head["address"], "--follow", "--project-dir", str(PROJECT),
         str(source), "-o", str(out), "--checkpoint", "dcp", "--format", "webp"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = result.stdout.splitlines()[0]
    assert "enhanced 3, skipped 0 (already written), failed 0" in result.stdout  # streamed from the job
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert sorted(path.name for path in (out / "day").iterdir()) == ["0.webp", "1.webp", "2.webp"]


def test_enhance_job_arguments_are_checked_before_submitting():
    result = CliRunner().invoke(
        submit, ["enhance", *UNREACHABLE, "s3://b/in/", "-o", "s3://b/out/", "--checkpoint", "dcp", "--tile", "30"]
    )
    assert result.exit_code == 2 and "multiple of 4" in result.output


def _load_job_script(name: str):
    spec = importlib.util.spec_from_file_location(f"hdm_job_{name}", PROJECT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_job_script_reads_the_experiment(tiny_dataset, tmp_path, monkeypatch, tracking_uri):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    script = _load_job_script("evaluate")
    config = script.load_config(PROJECT / TINY)
    assert script.default_model(config) == "models:/hdm-tiny-dehaze@challenger"

    out = tmp_path / "val.csv"
    result = CliRunner().invoke(
        script.main,
        ["--config", str(PROJECT / TINY), "--set", f"data.uri={tiny_dataset}",
         "--model", "dcp", "--split", "val", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"dcp on {tiny_dataset} [val]" in result.output
    rows = out.read_text().splitlines()
    assert rows[0].startswith("id,") and rows[-1].startswith("mean,") and len(rows) >= 3

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("hdm-tiny").experiment_id],
        filter_string="tags.`hdm.evaluation` = 'true'",
    )
    assert len(runs) == 1 and "val_psnr" in runs[0].data.metrics
