"""``hdm enhance`` on Ray Data (hdm_platform.batch_enhance): S3 in and out, bad inputs,
resuming, datasets, and equality with the local command.

One local Ray for the module (started after the moto endpoint, so its workers inherit the
AWS_* variables); the command reuses it. The models are randomly initialised one-block
HDMs: the tests check the mechanics and the pixels against the local loop, not quality.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import torch
from click.testing import CliRunner
from PIL import Image

from hdm_model import hdm, save_checkpoint
from hdm_platform.batch_enhance import (
    FAILURES_NAME,
    READ_BLOCK_BYTES,
    Failure,
    WorkItem,
    _blocks,
    plan_actor_pool,
    plan_files,
)
from hdm_platform.cli import main
from hdm_platform.cli.enhance import _model_references
from hdm_platform.imageio import read_image

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]


def test_a_read_or_write_worker_does_not_import_the_model_libraries():
    # Every Ray worker that runs a read or write task imports this module: torchvision (and
    # torch._dynamo through its ops) and MLflow load only in the model's actors.
    code = (
        "import io, sys, json, numpy as np\n"
        "from PIL import Image\n"
        "from hdm_platform.batch_enhance import encode_and_write, read_and_decode_files\n"
        "from hdm_platform.imageio import encode_image, read_image\n"
        "buffer = io.BytesIO()\n"
        "Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format='PNG')\n"
        "encode_image(read_image(buffer.getvalue()), 'png')\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(run.stdout))
    assert not loaded & {"torchvision", "mlflow", "torch._dynamo", "hdm_model.model"}


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str):
    context = ray.init(num_cpus=3, include_dashboard=False)
    yield context
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(
            save_checkpoint(hdm(blocks_per_group=1, num_groups=1, channels=8), folder / f"tiny-{seed}")
        )
    return models[0], models[1]


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(pixels: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, **save)
    return buffer.getvalue()


def mixed_inputs() -> dict[str, bytes]:
    """Relative key -> file bytes: every awkward kind, nested, and one truncated file."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 12x28, displayed 28x12
    deep = np.random.default_rng(3).integers(0, 65536, (21, 19), dtype=np.uint16)
    rgba = np.dstack([_rgb(16, 24, 4), np.full((16, 24), 128, dtype=np.uint8)])
    whole = _encoded(_rgb(20, 30, 6), format="PNG")
    return {
        "plain.png": _encoded(_rgb(20, 30, 0), format="PNG"),
        "a/b/photo.jpeg": _encoded(_rgb(18, 26, 1), format="JPEG", quality=90),
        "a/liar.jpg": _encoded(_rgb(17, 23, 2), format="BMP"),
        "a/deep.png": _encoded(deep, format="PNG"),
        "a/b/alpha.png": _encoded(rgba, format="PNG"),
        "rotated.jpg": _encoded(_rgb(12, 28, 5), format="JPEG", exif=exif),
        "big.png": _encoded(_rgb(40, 40, 7), format="PNG"),
        "a/truncated.png": whole[: len(whole) // 2],
        "notes.txt": b"not an image, not listed",
    }


DISPLAYED = {
    "plain.png": (20, 30), "a/b/photo.png": (18, 26), "a/liar.png": (17, 23), "a/deep.png": (21, 19),
    "a/b/alpha.png": (16, 24), "rotated.png": (28, 12),
}  # fmt: skip


def _local_enhance(sources: list[Path], out: Path, *arguments: str) -> None:
    result = CliRunner().invoke(
        main, ["enhance", *map(str, sources), "-o", str(out), "--device", "cpu", *arguments]
    )
    assert result.exit_code == 0, result.output


def test_s3_prefix_in_and_out_with_mixed_formats_equals_the_local_command(
    ray_cluster, s3_bucket, s3_endpoint, checkpoints, tmp_path
):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    local = tmp_path / "local-copy"
    for key, data in mixed_inputs().items():
        client.put_object(Bucket=bucket, Key=f"raw/{key}", Body=data)
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)

    arguments = ["--checkpoint", str(checkpoints[0]), "--max-pixels", "1000"]
    result = CliRunner().invoke(main, ["enhance", f"{s3_bucket}/raw/", "-o", f"{s3_bucket}/out", *arguments])
    assert result.exit_code == 1, result.output
    assert "enhanced 6, skipped 0 (already written), failed 2" in result.output
    assert f"{s3_bucket}/raw/a/truncated.png: cannot decode image" in result.output
    assert f"{s3_bucket}/raw/big.png: 40x40 = 1600 pixels exceeds the limit of 1000" in result.output

    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert keys == {f"out/{key}" for key in DISPLAYED} | {f"out/{FAILURES_NAME}"}
    failures = client.get_object(Bucket=bucket, Key=f"out/{FAILURES_NAME}")["Body"].read().decode()
    reasons = {row["source"]: row["reason"] for row in map(json.loads, failures.splitlines())}
    assert set(reasons) == {f"{s3_bucket}/raw/a/truncated.png", f"{s3_bucket}/raw/big.png"}

    # The local loop over the same files and model writes the same bytes.
    expected = tmp_path / "expected"
    for key in DISPLAYED:
        source = next(
            path for path in local.rglob("*") if path.relative_to(local).with_suffix(".png").as_posix() == key
        )
        _local_enhance([source], expected / Path(key).parent, "--checkpoint", str(checkpoints[0]))
    for key, (height, width) in DISPLAYED.items():
        produced = client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()
        assert read_image(produced).shape == (3, height, width), key
        assert produced == (expected / key).read_bytes(), key


def test_model_chain_tiles_and_jpeg_equal_the_local_command(ray_cluster, checkpoints, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for index, (height, width) in enumerate([(40, 52), (40, 52), (23, 37)]):
        Image.fromarray(_rgb(height, width, 10 + index)).save(source / f"{index}.png")
    arguments = [
        "--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]),
        "--tile", "16", "--tile-overlap", "4", "--format", "jpeg",
    ]  # fmt: skip
    result = CliRunner().invoke(
        main, ["enhance", str(source), "-o", str(tmp_path / "ray"), "--ray", *arguments]
    )
    assert result.exit_code == 0, result.output
    _local_enhance([source], tmp_path / "local", *arguments)
    for index in range(3):
        assert (tmp_path / "ray" / f"{index}.jpg").read_bytes() == (
            tmp_path / "local" / f"{index}.jpg"
        ).read_bytes()
    assert not (tmp_path / "ray" / FAILURES_NAME).exists()

    missing = CliRunner().invoke(
        main, ["enhance", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--ray", *arguments]
    )
    assert missing.exit_code == 1 and f"no such file or folder: {tmp_path / 'nope'}" in missing.output


def test_dataset_split_is_enhanced_by_row_id_and_a_rerun_skips_it(ray_cluster, tmp_path):
    from hdm_platform.data.ingest import IngestOptions, ingest

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.fromarray(_rgb(24, 32, 20 + index)).save(photos / f"p{index}.png")
    dataset = tmp_path / "dataset"
    ingest(str(photos), str(dataset), IngestOptions(layout="unpaired", task="dehaze", workers=1), progress=False)
    out = tmp_path / "out"
    command = ["enhance", str(dataset), "--split", "infer", "-o", str(out), "--checkpoint", "dcp"]

    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    assert "enhanced 3, skipped 0" in first.output
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    assert written == [f"unpaired/p{index}.png" for index in range(3)]
    assert read_image(out / "unpaired" / "p0.png").shape == (3, 24, 32)

    (out / "unpaired" / "p1.png").unlink()
    second = CliRunner().invoke(main, command)
    assert second.exit_code == 0, second.output
    assert "enhanced 1, skipped 2" in second.output
    assert (out / "unpaired" / "p1.png").is_file()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.glob("*.png")}


def _settled(folder: Path) -> dict[str, tuple[int, int]]:
    """The outputs once no write of a killed job's tasks (Ray ends them soon after their
    driver) has landed for 3 s."""
    snapshot, stable_since = _snapshot(folder), time.monotonic()
    while time.monotonic() - stable_since < 3:
        time.sleep(0.2)
        if (current := _snapshot(folder)) != snapshot:
            snapshot, stable_since = current, time.monotonic()
    return snapshot


def test_a_killed_run_resumes_without_redoing_finished_images(ray_cluster, checkpoints, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    count = 48
    for index in range(count):
        Image.fromarray(_rgb(96, 96, 100 + index)).save(source / f"{index:02d}.png")
    out = tmp_path / "out"
    command = [
        sys.executable, "-c", "from hdm_platform.cli import main; main()", "enhance", str(source), "-o", str(out),
        "--checkpoint", str(checkpoints[0]), "--actors", "1",
    ]  # fmt: skip
    # The driver attaches to this module's Ray, like a job on a cluster.
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    environment["PYTHONPATH"] = os.pathsep.join([str(PROJECT), str(PROJECT / "platform")])
    driver = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(_snapshot(out) if out.exists() else {}) < 4:
        assert driver.poll() is None and time.monotonic() < deadline, (
            "the first run ended before it was killed"
        )
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = _settled(out)
    assert 4 <= len(finished) < count

    rerun = ["enhance", str(source), "-o", str(out), "--checkpoint", str(checkpoints[0]), "--ray"]
    result = CliRunner().invoke(main, rerun)
    assert result.exit_code == 0, result.output
    assert f"enhanced {count - len(finished)}, skipped {len(finished)}" in result.output
    after = _snapshot(out)
    assert len(after) == count
    assert {name: after[name] for name in finished} == finished  # not one rewritten

    again = CliRunner().invoke(
        main, ["enhance", str(source), "-o", str(out), "--checkpoint", "dcp", "--overwrite", "--ray"]
    )
    assert again.exit_code == 0 and f"enhanced {count}, skipped 0" in again.output


def test_planning_pairs_inputs_with_outputs_and_refuses_collisions():
    listings = [
        ("s3://b/raw", [("s3://b/raw/a/x.jpg", "a/x.jpg", 5), ("s3://b/raw/a/x.png", "a/x.png", 6),
                        ("s3://b/raw/y.png", "y.png", 7), ("s3://b/raw/out/z.png", "out/z.png", 8)]),
        ("/data/same", [("/data/same/w.png", "w.png", 9)]),
    ]  # fmt: skip
    items, skipped, failures = plan_files(listings[:1], "s3://b/raw/out", ".png", existing={"y.png"})
    assert items == [WorkItem("s3://b/raw/a/x.jpg", "a/x.png", 5)]
    assert skipped == 1  # y.png is written; out/z.png is an output, not an input
    assert failures == [
        Failure(
            "s3://b/raw/a/x.png",
            "the output s3://b/raw/out/a/x.png is already written for s3://b/raw/a/x.jpg",
        )
    ]
    _, _, overwriting = plan_files(listings[1:], "/data/same", ".png", existing=set())
    assert overwriting == [
        Failure("/data/same/w.png", "the output /data/same/w.png would overwrite the input")
    ]

    # Read blocks: 8 small images, or fewer large ones (a block is also an actor's task).
    small = [WorkItem(f"s{index}", f"s{index}.png", 1000) for index in range(10)]
    large = [WorkItem(f"l{index}", f"l{index}.png", READ_BLOCK_BYTES // 2) for index in range(5)]
    assert [len(block) for block in _blocks(small + large)] == [8, 3, 2, 2]


def test_actor_pool_is_sized_from_the_cluster():
    def node(cpus: int, gpus: int = 0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    laptop = plan_actor_pool([node(3)])
    assert (laptop.actors, laptop.threads, laptop.num_cpus, laptop.num_gpus, laptop.batch_size) == (
        2,
        1,
        1,
        0,
        1,
    )
    big = plan_actor_pool([node(16), node(16), node(64, alive=False)])
    assert (big.actors, big.threads) == (30, 1)  # 15 actors per node, 1 CPU left for tasks
    wide = plan_actor_pool([node(16), node(16)], threads_per_actor=4)
    assert (wide.actors, wide.threads, wide.num_cpus) == (6, 4, 4)  # 3 per node
    gpus = plan_actor_pool([node(8), node(32, gpus=4), node(32, gpus=4)])
    assert (gpus.actors, gpus.num_gpus, gpus.batch_size) == (8, 1, 8)
    assert plan_actor_pool([node(32, gpus=4)], device="cpu").num_gpus == 0
    assert plan_actor_pool([node(16)], actors=2, threads_per_actor=8).actors == 2
    with pytest.raises(ValueError, match="no GPUs"):
        plan_actor_pool([node(4)], device="cuda")


def test_tasks_name_their_models_in_order():
    assert _model_references(("ckpt/",), None) == ["ckpt/"]
    assert _model_references(("dehaze=ckpt/",), "derain,dehaze") == ["models:/hdm-derain@champion", "ckpt/"]
    runner = CliRunner()
    unknown = runner.invoke(main, ["enhance", "x.png", "-o", "o", "--tasks", "derain,deblur"])
    assert unknown.exit_code == 2 and "unknown task(s) deblur" in unknown.output
    unpaired = runner.invoke(
        main, ["enhance", "x.png", "-o", "o", "--tasks", "derain", "--checkpoint", "ckpt/"]
    )
    assert unpaired.exit_code == 2 and "TASK=REF" in unpaired.output
