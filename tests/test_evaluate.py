"""``hdm evaluate`` on a checkpoint folder, a training checkpoint and the DCP baseline."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from hdm_model import build_hdm, enhance, prepare_for_inference, save_checkpoint, variant_config
from hdm_model.metrics import image_metrics
from hdm_model.priors import dehaze
from hdm_platform.cli.evaluate import compare as compare_command
from hdm_platform.cli.evaluate import evaluate as evaluate_command
from hdm_platform.data.synth import synthesize
from hdm_platform.evaluate import iter_split_pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate") / "ds"
    synthesize("builtin", str(root), task="dehaze", count=8, size=(30, 22), test_fraction=0.5,
               workers=1, progress=False)  # fmt: skip
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_hdm(variant_config("HDM", channels=16, num_groups=1, blocks_per_group=1)).eval()
    # A training checkpoint keeps the exported model in model/; both layouts are accepted.
    return save_checkpoint(model, tmp_path_factory.mktemp("training-checkpoint") / "model"), model


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def as_tensor(image):
    return torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255


def test_checkpoint_and_training_checkpoint_give_the_same_csv(dataset, checkpoint, tmp_path):
    folder, model = checkpoint
    runner = CliRunner()
    tables = []
    for model_arg in (str(folder), str(folder.parent)):
        out = tmp_path / f"{len(tables)}.csv"
        result = runner.invoke(
            evaluate_command,
            ["--model", model_arg, "--data", dataset, "--split", "test", "--out", str(out), "--no-mlflow"],
        )
        assert result.exit_code == 0, result.output
        tables.append(read_rows(out))
    pairs = list(iter_split_pairs(dataset, "test"))
    rows = tables[0]
    assert [row["id"] for row in rows] == [pair_id for pair_id, _, _ in pairs] + ["mean"]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in tables[1]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in rows
    ]
    pair_id, source, target = pairs[0]
    # Prepared and at precision "auto", as the command runs it (bf16 where it is faster).
    prepared = prepare_for_inference(copy.deepcopy(model), device="cpu")
    expected = image_metrics(enhance(prepared, as_tensor(source), precision="auto"), as_tensor(target))
    assert float(rows[0]["psnr"]) == pytest.approx(expected["psnr"].item(), rel=1e-6)
    assert float(rows[0]["ssim_y"]) == pytest.approx(expected["ssim_y"].item(), rel=1e-6)
    assert (int(rows[0]["width"]), int(rows[0]["height"])) == (30, 22)
    mean_psnr = sum(float(row["psnr"]) for row in rows[:-1]) / len(pairs)
    assert float(rows[-1]["psnr"]) == pytest.approx(mean_psnr)


def test_dcp_baseline_is_logged_to_mlflow(dataset, tmp_path, mlflow_server):
    out = tmp_path / "dcp.csv"
    result = CliRunner().invoke(
        evaluate_command,
        ["--model", "dcp", "--data", dataset, "--out", str(out), "--mlflow",
         "--tracking-uri", mlflow_server, "--experiment", "evaluate-test"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    _, source, target = next(iter_split_pairs(dataset, "test"))
    expected = image_metrics(dehaze(as_tensor(source)), as_tensor(target))["psnr"].item()
    assert float(rows[0]["psnr"]) == pytest.approx(expected, rel=1e-6)

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("evaluate-test").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["model"] == "dcp"
    assert runs[0].data.metrics["test_psnr"] == pytest.approx(float(rows[-1]["psnr"]))
    assert math.isfinite(runs[0].data.metrics["test_ssim"])
    assert [info.path for info in client.list_artifacts(runs[0].info.run_id)] == ["test_metrics.csv"]


def test_bad_inputs_are_named(dataset, tmp_path):
    runner = CliRunner()
    common = ["--data", dataset, "--no-mlflow"]
    missing = runner.invoke(evaluate_command, ["--model", str(tmp_path / "nope"), *common])
    assert missing.exit_code != 0 and "nope" in missing.output
    no_split = runner.invoke(evaluate_command, ["--model", "dcp", "--split", "val", *common])
    assert no_split.exit_code != 0 and "'val'" in no_split.output


def test_compare_tables_margins_and_picture(dataset, checkpoint, tmp_path):
    folder, _ = checkpoint
    table, picture = tmp_path / "out" / "table.md", tmp_path / "out" / "picture.png"
    result = CliRunner().invoke(
        compare_command,
        ["--model", f"hdm={folder}", "--model", "hazy=input", "--model", "dcp", "--data", dataset,
         "--table", str(table), "--picture", str(picture), "--picture-images", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    means = {
        label: sum(image_metrics(output, as_tensor(target))["psnr"].item() for output, target in pairs) / len(pairs)
        for label, pairs in {
            "hdm": [(enhance(checkpoint[1], as_tensor(s)), t) for _, s, t in iter_split_pairs(dataset, "test")],
            "hazy": [(as_tensor(s), t) for _, s, t in iter_split_pairs(dataset, "test")],
            "dcp": [(dehaze(as_tensor(s)), t) for _, s, t in iter_split_pairs(dataset, "test")],
        }.items()
    }
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.read_text().splitlines()[4:]}
    assert rows.keys() == means.keys()
    assert rows["hazy"] == f"{means['hazy']:.2f}" and rows["dcp"] == f"{means['dcp']:.2f}"
    # The table's HDM runs at precision "auto" (bf16 on CPUs with AVX512_BF16 or AMX), the
    # reference here in fp32: the means agree to a hundredth of a dB, not always in the last digit.
    assert abs(float(rows["hdm"]) - means["hdm"]) < 0.015
    for label in ("hazy", "dcp"):
        margin = means["hdm"] - means[label]
        verdict = "beats" if margin > 0 else "does NOT beat"
        assert f"hdm {verdict} {label} by {margin:+.2f} dB PSNR" in result.output
    with Image.open(picture) as image:
        # Three rows of 30x22 pairs; columns input, hdm, dcp, target (the input model is not repeated).
        assert image.size == (4 + 4 * (30 + 4), 16 + 4 + 3 * (22 + 4))


def test_compare_rejects_a_label_given_twice(dataset):
    result = CliRunner().invoke(compare_command, ["--model", "a=dcp", "--model", "a=input", "--data", dataset])
    assert result.exit_code != 0 and "label 'a' given twice" in result.output
