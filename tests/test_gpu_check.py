"""scripts/gpu-check.sh on this CPU machine (--device cpu --quick), so that the GPU checks
cannot rot before a GPU machine is at hand. It runs in a Python that has only what a bare
GPU machine has (torch, torchvision, NumPy, Pillow, safetensors, torchmetrics and what they
require): every section and check in the JSON and the Markdown, finite figures, failures
and timeouts recorded without stopping the rest."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement

from hdm_model.inference import resolve_precision

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

SECTIONS = ["model", "inference", "compile", "training"]
MODEL_CHECKS = [
    "forward_backward",
    "matches_cpu",
    "bf16_autocast",
    "dcp_masks",
    "tiled_equals_untiled",
    "checkpoint_round_trip",
]
QUICK_SIZES = ["64x64", "96x54"]
VARIANTS = ["fp32", "fp32 channels_last", "fp32 fast", "bf16 fast"]
DEVICE_PACKAGES = ["torch", "torchvision", "numpy", "pillow", "safetensors", "torchmetrics"]
PLATFORM_ONLY = ["hdm_platform", "ray", "mlflow", "pydantic", "yaml", "pyarrow", "s3fs", "scipy",
                 "skimage", "pyspng", "click", "tqdm", "optuna", "matplotlib"]  # fmt: skip

# Loaded by every Python process started with this folder on PYTHONPATH: records what the
# process imported and, with HDM_TEST_BREAK_CHECKPOINT, makes saving a checkpoint fail.
SITECUSTOMIZE = """
import atexit, json, os, sys
if os.environ.get("HDM_TEST_BREAK_CHECKPOINT"):
    import hdm_model
    def broken_save(*args, **kwargs):
        raise OSError("injected by the test: the disk is full")
    hdm_model.save_checkpoint = broken_save
def _record():
    with open(os.path.join(os.environ["HDM_TEST_MODULES_DIR"], f"{os.getpid()}.json"), "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(_record)
"""


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required_distributions(names: list[str]) -> set[str]:
    """``names`` and every distribution they require, transitively (no extras)."""
    seen: set[str] = set()
    pending = [_normalised(name) for name in names]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(_normalised(requirement.name))
    return seen


def _site_entries(on_device: set[str]) -> tuple[set[str], set[str]]:
    """Top-level site-packages entries of the distributions on the device, and those only
    of the others."""
    kept: set[str] = set()
    others: set[str] = set()
    for distribution in metadata.distributions():
        tops = {f.parts[0] for f in distribution.files or [] if f.parts and f.parts[0] != ".."}
        (kept if _normalised(distribution.metadata["Name"]) in on_device else others).update(tops)
    return kept, others - kept


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A Python with only what a bare GPU machine has: a fresh venv (the standard library)
    and a folder of links to torch, torchvision, NumPy, Pillow, safetensors, torchmetrics
    and what they require, none of this machine's other packages."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    packages = root / "packages"
    packages.mkdir()
    site = Path(torch.__file__).resolve().parent.parent
    kept, others = _site_entries(_required_distributions(DEVICE_PACKAGES))
    assert {"torch", "torchvision", "torchmetrics", "safetensors", "numpy", "PIL"} <= kept
    assert {"ray", "mlflow", "pydantic", "tqdm", "scipy"} <= others
    for entry in site.iterdir():
        if (
            entry.name not in others
            and entry.suffix != ".pth"
            and not entry.name.startswith("__editable__")
        ):
            (packages / entry.name).symlink_to(entry)
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHON": str(root / "venv" / "bin" / "python"), "PYTHONPATH": f"{hooks}:{packages}"}


def run_check(
    environment: dict[str, str], tmp_path: Path, *arguments: str, **variables: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """``bash scripts/gpu-check.sh --out TMP/out ARGUMENTS`` in ``environment``."""
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    out = tmp_path / "out"
    env = {**os.environ, **environment, "HDM_TEST_MODULES_DIR": str(modules), **variables}
    env.pop("OUT", None)
    completed = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), *arguments],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    return completed, out


def checks_of(summary: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in summary["sections"][section]["checks"]}


@pytest.fixture(scope="module")
def quick_run(bare_python: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("gpu-check")
    completed, out = run_check(bare_python, tmp_path, "--device", "cpu", "--quick", "--skip-compile")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return {
        "completed": completed,
        "summary": json.loads((out / "gpu-check.json").read_text()),
        "markdown": (out / "gpu-check.md").read_text(),
        "modules": {p.stem: json.loads(p.read_text()) for p in (tmp_path / "modules").glob("*.json")},
    }


def test_the_bare_python_lacks_the_platform_s_packages(bare_python: dict[str, str]) -> None:
    probe = (
        "import importlib.util as u, torch, torchvision, safetensors, torchmetrics, numpy, PIL; "
        f"print([name for name in {PLATFORM_ONLY!r} if u.find_spec(name)])"
    )
    env = {**os.environ, **bare_python}
    completed = subprocess.run(
        [bare_python["PYTHON"], "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_the_quick_cpu_run_passes_with_one_progress_line_per_check(quick_run: dict[str, Any]) -> None:
    summary, stdout = quick_run["summary"], quick_run["completed"].stdout
    assert summary["passed"] is True and summary["device"] == "cpu"
    assert summary["counts"] == {"passed": 17, "failed": 0, "skipped": 2, "not_run": 0}
    assert summary["failures"] == []
    progress = re.findall(
        r"^\[(model|inference|training) (\d+)/(\d+)\] (.+?): (passed|skipped) in", stdout, re.MULTILINE
    )
    assert len(progress) == 18  # every check but the skipped compile section's
    assert re.search(r"^gpu-check passed in \d+ s", stdout, re.MULTILINE)


def test_every_section_and_check_is_in_the_json(quick_run: dict[str, Any]) -> None:
    summary = quick_run["summary"]
    assert list(summary["sections"]) == SECTIONS
    assert summary["options"]["profile"] == "quick" and summary["model"]["parameters"] > 0
    model = checks_of(summary, "model")
    assert list(model) == MODEL_CHECKS
    assert model["matches_cpu"]["status"] == "skipped" and "CPU" in model["matches_cpu"]["reason"]
    assert all(model[name]["status"] == "passed" for name in MODEL_CHECKS if name != "matches_cpu")
    assert list(checks_of(summary, "inference")) == [
        f"{size} {variant}" for size in QUICK_SIZES for variant in [*VARIANTS, "DCP masks"]
    ]
    compile_section = summary["sections"]["compile"]
    assert compile_section["status"] == "skipped" and compile_section["reason"] == "--skip-compile"
    assert [c["status"] for c in compile_section["checks"]] == ["skipped"]
    assert list(checks_of(summary, "training")) == ["train fp32", "train bf16"]
    for section in ("model", "inference", "training"):
        assert summary["sections"][section]["status"] == "passed"
        assert 0 < summary["sections"][section]["wall_s"] <= summary["sections"][section]["budget_s"]


def test_the_model_checks_measure_what_they_name(quick_run: dict[str, Any]) -> None:
    model = checks_of(quick_run["summary"], "model")
    figures = {name: check.get("figures", {}) for name, check in model.items()}
    assert figures["forward_backward"]["loss_after_3_steps"] < figures["forward_backward"]["loss_first"]
    assert 40 <= figures["bf16_autocast"]["psnr_db_vs_fp32"] < 100  # bfloat16 really ran
    assert 2 <= figures["dcp_masks"]["regions_used"] <= 5
    assert figures["tiled_equals_untiled"]["psnr_db_vs_untiled"] >= 40
    assert figures["checkpoint_round_trip"]["max_abs_output_difference"] <= 1e-6


def test_latency_and_training_figures_are_finite(quick_run: dict[str, Any]) -> None:
    summary = quick_run["summary"]
    rows = {(row["size"], row["variant"]): row for row in summary["latency"]}
    assert set(rows) == {(size, variant) for size in QUICK_SIZES for variant in [*VARIANTS, "DCP masks"]}
    for (size, variant), row in rows.items():
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, (size, variant)
        assert row["peak_memory_mib"] is None  # no allocator statistics on a CPU
        if variant == "fp32":
            assert row["speedup_vs_fp32"] == 1.0 and row["max_abs_diff_vs_fp32"] == 0.0
        elif variant == "DCP masks":
            assert 0 < row["share_of_fp32"] and math.isfinite(row["share_of_fp32"])
        else:
            assert row["speedup_vs_fp32"] > 0 and row["psnr_db_vs_fp32"] >= 40
    training = {row["precision"]: row for row in summary["training"]}
    assert set(training) == {"fp32", "bf16"}
    for row in training.values():
        assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0
        assert row["batch"] == 2 and row["crop"] == 32
    assert training["fp32"]["vs_fp32"] == 1.0


def test_the_markdown_summarises_every_check(quick_run: dict[str, Any]) -> None:
    markdown, summary = quick_run["markdown"], quick_run["summary"]
    assert markdown.startswith("# GPU check on ") and ": passed\n" in markdown.splitlines()[0] + "\n"
    for heading in ("## Inference latency", "## Training step throughput", "## Checks"):
        assert heading in markdown
    for section, record in summary["sections"].items():
        for check in record["checks"]:
            assert f"| {section} | {check['name']} | {check['status']} |" in markdown
    assert "| 64x64 | bf16 fast |" in markdown and "| fp32 | 2 x 32^2 |" in markdown
    assert "## Failures" not in markdown


def test_no_process_imports_the_platform(quick_run: dict[str, Any]) -> None:
    # hdm_platform is on PYTHONPATH (platform/, as the wrapper sets it) but must stay unused.
    records = quick_run["modules"]
    assert len(records) == 4  # the run and its model, inference and training sections
    for pid, modules in records.items():
        top_level = {name.split(".")[0] for name in modules}
        assert {"hdm_model", "torch"} <= top_level, pid
        assert not top_level & set(PLATFORM_ONLY), (pid, sorted(top_level & set(PLATFORM_ONLY)))


def test_a_failing_check_is_recorded_and_the_others_still_run(
    bare_python: dict[str, str], tmp_path: Path
) -> None:
    completed, out = run_check(bare_python, tmp_path, "--device", "cpu", "--quick", "--only", "model",
                               HDM_TEST_BREAK_CHECKPOINT="1")  # fmt: skip
    assert completed.returncode == 1, completed.stdout + completed.stderr
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["passed"] is False and list(summary["sections"]) == ["model"]
    model = checks_of(summary, "model")
    assert model["checkpoint_round_trip"]["status"] == "failed"
    assert model["checkpoint_round_trip"]["error"] == "OSError: injected by the test: the disk is full"
    assert "broken_save" in model["checkpoint_round_trip"]["traceback"]
    assert [model[name]["status"] for name in MODEL_CHECKS[:5]] == [
        "passed",
        "skipped",
        "passed",
        "passed",
        "passed",
    ]
    assert summary["sections"]["model"]["status"] == "failed"
    assert summary["failures"] == [
        {
            "section": "model",
            "check": "checkpoint_round_trip",
            "error": "OSError: injected by the test: the disk is full",
        }
    ]
    markdown = (out / "gpu-check.md").read_text()
    assert markdown.splitlines()[0].endswith(": FAILED")
    assert "- model / checkpoint_round_trip: OSError: injected by the test: the disk is full" in markdown
    assert "[model 6/6] checkpoint_round_trip: failed in" in completed.stdout
    assert "failed: model / checkpoint_round_trip" in completed.stdout


def test_a_section_over_its_budget_is_stopped_and_the_next_still_runs(
    bare_python: dict[str, str], tmp_path: Path
) -> None:
    completed, out = run_check(bare_python, tmp_path, "--device", "cpu", "--quick", "--only", "model", "training",
                               "--budget", "model=2")  # fmt: skip
    assert completed.returncode == 1, completed.stdout + completed.stderr
    summary = json.loads((out / "gpu-check.json").read_text())
    model = summary["sections"]["model"]
    assert model["status"] == "timed_out" and model["reason"] == "the section's budget of 2 s ran out"
    assert model["budget_s"] == 2 and model["wall_s"] < 10
    assert model["checks"][-1] == {
        "name": "checkpoint_round_trip",
        "status": "not_run",
        "reason": model["reason"],
    }
    assert {f["check"] for f in summary["failures"]} >= {"checkpoint_round_trip"}
    assert summary["sections"]["training"]["status"] == "passed"
    assert "== model: timed_out in" in completed.stdout


def test_no_section_starts_past_the_run_s_deadline(bare_python: dict[str, str], tmp_path: Path) -> None:
    completed, out = run_check(bare_python, tmp_path, "--device", "cpu", "--quick", "--deadline-s", "5")
    assert completed.returncode == 1
    summary = json.loads((out / "gpu-check.json").read_text())
    reason = "the run's deadline of 5 s was reached"
    assert {name: record["status"] for name, record in summary["sections"].items()} == dict.fromkeys(
        SECTIONS, "not_run"
    )
    assert summary["counts"]["not_run"] == 6 + 10 + 1 + 2 and summary["failures"][0]["error"] == reason


def test_without_a_cuda_device_the_default_run_stops_with_what_to_do(
    bare_python: dict[str, str], tmp_path: Path
) -> None:
    completed, out = run_check(bare_python, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert completed.returncode == 2
    assert "CUDA is not available" in completed.stderr and "--device cpu --quick" in completed.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--budget", "warmup=5"], "unknown section 'warmup'"),
        (["--budget", "compile=soon"], "want SECTION=SECONDS"),
        (["--only", "everything"], "invalid choice: 'everything'"),
        (["--device", "meta"], "this check runs on cuda or cpu"),
    ],
)
def test_bad_arguments_are_named(
    bare_python: dict[str, str], tmp_path: Path, arguments: list[str], message: str
) -> None:
    completed, _ = run_check(bare_python, tmp_path, *arguments)
    assert completed.returncode == 2 and message in completed.stderr


@pytest.mark.slow
def test_the_compile_section_times_the_compiled_model(bare_python: dict[str, str], tmp_path: Path) -> None:
    # A cold inductor compile of the tiny model takes 1-2 minutes on 2 CPU cores.
    completed, out = run_check(bare_python, tmp_path, "--device", "cpu", "--quick", "--only", "compile")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary = json.loads((out / "gpu-check.json").read_text())
    (check,) = summary["sections"]["compile"]["checks"]
    assert check["name"] == "64x64 compiled" and check["status"] == "passed"
    figures = check["figures"]
    assert figures["precision"] == resolve_precision("auto", "cpu")
    assert 0 < figures["first_call_s"] <= figures["compile_and_warmup_s"]
    assert math.isfinite(figures["median_ms"]) and figures["median_ms"] > 0
    assert figures["psnr_db_vs_fp32"] is None or figures["psnr_db_vs_fp32"] >= 40
    (row,) = summary["latency"]
    assert row["variant"] == f"compiled ({figures['precision']})" and row["speedup_vs_fp32"] is None


def test_the_markdown_names_the_gpu_and_its_conv_math(quick_run: dict[str, Any]) -> None:
    # Only a CUDA machine fills these fields; render them here so that the GPU run cannot
    # be the first to format them.
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    summary = json.loads(json.dumps(quick_run["summary"]))
    summary["environment"].update(
        gpu="NVIDIA H200", gpu_memory_gib=139.8, gpu_multiprocessors=132, compute_capability="9.0",
        cuda="13.0", cudnn=91200, bf16_supported=True, cudnn_allow_tf32=True,
    )  # fmt: skip
    summary["device"], summary["device_name"] = "cuda:0", "NVIDIA H200"
    markdown = gpu_check.render_markdown(summary)
    assert markdown.startswith("# GPU check on NVIDIA H200: passed\n")
    assert (
        "- GPU NVIDIA H200, 140 GiB, compute capability 9.0, CUDA 13.0, cuDNN 91200, "
        "cuDNN TF32 on (the `fp32` rows), matmul precision highest"
    ) in markdown
