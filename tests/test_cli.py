"""The ``hdm`` command line as a whole: light imports, one-line failures, completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
from click.testing import CliRunner

from hdm_platform.cli import main
from hdm_platform.cli.data import ByteSize
from hdm_platform.data.shard_writer import DEFAULT_SHARD_SIZE

_HEAVY = ("torch", "ray", "mlflow", "pyarrow", "torchvision", "fastapi")


def test_importing_the_command_line_imports_no_heavy_library():
    # What makes `hdm --help` answer at once: every command imports its libraries when it runs.
    code = "import sys, json, hdm_platform.cli; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert not loaded & set(_HEAVY), sorted(loaded & set(_HEAVY))


def test_every_command_group_answers_help():
    runner = CliRunner()
    for command in ([], ["data"], ["model"], ["serve"], ["local"], ["train"], ["tune"], ["enhance"], ["submit"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage: " in result.output


def test_an_unexpected_failure_is_one_line_naming_the_uri_and_v_shows_the_traceback(tmp_path):
    # An S3 endpoint nobody listens on: botocore's error, not a traceback.
    environment = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_MAX_ATTEMPTS": "1"}
    arguments = ["data", "inspect", "s3://no-bucket/data", "--endpoint-url", "http://127.0.0.1:9"]
    quiet = subprocess.run([sys.executable, "-m", "hdm_platform.cli", *arguments], capture_output=True, text=True, env=environment, timeout=120)
    assert quiet.returncode == 1
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-bucket/data" in lines[0] and "-v shows the traceback" in lines[0], quiet.stderr
    verbose = subprocess.run([sys.executable, "-m", "hdm_platform.cli", "-v", *arguments], capture_output=True, text=True, env=environment, timeout=120)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


def test_an_mlflow_server_that_is_down_is_named_at_once(tmp_path):
    # Nobody listens on port 9: MLflow's client alone would retry with back-off for minutes.
    environment = {**os.environ, "HDM_HOME": str(tmp_path)}
    for arguments in (["model", "list", "dehaze"], ["model", "promote", "dehaze", "3"]):
        result = subprocess.run(
            [sys.executable, "-m", "hdm_platform.cli", *arguments, "--tracking-uri", "http://127.0.0.1:9"],
            capture_output=True, text=True, env=environment, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "MLflow tracking server http://127.0.0.1:9 is not reachable" in lines[0], result.stderr


def test_serve_reload_names_a_ray_address_nobody_answers_on():
    result = CliRunner().invoke(main, ["serve", "reload", "dehaze", "--address", "127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in result.output.strip().splitlines()[-1]
    malformed = CliRunner().invoke(main, ["serve", "reload", "dehaze", "--address", "no-port"])
    assert malformed.exit_code == 2 and "'no-port' is not HOST:PORT" in malformed.output


def test_bash_completion_script_is_generated():
    completion = subprocess.run(
        [sys.executable, "-m", "hdm_platform.cli"], capture_output=True, text=True,
        env={**os.environ, "_HDM_COMPLETE": "bash_source"}, timeout=60,
    )  # fmt: skip
    assert completion.returncode == 0 and "_hdm_completion" in completion.stdout


def test_the_shard_size_flag_default_is_the_writers_default():
    assert ByteSize().convert("256MiB", None, None) == DEFAULT_SHARD_SIZE


@pytest.mark.slow
def test_hdm_train_prints_one_progress_line_per_epoch_and_no_ray_internals(tmp_path):
    from hdm_platform.data.synth import synthesize

    synthesize("builtin", str(tmp_path / "ds"), task="dehaze", count=24, size=(64, 64), val_fraction=0.25,
               workers=1, progress=False)  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment["HDM_HOME"] = str(tmp_path / "home")
    run = subprocess.run(
        [sys.executable, "-m", "hdm_platform.cli", "train", "--config", str(Path(__file__).parents[1] / "jobs/configs/tiny-cpu.yaml"),
         "--set", f"data.uri={tmp_path / 'ds'}", "--set", "train.epochs=2"],
        capture_output=True, text=True, env=environment, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("logs: ") and Path(lines[0].split()[1]).is_file()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1.0/2 step 4/8", "epoch 2.0/2 step 8/8"]
    for noise in ("RayTrainWorker", "TrainController", "TrainingReport", "pid=", "Execution plan of Dataset", "Progress bars disabled"):
        assert noise not in run.stdout and noise not in run.stderr, noise
    assert "Execution plan of Dataset" in Path(lines[0].split()[1]).read_text()  # Ray Data's INFO: in the log file
    assert "registered version:" in run.stdout
