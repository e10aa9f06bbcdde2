"""Distributed training end to end: 2 DDP workers on CPU, shards and checkpoints in S3 (moto on
loopback), tracked and registered by an ``mlflow server`` process on loopback.

Two fits share one run name: the first stops early (``max_steps``), the second resumes it by
name, loses worker 1 to a crash mid-epoch, is restarted by Ray Train from the latest
checkpoint, finishes, and registers the EMA model, which reloads from the registry.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from pathlib import Path

import boto3
import fsspec
import pytest
import ray
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import save_file
from torchvision.models.vgg import cfgs, make_layers

from hdm_model import load_checkpoint
from hdm_platform.cli.train import train as train_command
from hdm_platform.config import ConfigError, validate_config
from hdm_platform.data.synth import synthesize
from hdm_platform.evaluate import evaluate
from hdm_platform.tracking.registry import load_registered
from hdm_platform.train.driver import fit, preflight
from hdm_platform.train.loop import FaultInjection

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

REGISTERED = "hdm-train-test"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    name = f"hdm-train-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def dataset(bucket):
    # 40x40 pairs cropped at 40 without augmentation: every epoch sees the same pixels.
    result = synthesize(
        "builtin", f"{bucket}/ds", task="dehaze", count=20, size=(40, 40), val_fraction=0.2,
        workers=1, progress=False,
    )  # fmt: skip
    assert result.manifest.splits["val"].rows >= 2
    return f"{bucket}/ds"


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    # After s3_endpoint: the Ray workers inherit its AWS_* variables.
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def experiment(dataset_uri: str, storage: str, tracking_uri: str, **train: object) -> dict:
    return {
        "name": "ddp-test",
        "task": "dehaze",
        "model": {"variant": "HDM", "channels": 16, "num_groups": 1, "blocks_per_group": 1},
        "data": {"uri": dataset_uri, "crop_size": 40, "augment": False, "shuffle_buffer_size": 0},
        "loss": {"perceptual_weight": 0},
        "train": {
            "epochs": 2, "batch_size": 4, "lr": 2e-3, "ema_decay": 0.5, "grad_clip_norm": 1.0,
            "log_every_steps": 1, "logged_val_images": 2, "keep_checkpoints": 1, **train,
        },
        "scaling": {"num_workers": 2},
        "run": {"storage_path": storage, "max_failures": 1},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "train-test", "registered_model": REGISTERED},
    }  # fmt: skip


def last_value_per_step(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    # A restarted worker group re-logs the steps after its checkpoint; the later value wins.
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {point.step: point.value for point in history}


def test_stop_resume_crash_restart_register_reload(
    local_ray, dataset, bucket, s3_endpoint, mlflow_server, tmp_path
):
    storage = f"{bucket}/runs"
    raw = experiment(dataset, storage, mlflow_server)
    steps_per_epoch = preflight(validate_config(raw))
    local_checkpoints = set(Path(tempfile.gettempdir()).glob("hdm-checkpoint-*"))
    assert steps_per_epoch >= 3

    # The first fit also exercises bfloat16 autocast (with the deformable conv kept in fp32).
    stopped_early = experiment(
        dataset, storage, mlflow_server, max_steps=steps_per_epoch - 1, precision="bf16"
    )
    first = fit(validate_config(stopped_early))
    # The second validates at each epoch end and once mid-epoch (val_every_steps), then
    # loses worker 1 right after the step following that mid-epoch checkpoint.
    marker = tmp_path / "crashed"
    second = fit(
        validate_config(experiment(dataset, storage, mlflow_server, val_every_steps=steps_per_epoch + 1)),
        fault_injection=FaultInjection(rank=1, step=steps_per_epoch + 2, marker=str(marker)),
    )

    # One MLflow run across the stop, the resume and the worker restart.
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("train-test").experiment_id])
    assert [run.info.run_id for run in runs] == [first.mlflow_run_id] == [second.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    run_id = first.mlflow_run_id
    assert marker.exists(), "the fault injection did not fire"

    # Resumed at the step the first fit stopped at, restarted from the mid-epoch checkpoint.
    resumed = last_value_per_step(client, run_id, "resumed_from_step")
    assert resumed == {steps_per_epoch - 1: steps_per_epoch - 1, steps_per_epoch + 1: steps_per_epoch + 1}
    assert first.metrics["step"] == steps_per_epoch - 1
    assert second.metrics["step"] == 2 * steps_per_epoch

    # The cosine runs over the planned 2 epochs; stopping early did not shorten it.
    lr = last_value_per_step(client, run_id, "lr")
    total = 2 * steps_per_epoch
    for step in (1, steps_per_epoch - 1, steps_per_epoch + 1, total):
        assert lr[step] == pytest.approx(2e-3 * (1 + math.cos(math.pi * step / total)) / 2, abs=1e-9)

    # Every step was logged once the restarts are accounted for.
    assert sorted(last_value_per_step(client, run_id, "train_loss")) == list(range(1, total + 1))

    # The loss falls on the fixed validation images (full size, same every time), and PSNR
    # rises; training batches differ too much in haze to compare from step to step.
    val_psnr = last_value_per_step(client, run_id, "val_psnr")
    val_l1 = last_value_per_step(client, run_id, "val_l1")
    assert set(val_psnr) == {steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 1, total}
    assert val_l1[total] < val_l1[steps_per_epoch - 1]
    assert val_psnr[total] > val_psnr[steps_per_epoch - 1]
    # Where each epoch's time went besides its steps, logged with each validation.
    for key in ("validation_seconds", "checkpoint_seconds"):
        seconds = last_value_per_step(client, run_id, key)
        assert set(seconds) == set(val_psnr) and all(value > 0 for value in seconds.values()), key
    first_batch = last_value_per_step(client, run_id, "first_batch_seconds")
    assert {steps_per_epoch, total} <= set(first_batch) and all(value > 0 for value in first_batch.values())
    images = {info.path for info in client.list_artifacts(run_id, "images")}
    assert f"images/val-step-{total:08d}.png" in images

    # Checkpoints in S3: the best one by val PSNR and the latest are kept (keep_checkpoints=1).
    s3 = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    run_folder = s3.ls(f"{storage.removeprefix('s3://')}/ddp-test")
    kept = sorted(Path(path).name for path in run_folder if "checkpoint-step" in path)
    assert f"checkpoint-step-{total:08d}" in kept and 1 <= len(kept) <= 2
    assert second.checkpoint_path.endswith(f"checkpoint-step-{total:08d}")
    # The workers' local checkpoint folders went once uploaded (in the background).
    assert set(Path(tempfile.gettempdir()).glob("hdm-checkpoint-*")) == local_checkpoints

    # Each fit registered its final model; the alias follows the newest.
    assert (first.registered_version, second.registered_version) == ("1", "2")
    assert client.get_model_version_by_alias(REGISTERED, "challenger").version == "2"

    # The registered model is the checkpoint's exported (EMA) model, bit for bit.
    local = tmp_path / "checkpoint"
    s3.get(f"{second.checkpoint_path.removeprefix('s3://')}/model", str(local), recursive=True)
    from_checkpoint = load_checkpoint(local)
    from_registry = load_registered(f"models:/{REGISTERED}@challenger", tracking_uri=mlflow_server)
    image = torch.rand(1, 3, 36, 44)
    with torch.inference_mode():
        assert torch.equal(from_registry(image), from_checkpoint(image))
    assert from_checkpoint.config.channels == 16

    # The last validation measured each val image once, as evaluating the final model on the
    # val split does (both at precision "auto": bf16 rounding apart where "auto" is bf16).
    evaluated = evaluate(str(local), dataset, split="val")
    assert val_psnr[total] == pytest.approx(evaluated.means["psnr"], abs=0.05)
    assert last_value_per_step(client, run_id, "val_images")[total] == len(evaluated.rows)


def test_bad_config_is_rejected_before_ray_starts(tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    config = tmp_path / "exp.yaml"
    config.write_text("name: bad\ntask: dehaze\ndata: {uri: /nonexistent}\n")
    runner = CliRunner()
    result = runner.invoke(train_command, ["--config", str(config), "--set", "train.lr=-1"])
    assert result.exit_code != 0
    assert "train.lr" in result.output
    result = runner.invoke(train_command, ["--config", str(config), "--set", "train.betas=[1]"])
    assert result.exit_code != 0 and "train.betas" in result.output
    # The default recipe has a perceptual term, so VGG weights are required.
    result = runner.invoke(train_command, ["--config", str(config)])
    assert result.exit_code != 0 and "loss.vgg_weights" in result.output
    result = runner.invoke(train_command, ["--config", str(config), "--set", "loss.perceptual_weight=0"])
    assert result.exit_code != 0 and "data.uri" in result.output


def test_preflight_names_the_field(tmp_path):
    synthesize("builtin", str(tmp_path / "ds"), task="dehaze", count=6, size=(16, 16),
               val_fraction=0.3, workers=1, progress=False)  # fmt: skip
    base = {"name": "p", "task": "dehaze", "data": {"uri": str(tmp_path / "ds"), "crop_size": 16},
            "loss": {"perceptual_weight": 0}, "scaling": {"num_workers": 2}}  # fmt: skip

    def check(**sections: dict) -> int:
        raw = {**base, **{key: {**base.get(key, {}), **value} for key, value in sections.items()}}
        return preflight(validate_config(raw))

    with pytest.raises(ConfigError, match="train.batch_size .* multiple of scaling.num_workers"):
        check(train={"batch_size": 3})
    with pytest.raises(ConfigError, match="train.batch_size: .* do not fill one batch"):
        check(train={"batch_size": 16})
    with pytest.raises(ConfigError, match="data.val_split"):
        check(train={"batch_size": 2}, data={"val_split": "test"})
    with pytest.raises(ConfigError, match=r"^data.uri: no dataset at \S+/none: manifest.json missing$"):
        check(train={"batch_size": 2}, data={"uri": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="loss.vgg_weights"):
        missing = str(tmp_path / "no.pth")
        check(train={"batch_size": 2}, loss={"perceptual_weight": 0.1, "vgg_weights": missing})
    # A random VGG16 saved to tmp stands in for the ImageNet weights.
    features = make_layers(cfgs["D"])[:16]
    vgg = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(vgg))
    assert check(train={"batch_size": 2}, loss={"perceptual_weight": 0.1, "vgg_weights": str(vgg)}) >= 1
