"""MLflow tracking and registry against a real ``mlflow server`` process on loopback."""

from __future__ import annotations

import time

import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException

from hdm_model import build_hdm, save_checkpoint, variant_config
from hdm_platform.cli.model import model as models_command
from hdm_platform.tracking.mlflow_run import TrackedRun, image_grid
from hdm_platform.tracking.registry import (
    MODEL_FILES,
    download_model_files,
    list_versions,
    load_registered,
    register_model,
    registry_client,
    set_alias,
)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_hdm(variant_config("HDM", channels=16, blocks_per_group=1, num_groups=1)).eval()


def test_a_ray_run_name_maps_to_one_mlflow_run(mlflow_server):
    common = dict(
        tracking_uri=mlflow_server, experiment="tracking-test", run_name="exp-a", storage_path="/runs"
    )
    first = TrackedRun.start_or_resume(**common, tags={"hdm.package_version": "1"})
    first.log_params({"train.lr": 2e-4, "train.epochs": 2, "model.variant": "HDM"})
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.finish(failed=True)

    resumed = TrackedRun.start_or_resume(**common)
    other = TrackedRun.start_or_resume(**{**common, "run_name": "exp-b"})
    resumed.log_params({"train.lr": 2e-4, "train.epochs": 4, "train.seed": 0})
    resumed.log_metrics({"train/loss": 0.25}, step=2)

    assert resumed.run_id == first.run_id
    assert other.run_id != first.run_id
    run = resumed.client.get_run(resumed.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {
        "train.lr": "0.0002", "train.epochs": "2", "model.variant": "HDM", "train.seed": "0"
    }  # fmt: skip
    assert run.data.tags["param_change.train.epochs"] == "4"
    history = resumed.client.get_metric_history(resumed.run_id, "train/loss")
    assert [(point.step, point.value) for point in history] == [(1, 0.5), (2, 0.25)]


def test_a_background_handle_logs_in_order_and_flush_waits_for_all_of_it(mlflow_server):
    run = TrackedRun.start_or_resume(
        tracking_uri=mlflow_server, experiment="background-test", run_name="bg", storage_path="/runs"
    )
    background = TrackedRun.for_run(mlflow_server, run.run_id, background=True)
    logged_after = time.time() * 1000
    for step in range(6):
        background.log_metrics({"train_loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        background.log_image_grid(image_grid(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)), name=f"val-step-{step:08d}")
    background.flush()

    history = sorted(run.client.get_metric_history(run.run_id, "train_loss"), key=lambda point: point.step)
    assert [(point.step, point.value) for point in history] == [(step, 1.0 / (step + 1)) for step in range(6)]
    # Timestamps are those of the calls, not of the background writes.
    assert all(logged_after - 1000 <= point.timestamp <= time.time() * 1000 for point in history)
    assert [point.timestamp for point in history] == sorted(point.timestamp for point in history)
    images = {info.path for info in run.client.list_artifacts(run.run_id, "images")}
    assert images == {f"images/val-step-{step:08d}.png" for step in range(6)}

    # A write that fails in the background fails the flush (or the next call).
    missing = TrackedRun.for_run(mlflow_server, "0" * 32, background=True)
    with pytest.raises(MlflowException):
        missing.log_metrics({"train_loss": 1.0}, step=0)
        missing.flush()


def test_registered_model_reloads_without_extra_files_and_aliases_move(mlflow_server, tmp_path, monkeypatch, capfd):
    client = registry_client(mlflow_server)
    versions = []
    models = []
    for seed in (1, 2):
        model = tiny_model(seed)
        run = TrackedRun.start_or_resume(
            tracking_uri=mlflow_server,
            experiment="registry-test",
            run_name=f"run-{seed}",
            storage_path="/runs",
        )
        source = run.log_model_folder(
            save_checkpoint(model, tmp_path / f"model-{seed}", metadata={"task": "dehaze"}), metrics={"val/psnr": 20.0 + seed}
        )
        version = register_model(
            client, name="hdm-dehaze", source=source, run_id=run.run_id, alias="challenger"
        )
        run.finish()
        versions.append(version)
        models.append(model)

    assert [v.version for v in list_versions(client, "hdm-dehaze")] == ["2", "1"]
    assert client.get_model_version_by_alias("hdm-dehaze", "challenger").version == "2"
    set_alias(client, name="hdm-dehaze", version=2, alias="champion")
    runner = CliRunner()
    promoted = runner.invoke(models_command, ["promote", "dehaze", "1", "--tracking-uri", mlflow_server])
    assert promoted.exit_code == 0, promoted.output
    assert "hdm-dehaze@champion -> version 1" in promoted.output
    assert client.get_model_version_by_alias("hdm-dehaze", "champion").version == "1"
    listed = runner.invoke(models_command, ["list", "dehaze", "--tracking-uri", mlflow_server])
    assert listed.output.splitlines()[0].startswith("hdm-dehaze v2  aliases=challenger")
    assert listed.output.splitlines()[1].startswith("hdm-dehaze v1  aliases=champion")
    missing = runner.invoke(models_command, ["promote", "dehaze", "9", "--tracking-uri", mlflow_server])
    assert missing.exit_code != 0 and "no version 9" in missing.output

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    capfd.readouterr()
    folder, version = download_model_files(
        "models:/hdm-dehaze@champion", tmp_path / "download", tracking_uri=mlflow_server
    )
    assert "Downloading artifacts" not in capfd.readouterr().err  # no progress bar per file
    assert version.version == "1"
    assert sorted(path.name for path in folder.iterdir()) == sorted(MODEL_FILES)

    image = torch.rand(1, 3, 20, 28)
    loaded = load_registered("models:/hdm-dehaze@champion", tracking_uri=mlflow_server)
    by_number = load_registered("models:/hdm-dehaze/2", tracking_uri=mlflow_server)
    with torch.inference_mode():
        assert torch.equal(loaded(image), models[0](image))
        assert torch.equal(by_number(image), models[1](image))

    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        load_registered("models:/hdm-dehaze", tracking_uri=mlflow_server)
    with pytest.raises(ValueError, match="hdm-dehaze@nobody"):
        load_registered("models:/hdm-dehaze@nobody", tracking_uri=mlflow_server)


def test_image_grid_has_one_row_per_image_and_three_columns():
    inputs, outputs, targets = (torch.rand(2, 3, 10, 12) for _ in range(3))
    grid = image_grid(inputs, outputs, targets)
    # make_grid pads 2 pixels around every tile.
    assert grid.size == (3 * 12 + 4 * 2, 2 * 10 + 3 * 2)
    assert grid.mode == "RGB"
