"""Importing the authors' published weights: the file, the key map, the numbers, the CLI.

The real ``hdm_haze_sots.pk`` is not reachable here. ``published_reference`` builds a file
with its key names and shapes (``shared/design/hdm-published-checkpoint.md``) and random
weights, and runs the published network in plain functional torch from those names; the
converted checkpoint must give the same outputs, then through ``hdm enhance`` and
``hdm evaluate`` (``tests/test_serve.py`` serves it).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hdm_platform.cli import main
from hdm_platform.data.ingest import IngestOptions, ingest
from hdm_platform.imageio import read_image
from hdm_platform.tracking.registry import load_registered
from mlflow import MlflowClient
from PIL import Image
from published_reference import (
    deform_conv_reference,
    published_shapes,
    random_published_state,
    reference_forward,
    save_published_file,
)
from realworld import REALWORLD
from torchvision.ops import deform_conv2d

from hdm_model import dcp_region_masks, load_checkpoint, prepare_for_inference
from hdm_model.metrics import image_metrics
from hdm_model.published import (
    PublishedCheckpointError,
    convert_published_state,
    published_key_map,
    read_published_state,
)

PUBLISHED_TENSORS, PUBLISHED_VALUES = 368, 2_946_684
CONVERTED_TENSORS, CONVERTED_VALUES = 360, 2_819_292
UNUSED = {
    "drconv.conv_kernel.1.weight", "drconv.conv_kernel.1.bias", "drconv.conv_kernel.3.weight",
    "drconv.conv_kernel.3.bias", "drconv.conv_guide.weight", "drconv.conv_guide.bias",
    "mix3.w", "mix4.w",
}  # fmt: skip
SOTS = REALWORLD / "dehaze" / "SOTS-indoor"
SCENE = "1400"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def random_masks(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    index = torch.randint(0, 5, (batch, height, width), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(index, 5).permute(0, 3, 1, 2).unsqueeze(2).float()


@pytest.fixture(scope="module")
def published_state():
    return random_published_state(seed=0)


@pytest.fixture(scope="module")
def published_file(published_state, tmp_path_factory) -> Path:
    return save_published_file(tmp_path_factory.mktemp("published") / "hdm_haze_sots.pk", published_state)


@pytest.fixture(scope="module")
def converted(published_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted") / "hdm-published"
    output = invoke("model", "import-published", str(published_file), "-o", str(folder))
    assert f"converted {CONVERTED_TENSORS} tensors ({CONVERTED_VALUES:,} parameters)" in output
    assert "dropped 8 tensors (127,392 values) that DR_Net_phy.forward never uses" in output
    return folder


# --- the file and the key map -----------------------------------------------------------


def test_the_fake_file_has_the_published_keys_and_counts(published_state):
    assert len(published_state) == PUBLISHED_TENSORS
    assert sum(tensor.numel() for tensor in published_state.values()) == PUBLISHED_VALUES
    assert all(key.startswith("module.") for key in published_state)


def test_the_key_map_covers_every_used_key_once():
    mapping = published_key_map()
    assert set(mapping) == set(published_shapes()) - UNUSED
    assert len(set(mapping.values())) == len(mapping) == CONVERTED_TENSORS


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["DataParallel", "plain"])
def test_reading_takes_both_formats_with_or_without_module(published_state, tmp_path, legacy, prefixed):
    state = published_state if prefixed else {k.removeprefix("module."): v for k, v in published_state.items()}
    state = read_published_state(save_published_file(tmp_path / "weights.pk", state, legacy=legacy))
    assert set(state) == set(published_shapes())
    conversion = convert_published_state(state)
    assert (conversion.used_tensors, conversion.used_values) == (CONVERTED_TENSORS, CONVERTED_VALUES)
    assert set(conversion.dropped) == UNUSED and conversion.dropped_values == 127_390 + 2
    assert torch.equal(
        conversion.model.decoder.mix_quarter.weight, published_state["module.mix1.w"]
    )


def test_a_file_needing_pickled_code_is_refused_and_nothing_runs(published_state, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "hostile.pk"
    torch.save({"model": dict(published_state), "extra": Payload()}, path)
    with pytest.raises(PublishedCheckpointError, match="needs pickled code to load") as caught:
        read_published_state(path)
    assert "never loaded with weights_only=False" in str(caught.value)
    assert "Unsupported global: GLOBAL getattr" in str(caught.value)  # what it would have run
    assert not marker.exists()
    result = CliRunner().invoke(main, ["model", "import-published", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "needs pickled code to load" in result.output
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_unknown_missing_and_misshapen_keys_are_all_named(published_state, tmp_path):
    state = {k.removeprefix("module."): v for k, v in published_state.items()}
    state["FAB.0.gp.10.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # a tenth block: not K=9
    del state["output.2.bias"]
    state["conv0.0.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(PublishedCheckpointError) as caught:
        convert_published_state(state, source="weights.pk")
    message = str(caught.value)
    assert "unknown keys: FAB.0.gp.10.conv1.weight" in message
    assert "missing keys: output.2.bias" in message
    assert "conv0.0.weight has shape [32, 3, 5, 5], expected [64, 3, 5, 5]" in message


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pk")
    with pytest.raises(PublishedCheckpointError, match="not a state dict"):
        read_published_state(tmp_path / "list.pk")
    (tmp_path / "text.pk").write_text("not a torch file")
    with pytest.raises(PublishedCheckpointError, match="not a readable torch file"):
        read_published_state(tmp_path / "text.pk")


# --- the deformable convolution's layout -------------------------------------------------


def _shift_case(tap: int, shift: tuple[int, int], seed: int = 0):
    """Features, and offsets/mask/weight under which only ``tap`` is weighted and it reads
    pixel (y + sy, x + sx): every other tap gets a large offset it must not use."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(1, 4, 9, 11, generator=generator)
    offset = torch.randn(1, 18, 9, 11, generator=generator) * 5
    i, j = divmod(tap, 3)
    offset[:, 2 * tap] = 1 - i + shift[0]
    offset[:, 2 * tap + 1] = 1 - j + shift[1]
    weight = torch.zeros(4, 4, 3, 3)
    weight[:, :, i, j] = torch.eye(4)
    expected = torch.zeros_like(features)
    sy, sx = shift
    height, width = features.shape[-2:]
    expected[..., max(0, -sy) : height - max(0, sy), max(0, -sx) : width - max(0, sx)] = features[
        ..., max(0, sy) : height + min(0, sy), max(0, sx) : width + min(0, sx)
    ]
    return features, offset, torch.ones(1, 9, 9, 11), weight, expected


@pytest.mark.parametrize("tap", [0, 4, 5, 8])
@pytest.mark.parametrize("shift", [(1, 0), (0, -2), (-1, 2)])
def test_offsets_that_shift_by_whole_pixels_give_the_shifted_image(tap, shift):
    # Tap k's (dy, dx) at offset channels (2k, 2k+1): DCNv2's layout is torchvision's.
    features, offset, mask, weight, expected = _shift_case(tap, shift)
    bias = torch.zeros(4)
    torchvision_out = deform_conv2d(features, offset, weight, bias, padding=1, mask=mask)
    torch.testing.assert_close(torchvision_out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(deform_conv_reference(features, offset, mask, weight, bias), expected, atol=1e-6, rtol=0)


def test_the_converted_dcn_block_reads_dcnv2s_offset_and_mask_channels(published_state):
    # conv_offset_mask with zero weights: its bias is the output, chunked (o1, o2, m);
    # offset = cat(o1, o2), mask = sigmoid(m). A whole-pixel shift of tap 4 (the centre).
    state = {k.removeprefix("module."): v.clone() for k, v in published_state.items()}
    _, offset, _, _, _ = _shift_case(4, (1, -1))
    bias = torch.zeros(27)
    bias[:18] = offset[0, :, 0, 0]
    bias[8], bias[9] = 1.0, -1.0  # tap 4 = channels 8 and 9: (dy, dx) = (1, -1)
    bias[18:] = 40.0  # sigmoid(40) == 1 in float32
    state["dcn_block.dcn.conv_offset_mask.weight"] = torch.zeros(27, 64, 3, 3)
    state["dcn_block.dcn.conv_offset_mask.bias"] = bias
    weight = torch.zeros(64, 64, 3, 3)
    weight[:, :, 1, 1] = torch.eye(64)
    state["dcn_block.dcn.weight"], state["dcn_block.dcn.bias"] = weight, torch.zeros(64)
    block = convert_published_state(state).model.structure[0]
    features = torch.rand(1, 64, 7, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block(features)
    expected = torch.zeros_like(features)
    expected[..., :-1, 1:] = features[..., 1:, :-1]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_the_reference_deform_conv_agrees_with_torchvision_on_random_offsets():
    generator = torch.Generator().manual_seed(7)
    features = torch.rand(2, 6, 10, 13, generator=generator)
    offset = torch.randn(2, 18, 10, 13, generator=generator) * 2
    mask = torch.rand(2, 9, 10, 13, generator=generator)
    weight, bias = torch.randn(5, 6, 3, 3, generator=generator), torch.randn(5, generator=generator)
    torch.testing.assert_close(
        deform_conv_reference(features, offset, mask, weight, bias),
        deform_conv2d(features, offset, weight, bias, padding=1, mask=mask),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


# --- the numbers --------------------------------------------------------------------------


def test_the_converted_checkpoint_gives_the_published_networks_outputs(published_state, converted):
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    masks = random_masks(2, 12, 16, seed=2)
    expected = reference_forward(published_state, images, masks)
    assert 0.9 < ((expected > 0) & (expected < 1)).float().mean()  # clamping hides little
    model = load_checkpoint(converted)
    with torch.no_grad():
        raw = model.train()(images, masks=masks)  # train mode: the Tanh output, unclamped
    assert (raw - expected).abs().max() < 1e-5
    fast = prepare_for_inference(model, device="cpu")
    with torch.inference_mode():
        served = fast(images.contiguous(memory_format=torch.channels_last), masks=masks)
    assert (served - expected.clamp(0, 1)).abs().max() < 1e-5


def test_the_checkpoint_records_the_published_settings_and_origin(converted, published_file):
    document = json.loads((converted / "config.json").read_text())
    assert document["model"]["blocks_per_group"] == 9
    assert document["model"]["dcp_mask_mode"] == "published"
    assert document["model"]["input_mean"] == [0.64, 0.6, 0.58]
    metadata = document["metadata"]
    assert metadata["origin"] == "published" and metadata["origin_file"] == "hdm_haze_sots.pk"
    assert len(metadata["origin_sha256"]) == 64 and metadata["task"] == "dehaze"
    assert set(metadata["dropped_unused"]) == UNUSED


def test_summary_of_the_converted_checkpoint(converted):
    output = invoke("model", "summary", "--checkpoint", str(converted))
    assert f"checkpoint {converted}: 3x9 blocks, 64 channels" in output
    assert "2,819,292  (2.82M)" in output
    result = CliRunner().invoke(main, ["model", "summary", "--checkpoint", str(converted), "--variant", "B"])
    assert result.exit_code == 2 and "do not pass --variant" in result.output


# --- through hdm enhance and hdm evaluate, on a real SOTS image ---------------------------


@pytest.fixture(scope="module")
def sots_scene(published_state):
    """A SOTS indoor pair, and the reference network's output on it with the script's masks."""
    hazy_path = next(SOTS.glob(f"hazy/{SCENE}_*.png"))
    hazy = read_image(hazy_path).unsqueeze(0)
    masks = dcp_region_masks(hazy, mode="published")
    expected = reference_forward(published_state, hazy, masks).clamp(0, 1)
    return hazy_path, expected


def test_hdm_enhance_gives_the_reference_pixels(converted, sots_scene, tmp_path):
    hazy_path, expected = sots_scene
    invoke("enhance", str(hazy_path), "-o", str(tmp_path), "--checkpoint", str(converted),
           "--precision", "fp32", "--device", "cpu")  # fmt: skip
    written = torch.from_numpy(np.array(Image.open(tmp_path / f"{hazy_path.stem}.png"))).permute(2, 0, 1)
    reference = expected[0].mul(255).round()
    difference = (written.float() - reference).abs()
    assert difference.max() <= 1  # 8-bit rounding of outputs equal to ~1e-6
    assert (difference > 0).float().mean() < 0.001


def test_hdm_evaluate_scores_the_reference_output(converted, sots_scene, tmp_path):
    hazy_path, expected = sots_scene
    source = tmp_path / "sots"
    for folder, name in (("hazy", hazy_path.name), ("gt", f"{SCENE}.png")):
        (source / folder).mkdir(parents=True)
        shutil.copyfile(SOTS / folder / name, source / folder / name)
    ingest(str(source), str(tmp_path / "dataset"), IngestOptions(layout="sots"), progress=False)
    out = tmp_path / "scores.csv"
    invoke("evaluate", "--model", str(converted), "--data", str(tmp_path / "dataset"), "--split", "test",
           "--out", str(out), "--no-mlflow", "--precision", "fp32", "--device", "cpu")  # fmt: skip
    with out.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    target = read_image(SOTS / "gt" / f"{SCENE}.png").unsqueeze(0)
    scores = image_metrics(expected, target)
    assert float(row["psnr"]) == pytest.approx(scores["psnr"].item(), abs=0.01)
    assert float(row["ssim"]) == pytest.approx(scores["ssim"].item(), abs=1e-4)
    assert math.isfinite(float(row["psnr"]))


# --- the registry ---------------------------------------------------------------------------


def test_register_makes_a_version_tagged_with_its_origin_once(published_file, tmp_path, mlflow_server):
    arguments = ["model", "import-published", str(published_file), "-o", str(tmp_path / "ckpt"),
                 "--register", "--task", "dehaze", "--tracking-uri", mlflow_server, "--name", "hdm-published-test"]  # fmt: skip
    first = invoke(*arguments)
    assert "registered: hdm-published-test v" in first
    version = first.split("registered: hdm-published-test v")[1].split()[0]
    again = invoke(*arguments, "--alias", "published")
    assert f"already registered: hdm-published-test v{version}" in again
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    registered = client.get_model_version("hdm-published-test", version)
    assert registered.tags["hdm.origin"] == "published"
    assert registered.tags["hdm.origin_file"] == "hdm_haze_sots.pk"
    assert registered.tags["hdm.origin_code"] == "https://github.com/DongLiangSXU/HDM"
    assert client.get_model_version_by_alias("hdm-published-test", "published").version == version
    model = load_checkpoint(tmp_path / "ckpt")
    served = load_registered(f"models:/hdm-published-test/{version}", tracking_uri=mlflow_server)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), served.state_dict().values(), strict=True))
