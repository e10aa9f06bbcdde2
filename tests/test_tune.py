"""A sweep end to end on CPU: Ray Tune trials that are each a Ray Train run, tracked by an
``mlflow server`` on loopback.

One 4-trial grid (learning rate x L1 weight) on a tiny model: ``hdm tune`` runs in its own
process and is killed once two trials have finished; ``hdm tune --resume`` finishes the
sweep without re-running them. The good learning rate trains to the end, the tiny one is
stopped by ASHA after one validation, and the two trials with no loss term fail in every
attempt, are retried once and reported failed while the sweep goes on. The best trial's
config is written as an experiment YAML and its model registered as the challenger.
"""

from __future__ import annotations

import csv
import glob
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from hdm_platform.cli.tune import tune as tune_command
from hdm_platform.config import load_config
from hdm_platform.data.synth import synthesize
from hdm_platform.tracking.registry import load_registered

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

REGISTERED = "hdm-tune-test"
GOOD_LR, TINY_LR = 3e-3, 1e-6
MAX_T = 3  # validations (= epochs) a trial may run
SWEEP = "tiny-sweep"
_WAIT_FOR_TRIALS_S = 480


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with a dashboard, whose State API Train's placement-group cleaner asks.

    Tune ends a trial that ASHA stops, or that fails, by killing its actor and with it the
    Train controller, before Train has released its worker group; the cleaner then frees the
    group's resources, which the next trials need. Other Ray instances may run on this
    machine, so the cleaner is told this one's address. Yields the environment every
    driver's job carries.
    """
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env_vars = {"RAY_ADDRESS": address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_GCS_SERVER_PORT", str(port))
        ray.init(num_cpus=4, include_dashboard=True, runtime_env={"env_vars": env_vars})
    yield env_vars
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tune-data")
    synthesize("builtin", str(root / "ds"), task="dehaze", count=16, size=(32, 32), val_fraction=0.25,
               workers=1, progress=False)  # fmt: skip
    return str(root / "ds")


def write_inputs(tmp_path: Path, dataset: str, tracking_uri: str) -> tuple[Path, Path]:
    experiment = {
        "name": "tiny-tune",
        "task": "dehaze",
        "model": {"variant": "HDM", "channels": 8, "num_groups": 1, "blocks_per_group": 1,
                  "num_regions": 3, "dcp_patch_size": 3, "dcp_guided_radius": 2},
        "data": {"uri": dataset, "crop_size": 32, "val_crop_size": 32, "augment": False,
                 "shuffle_buffer_size": 0},
        "loss": {"perceptual_weight": 0.0},
        "train": {"epochs": MAX_T, "batch_size": 2, "lr": 2e-4, "ema_decay": None, "precision": "fp32",
                  "log_every_steps": 10, "logged_val_images": 0, "keep_checkpoints": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "tune-test", "registered_model": REGISTERED},
    }  # fmt: skip
    space = {
        # One trial at a time, so ASHA sees the good learning rate before the tiny one.
        "searcher": "grid",
        "max_concurrent_trials": 1,
        "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": MAX_T},
        # Tune walks the grid with the alphabetically first key fastest: trial 0 is the good
        # learning rate, trial 2 the tiny one. With no L1 and no perceptual term the loss
        # refuses to build, so trials 1 and 3 fail when training starts.
        "params": {"train.lr": [GOOD_LR, TINY_LR], "loss.l1_weight": [1.0, 0.0]},
    }
    config_path, space_path = tmp_path / "experiment.yaml", tmp_path / "space.yaml"
    config_path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    return config_path, space_path


def trial_states(experiment_dir: Path) -> dict[str, str]:
    """Trial id -> Tune status, from the newest experiment state Tune has saved.

    Newest by name, as Tune's restore picks it: each driver session writes its own file,
    named by its start time, and a resumed driver re-uploads the earlier sessions' files with
    its own at every save, so their modification times do not order them.
    """
    files = glob.glob(str(experiment_dir / "experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(Path(max(files)).read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    trials = [json.loads(trial) for trial, _ in state["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


def progress_rows(experiment_dir: Path, trial_id: str) -> int:
    (progress,) = experiment_dir.glob(f"run_trial_{trial_id}_*/progress.csv")
    with progress.open() as handle:
        return len(list(csv.DictReader(handle)))


def test_interrupted_sweep_resumes_and_reports(ray_cluster, dataset, mlflow_server, tmp_path):
    config_path, space_path = write_inputs(tmp_path, dataset, mlflow_server)
    out_dir = tmp_path / "out"
    arguments = ["--config", str(config_path), "--space", str(space_path), "--name", SWEEP, "--out", str(out_dir)]
    experiment_dir = tmp_path / "runs" / SWEEP

    # The first driver is its own process on the same cluster (so that it can crash); its
    # job carries the cluster's address for Train's cleaner like the test's own job does.
    driver_code = (
        "import sys, ray; from hdm_platform.cli import main; "
        f"ray.init(address={ray_cluster['RAY_ADDRESS']!r}, runtime_env={{'env_vars': {ray_cluster!r}}}); "
        "main(['tune', *sys.argv[1:]])"
    )
    log_path = tmp_path / "first-driver.log"
    with log_path.open("wb") as log:
        first = subprocess.Popen([sys.executable, "-c", driver_code, *arguments], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _WAIT_FOR_TRIALS_S
        try:
            while sum(status == "TERMINATED" for status in trial_states(experiment_dir).values()) < 2:
                assert first.poll() is None, f"the first driver exited: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no two finished trials: {log_path.read_text()[-3000:]}"
                time.sleep(2)
        finally:
            first.kill()  # the driver crashes: no cleanup, no final experiment state
            first.wait()
    before = trial_states(experiment_dir)
    finished = sorted(trial for trial, status in before.items() if status == "TERMINATED")
    rows_before = {trial: progress_rows(experiment_dir, trial) for trial in finished}
    assert not (out_dir / "results.csv").exists()

    started = time.monotonic()
    result = CliRunner().invoke(tune_command, [*arguments, "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    print(f"resumed sweep took {time.monotonic() - started:.0f} s")

    # Finished trials were neither re-run nor duplicated; the same 4 trials exist.
    after = trial_states(experiment_dir)
    assert len(after) == 4 and set(before) <= set(after)
    assert {trial: progress_rows(experiment_dir, trial) for trial in finished} == rows_before

    # The results table: by trial id (grid order), with lr, L1 weight and outcomes.
    with (out_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["trial"] for row in rows] == sorted(after)
    by_params = {(float(row["train.lr"]), float(row["loss.l1_weight"])): row for row in rows}
    good, tiny = by_params[(GOOD_LR, 1.0)], by_params[(TINY_LR, 1.0)]
    assert good["status"] == "finished" and int(good["validations"]) == MAX_T == int(good["epochs_run"])
    # ASHA stopped the tiny learning rate at its first rung.
    assert tiny["status"] == "stopped early" and int(tiny["validations"]) < MAX_T
    assert float(good["best_val_psnr"]) > float(tiny["best_val_psnr"])
    for lr in (GOOD_LR, TINY_LR):
        failed = by_params[(lr, 0.0)]
        assert failed["status"] == "failed" and failed["validations"] == "0"
        assert "l1_weight and perceptual_weight are both 0" in failed["error"]
        # Tune retried the trial once before reporting it failed.
        (error_file,) = experiment_dir.glob(f"run_trial_{failed['trial']}_*/error.txt")
        assert "Failure # 2" in error_file.read_text()
    assert "stopped early" in result.output and f"challenger:         {REGISTERED} v1" in result.output
    # One display: the sweep's lines (captured output: one per trial event), not Tune's
    # status box; the resumed driver shows them too (Tune restores the callback).
    first_output, resumed_output = log_path.read_text(), result.output
    assert "started (train.lr=" in first_output and "val_psnr" in first_output
    assert "Trial status:" not in first_output
    assert re.search(r"^\[\d+:\d\d\] trial \S+ ", resumed_output, flags=re.MULTILINE)
    both = first_output + resumed_output
    assert "ended | " in both and "failed (its error is in the table at the end)" in both

    # The best trial's config is a valid, ready-to-run experiment.
    best = load_config(out_dir / "best-config.yaml")
    assert best.name == f"{SWEEP}-best" and best.run.name is None
    assert (best.train.lr, best.loss.l1_weight) == (GOOD_LR, 1.0)
    assert best.model.num_regions == 3 and best.data.uri == dataset
    assert (out_dir / "val_psnr.png").read_bytes().startswith(b"\x89PNG")

    # MLflow: one parent run for the sweep (reopened by the resume), a child per trial.
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name("tune-test").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.run_name == SWEEP and parent.info.status == "FINISHED"
    assert parent.data.params["space.params.train.lr"] == json.dumps([GOOD_LR, TINY_LR])
    assert parent.data.tags["hdm.best_trial"] == good["trial"]
    artifacts = {Path(info.path).name for info in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"results.csv", "results.txt", "val_psnr.png", "best-config.yaml"} <= artifacts
    children = {
        run.data.tags["hdm.trial_id"]: run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(after)
    assert children[good["trial"]].info.status == "FINISHED"
    assert children[good["trial"]].data.params["train.lr"] == json.dumps(GOOD_LR)
    assert children[good["trial"]].data.metrics["best_val_psnr"] == pytest.approx(float(good["best_val_psnr"]))
    assert children[tiny["trial"]].data.tags["hdm.trial_status"] == "stopped early"
    assert {children[by_params[(lr, 0.0)]["trial"]].info.status for lr in (GOOD_LR, TINY_LR)} == {"FAILED"}
    val_psnr = client.get_metric_history(children[good["trial"]].info.run_id, "val_psnr")
    assert len({point.step for point in val_psnr}) == MAX_T  # logged by the trial's rank 0

    # The best trial's best checkpoint is the challenger, and it loads.
    challenger = client.get_model_version_by_alias(REGISTERED, "challenger")
    assert challenger.run_id == children[good["trial"]].info.run_id
    model = load_registered(f"models:/{REGISTERED}@challenger", tracking_uri=mlflow_server)
    assert model.config.num_regions == 3 and model.config.channels == 8
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)

    # A sweep is not started twice by accident, nor resumed with another base config.
    again = CliRunner().invoke(tune_command, arguments)
    assert again.exit_code != 0 and "already exists" in again.output and "--resume" in again.output
    changed = CliRunner().invoke(tune_command, [*arguments, "--resume", "--set", "train.lr=1e-3"])
    assert changed.exit_code != 0
    assert f"sweep {SWEEP} started with train.lr = 0.0002, not 0.001" in changed.output
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # Stopped and failed trials left no resources behind for the next sweep to wait for. A
    # leak holds them for good; Ray's own removal of the last placement groups took over 60 s
    # once on a loaded 2-core CI machine, hence the wide deadline.
    deadline = time.monotonic() + 180
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        alive = [
            (group["name"], group["state"])
            for group in ray.util.placement_group_table().values()
            if group["state"] != "REMOVED"
        ]
        assert time.monotonic() < deadline, f"resources still held: {ray.available_resources()}, {alive}"
        time.sleep(1)
