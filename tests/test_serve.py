"""HTTP inference with Ray Serve, over real HTTP on loopback.

The configs in ``serve_configs/`` are checked against Serve's own schema; everything else
runs against the ``served_app`` fixture (tests/serving.py): a Ray head of its own with the
open ``hdm`` application (dehaze from the MLflow registry, derain and lowlight from
checkpoint folders) and the ``strict`` one (API keys, tight limits, one request at a time).
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from click.testing import CliRunner
from hdm_platform.cli.enhance import enhance as enhance_command
from hdm_platform.cli.enhance import explain as explain_command
from hdm_platform.config import ConfigError
from hdm_platform.model_refs import HTTPEnhancerError, load_enhancer
from hdm_platform.imageio import encode_image, read_image
from hdm_platform.serve.auth import load_api_keys
from hdm_platform.serve.control import (
    deploy,
    read_serve_config,
    remove_application,
    validate_serve_config,
    wait_until_removed,
    wait_until_running,
)
from hdm_platform.serve.deployments import load_task_model
from hdm_platform.serve.settings import ApiKeySettings, ModelSettings, ServeAppArgs
from PIL import Image
from published_reference import random_published_state, reference_forward, save_published_file
from ray.serve.schema import ServeDeploySchema
from ray.serve.scripts import build as serve_build
from realworld import REALWORLD
from serving import (
    MAIN_APP,
    STRICT_APP,
    STRICT_LIMITS,
    STRICT_RETRY_AFTER_S,
    png_bytes,
    register_tiny_model,
    replica_pids,
    smooth_png,
)

from hdm_model import build_hdm, dcp_region_masks, hdm, save_checkpoint, variant_config
from hdm_model.published import import_published

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "serve_configs"
#: Each config and the tasks it serves; all but local.yaml on GPUs.
CONFIG_TASKS = {
    "dehaze.yaml": {"dehaze"},
    "derain.yaml": {"derain"},
    "lowlight.yaml": {"lowlight"},
    "all.yaml": {"dehaze", "derain", "lowlight"},
    "local.yaml": {"dehaze"},
}
PNG = {"Content-Type": "image/png"}
TIMEOUT_S = 120


def post(
    url: str, data: bytes, *, headers: dict[str, str] | None = None, **kwargs
) -> requests.Response:
    return requests.post(
        url, data=data, headers={**PNG, **(headers or {})}, timeout=TIMEOUT_S, **kwargs
    )


def error_kind(response: requests.Response) -> str:
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body["error"]) == {"kind", "message"} and body["error"]["message"]
    return body["error"]["kind"]


def decoded_size(data: bytes) -> tuple[int, int]:
    """(height, width) as the server decodes it (EXIF orientation applied)."""
    return tuple(read_image(data).shape[-2:])


# --- the configs ---------------------------------------------------------------------------


def test_every_config_is_checked():
    assert {path.name for path in CONFIGS.glob("*.yaml")} == set(CONFIG_TASKS)


@pytest.mark.parametrize("name", list(CONFIG_TASKS))
def test_config_passes_serves_schema_and_the_app_args(name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(raw)
    validate_serve_config(raw, source=name)
    [app] = raw["applications"]
    assert app["import_path"] == "hdm_platform.serve.app:build_app"
    args = ServeAppArgs.model_validate(app["args"])
    assert set(args.tasks) == CONFIG_TASKS[name]
    deployments = {deployment["name"]: deployment for deployment in app["deployments"]}
    for task, settings in args.tasks.items():
        assert settings.model == f"models:/hdm-{task}@champion"
        deployment = deployments[task]
        assert "autoscaling_config" in deployment
        # One batch running and the next filling.
        assert deployment["max_ongoing_requests"] == 2 * settings.max_batch_size
        if name == "local.yaml":
            assert "num_gpus" not in deployment["ray_actor_options"] and settings.device == "cpu"
        else:
            assert deployment["ray_actor_options"]["num_gpus"] == 1 and settings.device == "cuda"


def _local_config() -> dict:
    return yaml.safe_load((CONFIGS / "local.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda app: app["args"]["tasks"]["dehaze"].update(tile=510),
            "applications[0].args.tasks.dehaze.tile: Input should be a multiple of 4",
        ),
        (
            lambda app: app["args"].update(tasks={"dehazing": {"model": "x"}}),
            "applications[0].args.tasks.dehazing.[key]",
        ),
        (
            lambda app: app["deployments"][0].update(max_ongoing_requests=1),
            (
                "applications[0].deployments[0].max_ongoing_requests: 1 cannot fill a batch of "
                "max_batch_size 2"
            ),
        ),
        (
            lambda app: app["deployments"][0].update(
                user_config={"model": "x", "max_batch_size": 0}
            ),
            "applications[0].deployments[0].user_config.max_batch_size",
        ),
        (
            lambda app: app["deployments"][0].update(name="derain"),
            "applications[0].deployments[0].name: this application has no deployment 'derain'",
        ),
        (
            lambda app: app.update(route_prefix=7),
            "applications[0].route_prefix: Input should be a valid string",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(change, message):
    raw = _local_config()
    change(raw["applications"][0])
    with pytest.raises(ConfigError) as refused:
        validate_serve_config(raw, source="local.yaml")
    assert message in str(refused.value)


def test_serve_build_writes_a_config_that_deploys_the_registry_champions(tmp_path):
    result = CliRunner().invoke(
        serve_build, ["hdm_platform.serve.app:app", "-o", str(tmp_path / "built.yaml")]
    )
    assert result.exit_code == 0, result.output
    built = yaml.safe_load((tmp_path / "built.yaml").read_text())
    validate_serve_config(built, source="built.yaml")
    deployments = {
        deployment["name"]: deployment for deployment in built["applications"][0]["deployments"]
    }
    assert set(deployments) == {"ingress", "dehaze", "derain", "lowlight"}
    assert deployments["derain"]["user_config"]["model"] == "models:/hdm-derain@champion"
    assert (
        deployments["derain"]["max_ongoing_requests"]
        == 2 * deployments["derain"]["user_config"]["max_batch_size"]
    )


def test_api_keys_come_from_the_environment_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# ops team\nalpha\n\n beta  # rotated 2026-11\n")
    settings = ApiKeySettings(env_var="KEYS", file=str(keys))
    assert load_api_keys(settings, {"KEYS": "gamma, delta,"}) == {"alpha", "beta", "gamma", "delta"}
    assert load_api_keys(ApiKeySettings(), {}) == frozenset()  # no key: the API is open
    keys.write_text("# every key revoked\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(settings, {})
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(ApiKeySettings(file=str(tmp_path / "missing")), {})


# --- routes --------------------------------------------------------------------------------


def test_health_and_models_describe_what_each_task_serves(served_app):
    health = requests.get(f"{served_app.base_url}/healthz", timeout=TIMEOUT_S)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "tasks": ["dehaze", "derain", "lowlight"]}

    listed = requests.get(f"{served_app.base_url}/v1/models", timeout=TIMEOUT_S)
    assert listed.status_code == 200
    models = {entry["task"]: entry for entry in listed.json()}
    assert set(models) == {"dehaze", "derain", "lowlight"}
    tiny = build_hdm(variant_config("HDM", channels=8, num_groups=1, blocks_per_group=1))
    for task, entry in models.items():
        assert entry["reference"] == served_app.models[task]
        assert entry["parameters"] == sum(parameter.numel() for parameter in tiny.parameters())
        assert entry["config"]["channels"] == 8 and entry["device"] == "cpu"
    dehaze = models["dehaze"]
    assert (
        dehaze["registered_model"] == served_app.registered_model and dehaze["alias"] == "champion"
    )
    assert dehaze["model_version"] == f"{served_app.registered_model}/{dehaze['version']}"
    derain = models["derain"]
    assert (
        derain["registered_model"] is None and derain["version"] is None and derain["alias"] is None
    )
    assert derain["model_version"] == f"sha256:{derain['weights_sha256'][:12]}"


@pytest.mark.parametrize("task", ["derain", "dehaze"])
def test_http_result_equals_hdm_enhance_on_the_same_image_and_model(
    served_app, task, tmp_path, monkeypatch
):
    image = png_bytes(40, 56, seed=11)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(image)
    reference = served_app.models[task]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_app.tracking_uri)  # hdm enhance's registry
    cli = CliRunner().invoke(
        enhance_command,
        [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", reference],
    )
    assert cli.exit_code == 0, cli.output

    raw = post(f"{served_app.base_url}/v1/enhance/{task}", image)
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "image/png"
    assert raw.content == (tmp_path / "out" / "photo.png").read_bytes()
    assert float(raw.headers["X-Inference-Time-Ms"]) > 0
    assert float(raw.headers["X-Processing-Time-Ms"]) >= float(raw.headers["X-Inference-Time-Ms"])
    assert raw.headers["X-Batch-Size"] == "1"
    timing = {
        name: float(duration.removeprefix("dur="))
        for name, duration in (part.strip().split(";") for part in raw.headers["Server-Timing"].split(","))
    }
    assert list(timing) == ["upload", "model", "encode"]
    assert all(duration > 0 for duration in timing.values())
    assert timing["model"] >= float(raw.headers["X-Inference-Time-Ms"])
    assert sum(timing.values()) == pytest.approx(float(raw.headers["X-Processing-Time-Ms"]), abs=0.2)
    model = {
        entry["task"]: entry
        for entry in requests.get(f"{served_app.base_url}/v1/models", timeout=TIMEOUT_S).json()
    }[task]
    assert raw.headers["X-Model-Version"] == model["model_version"]

    form = requests.post(
        f"{served_app.base_url}/v1/enhance/{task}",
        files={"file": ("photo.png", image, "image/png")},
        timeout=TIMEOUT_S,
    )
    assert form.status_code == 200, form.text
    assert form.content == raw.content


@pytest.mark.parametrize(
    ("output_format", "media_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_jpeg_and_webp_on_request(served_app, output_format, media_type):
    response = post(
        f"{served_app.base_url}/v1/enhance/lowlight",
        png_bytes(36, 52),
        params={"format": output_format},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == output_format.upper() and image.size == (52, 36)


def test_pipeline_chains_the_tasks_in_order(served_app):
    image = png_bytes(44, 60, seed=12)
    response = post(f"{served_app.base_url}/v1/pipeline", image, params={"tasks": "derain,dehaze"})
    assert response.status_code == 200, response.text
    derain_version, dehaze_version = response.headers["X-Model-Version"].split(",")
    assert dehaze_version.startswith(f"{served_app.registered_model}/")
    assert derain_version.startswith("sha256:")
    assert response.headers["X-Batch-Size"].count(",") == 1

    # The same two models in the same order, in this process, float to float.
    derain = load_enhancer(served_app.models["derain"])
    dehaze = load_enhancer(f"models:/{dehaze_version}", tracking_uri=served_app.tracking_uri)
    expected = dehaze(derain(read_image(image).unsqueeze(0)))[0]
    assert response.content == encode_image(expected, "png")


@pytest.mark.parametrize(
    ("tasks", "status", "kind"),
    [
        ("derain,fog", 404, "unknown_task"),
        ("dehaze,dehaze", 422, "invalid_request"),
        ("derain,", 422, "invalid_request"),
    ],
)
def test_a_bad_pipeline_is_refused(served_app, tasks, status, kind):
    response = post(
        f"{served_app.base_url}/v1/pipeline", png_bytes(16, 16), params={"tasks": tasks}
    )
    assert response.status_code == status
    assert error_kind(response) == kind


def test_explain_answers_hdm_explains_figure(served_app, tmp_path):
    image = png_bytes(48, 64, seed=13)
    (tmp_path / "photo.png").write_bytes(image)
    cli = CliRunner().invoke(
        explain_command,
        [
            str(tmp_path / "photo.png"),
            "-o",
            str(tmp_path / "figure.png"),
            "--checkpoint",
            served_app.models["derain"],
        ],
    )
    assert cli.exit_code == 0, cli.output
    response = post(f"{served_app.base_url}/v1/explain/derain", image)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content == (tmp_path / "figure.png").read_bytes()


def test_explain_refuses_a_model_without_dcp_masks(served_app):
    response = post(
        f"{served_app.strict_url}/v1/explain/lowlight",
        png_bytes(32, 32),
        headers=served_app.strict_headers,
    )
    assert response.status_code == 409
    assert error_kind(response) == "explain_unsupported"
    assert "mask_source='learned'" in response.json()["error"]["message"]


def test_openapi_page_documents_the_routes(served_app):
    schema = requests.get(f"{served_app.base_url}/openapi.json", timeout=TIMEOUT_S).json()
    assert {
        "/v1/enhance/{task}",
        "/v1/pipeline",
        "/v1/explain/{task}",
        "/v1/models",
        "/healthz",
    } <= set(schema["paths"])
    enhance = schema["paths"]["/v1/enhance/{task}"]["post"]
    assert {"image/*", "multipart/form-data"} <= set(enhance["requestBody"]["content"])
    assert {"200", "400", "404", "413", "415", "503", "504"} <= set(enhance["responses"])
    assert "X-Model-Version" in enhance["responses"]["200"]["headers"]
    assert requests.get(f"{served_app.base_url}/docs", timeout=TIMEOUT_S).status_code == 200


def test_root_serves_the_web_page(served_app):
    page = resources.files("hdm_platform").joinpath("web/index.html")
    response = requests.get(f"{served_app.base_url}/", timeout=TIMEOUT_S)
    if page.is_file():
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert response.text == page.read_text(encoding="utf-8")
    else:
        assert response.status_code == 500 and error_kind(response) == "page_missing"


# --- awkward and bad input ---------------------------------------------------------------


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _awkward_images() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20x36, displayed rotated to 36x20
    sixteen_bit = np.random.default_rng(3).integers(0, 65536, (22, 18), dtype=np.uint16)
    rgba = np.dstack([_rgb(16, 24, 4), np.full((16, 24), 100, dtype=np.uint8)])
    return {
        "grayscale": _encoded(Image.fromarray(_rgb(18, 30, 1)[..., 0]), "PNG"),
        "16-bit": _encoded(Image.fromarray(sixteen_bit), "PNG"),
        "alpha": _encoded(Image.fromarray(rgba), "PNG"),
        "palette": _encoded(Image.fromarray(_rgb(20, 20, 5)).convert("P"), "GIF"),
        "cmyk": _encoded(Image.fromarray(_rgb(24, 32, 6)).convert("CMYK"), "JPEG"),
        "exif-rotated": _encoded(Image.fromarray(_rgb(20, 36, 7)), "JPEG", exif=exif),
    }


@pytest.mark.parametrize("kind", list(_awkward_images()))
def test_awkward_images_are_converted_and_answered(served_app, kind):
    data = _awkward_images()[kind]
    response = post(
        f"{served_app.base_url}/v1/enhance/lowlight",
        data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as result:
        assert result.mode == "RGB"
        assert (result.height, result.width) == decoded_size(data)
    if kind == "exif-rotated":
        assert decoded_size(data) == (36, 20)


@pytest.mark.parametrize("kind", ["alpha", "16-bit", "exif-rotated"])
def test_awkward_images_are_served_as_hdm_enhance_reads_them(served_app, kind, tmp_path, monkeypatch):
    # One decoder (hdm_platform.imageio.decode_rgb8) for Serve and hdm enhance: same bytes out.
    suffix = ".jpg" if kind == "exif-rotated" else ".png"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"photo{suffix}").write_bytes(_awkward_images()[kind])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_app.tracking_uri)
    cli = CliRunner().invoke(
        enhance_command,
        [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", served_app.models["lowlight"]],
    )
    assert cli.exit_code == 0, cli.output
    served = post(f"{served_app.base_url}/v1/enhance/lowlight", _awkward_images()[kind])
    assert served.status_code == 200, served.text
    assert served.content == (tmp_path / "out" / "photo.png").read_bytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels: a decompression bomb."""
    data = bytearray(png_bytes(1, 1))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def _chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    # A generator body: requests sends it chunked, without Content-Length.
    for start in range(0, len(data), size):
        yield data[start : start + size]


BAD_INPUT = {
    # name: (application, route, body, content type, status, kind)
    "not an image": (
        "main",
        "enhance/dehaze",
        b"hello, I am text",
        "image/png",
        400,
        "not_an_image",
    ),
    "truncated": (
        "main",
        "enhance/dehaze",
        png_bytes(64, 64)[:300],
        "image/png",
        400,
        "not_an_image",
    ),
    "empty": ("main", "enhance/dehaze", b"", "image/png", 400, "not_an_image"),
    "text type": (
        "main",
        "enhance/dehaze",
        png_bytes(8, 8),
        "text/plain",
        415,
        "unsupported_media_type",
    ),
    "svg": (
        "main",
        "enhance/dehaze",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "image/svg+xml",
        415,
        "unsupported_media_type",
    ),
    "json type": (
        "main",
        "explain/dehaze",
        b"{}",
        "application/json",
        415,
        "unsupported_media_type",
    ),
    "unknown task": ("main", "enhance/fog", png_bytes(8, 8), "image/png", 404, "unknown_task"),
    "unknown route": ("main", "sharpen/dehaze", png_bytes(8, 8), "image/png", 404, "not_found"),
    "bad format": (
        "main",
        "enhance/dehaze?format=gif",
        png_bytes(8, 8),
        "image/png",
        422,
        "invalid_request",
    ),
    "decompression bomb": (
        "main",
        "enhance/dehaze",
        _png_claiming(100_000, 100_000),
        "image/png",
        413,
        "image_too_large",
    ),
    "over the pixel limit": (
        "strict",
        "enhance/lowlight",
        smooth_png(1500, 1500),
        "image/png",
        413,
        "image_too_large",
    ),
    "over the byte limit": (
        "strict",
        "enhance/lowlight",
        os.urandom(STRICT_LIMITS["max_body_bytes"] + 1),
        "image/png",
        413,
        "payload_too_large",
    ),
    "over the byte limit, chunked": (
        "strict",
        "pipeline?tasks=lowlight",
        _chunked,
        "image/png",
        413,
        "payload_too_large",
    ),
}


def test_bad_input_gets_a_clear_json_error_and_the_replicas_stay_up(served_app):
    before = {task: replica_pids(served_app, MAIN_APP, task) for task in ("dehaze", "lowlight")}
    before["strict"] = replica_pids(served_app, STRICT_APP, "lowlight")
    failures = []
    for name, (app, route, body, content_type, status, kind) in BAD_INPUT.items():
        base, headers = (
            (served_app.base_url, {})
            if app == "main"
            else (served_app.strict_url, served_app.strict_headers)
        )
        if body is _chunked:
            body = _chunked(os.urandom(STRICT_LIMITS["max_body_bytes"] * 2))
        response = requests.post(
            f"{base}/v1/{route}",
            data=body,
            headers={"Content-Type": content_type, **headers},
            timeout=TIMEOUT_S,
        )
        if (response.status_code, error_kind(response)) != (status, kind):
            failures.append(f"{name}: {response.status_code} {response.text}")
    assert not failures, "\n".join(failures)

    # Same processes, and they still answer.
    after = {task: replica_pids(served_app, MAIN_APP, task) for task in ("dehaze", "lowlight")}
    after["strict"] = replica_pids(served_app, STRICT_APP, "lowlight")
    assert after == before
    assert post(f"{served_app.base_url}/v1/enhance/dehaze", png_bytes(24, 24)).status_code == 200


def test_multipart_without_an_image_is_refused(served_app):
    url = f"{served_app.base_url}/v1/enhance/dehaze"
    no_file = requests.post(url, files={"note": (None, "no image here")}, timeout=TIMEOUT_S)
    assert no_file.status_code == 400 and error_kind(no_file) == "bad_upload"
    text_file = requests.post(
        url, files={"file": ("notes.txt", b"text", "text/plain")}, timeout=TIMEOUT_S
    )
    assert text_file.status_code == 415 and error_kind(text_file) == "unsupported_media_type"


# --- API keys, timeouts, overload ----------------------------------------------------------


def test_without_a_valid_key_every_route_but_healthz_answers_401(served_app):
    strict = served_app.strict_url
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/enhance/lowlight"),
        ("POST", "/v1/pipeline?tasks=lowlight"),
        ("POST", "/v1/explain/lowlight"),
    ]:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": f"Basic {served_app.api_keys[0]}"},
        ):
            response = requests.request(
                method,
                f"{strict}{path}",
                data=png_bytes(8, 8),
                headers={**PNG, **headers},
                timeout=TIMEOUT_S,
            )
            assert response.status_code == 401, (method, path, headers)
            assert error_kind(response) == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{strict}/healthz", timeout=TIMEOUT_S).status_code == 200
    for key in served_app.api_keys:  # one from the key file, one from the environment
        response = requests.get(
            f"{strict}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S
        )
        assert response.status_code == 200
        assert [entry["task"] for entry in response.json()] == ["lowlight"]


# Tiled (over 1 MPix) and well over a second of CPU on the tiny model: past the strict
# application's half-second timeout on any machine; a few kilobytes, within its byte limit.
SLOW_IMAGE = smooth_png(1400, 1400)


def test_a_request_over_the_time_limit_answers_504(served_app):
    started = time.monotonic()
    response = post(
        f"{served_app.strict_url}/v1/enhance/lowlight",
        SLOW_IMAGE,
        headers=served_app.strict_headers,
    )
    assert response.status_code == 504
    assert error_kind(response) == "timeout"
    assert time.monotonic() - started < 30


def test_overload_past_the_queue_answers_503_with_retry_after(served_app):
    [pid] = replica_pids(served_app, STRICT_APP, "lowlight")
    url = f"{served_app.strict_url}/v1/enhance/lowlight"
    image = smooth_png(256, 256)
    # The strict deployment takes one request running and one queued; 32 at once overflow it.
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(
            pool.map(lambda _: post(url, image, headers=served_app.strict_headers), range(32))
        )
    overloaded = [response for response in responses if response.status_code == 503]
    assert overloaded, [response.status_code for response in responses]
    for response in overloaded:
        assert error_kind(response) == "overloaded"
        assert response.headers["Retry-After"] == str(STRICT_RETRY_AFTER_S)
    # The rest ran, or waited past the strict half-second limit on a busy machine.
    assert {response.status_code for response in responses} <= {200, 503, 504}
    assert replica_pids(served_app, STRICT_APP, "lowlight") == [pid]
    models = requests.get(
        f"{served_app.strict_url}/v1/models", headers=served_app.strict_headers, timeout=TIMEOUT_S
    )
    assert models.status_code == 200


# --- concurrency, failures, model updates --------------------------------------------------


def test_a_concurrent_burst_is_batched_without_errors(served_app):
    images = [png_bytes(48, 64, seed=seed) for seed in range(24)]
    url = f"{served_app.base_url}/v1/enhance/dehaze"
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda image: post(url, image), images))
    assert [response.status_code for response in responses] == [200] * len(images)
    for response in responses:
        with Image.open(io.BytesIO(response.content)) as result:
            assert result.size == (64, 48)
    batch_sizes = [int(response.headers["X-Batch-Size"]) for response in responses]
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 4  # batched, within max_batch_size


@dataclass
class Outcome:
    started: float
    status: int
    model_version: str | None
    kind: str | None


@dataclass
class Load:
    """``clients`` threads, each sending one request at a time until stopped."""

    url: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, seed: int) -> None:
        image = png_bytes(32, 48, seed=seed)
        while not self.stop.is_set():
            started = time.monotonic()
            response = post(self.url, image)
            kind = error_kind(response) if response.status_code != 200 else None
            self.outcomes.append(
                Outcome(
                    started, response.status_code, response.headers.get("X-Model-Version"), kind
                )
            )

    def successes(self) -> int:
        return sum(outcome.status == 200 for outcome in self.outcomes)

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status != 200]

    def wait_for(self, condition, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out; outcomes so far: {self.outcomes[-5:]}"
            time.sleep(0.2)


@contextmanager
def running_load(url: str, clients: int) -> Iterator[Load]:
    load = Load(url, clients)
    threads = [
        threading.Thread(target=load._client, args=(seed,), daemon=True) for seed in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        load.wait_for(lambda: load.successes() >= clients)
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT_S)


def test_a_killed_replica_is_replaced_and_only_requests_in_flight_fail(served_app):
    [pid] = replica_pids(served_app, MAIN_APP, "derain")
    clients = 4
    with running_load(f"{served_app.base_url}/v1/enhance/derain", clients) as load:
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        load.wait_for(
            lambda: (pids := replica_pids(served_app, MAIN_APP, "derain")) and pids != [pid]
        )
        load.wait_for(
            lambda: sum(o.status == 200 and o.started > killed_at for o in load.outcomes) >= clients
        )
    failures = load.failures()
    # Each client has one request in flight: at most that many were lost with the replica.
    assert len(failures) <= clients, failures
    assert all(
        failure.status == 503 and failure.kind == "replica_unavailable" for failure in failures
    ), failures
    assert all(failure.started < killed_at for failure in failures), failures


def test_an_alias_change_is_served_without_a_failed_request(served_app):
    name = served_app.registered_model
    new = register_tiny_model(served_app.tracking_uri, name, seed=31, alias="champion")
    new_version = f"{name}/{new.version}"
    with running_load(f"{served_app.base_url}/v1/enhance/dehaze", clients=3) as load:
        # `hdm serve reload dehaze` from a shell of the cluster's, as a user would run it:
        # the head's token, and token mode as cluster.yaml's nodes set it.
        hdm = str(Path(sys.executable).parent / "hdm")
        address = served_app.head.gcs_address
        reload = subprocess.run(
            [hdm, "serve", "reload", "dehaze", "--app", MAIN_APP, "--address", address],
            check=False,
            env={**served_app.head.env, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        reloaded_at = time.monotonic()
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert f"dehaze: a replica now serves {new_version}" in reload.stdout
        load.wait_for(lambda: sum(o.started > reloaded_at for o in load.outcomes) >= 3)
    assert load.failures() == []
    versions = {outcome.model_version for outcome in load.outcomes}
    assert new_version in versions and len(versions) == 2  # the old version, then the new one
    assert {o.model_version for o in load.outcomes if o.started > reloaded_at} == {new_version}


# --- metrics -------------------------------------------------------------------------------


def test_metrics_count_requests_latency_batches_and_errors(served_app):
    post(f"{served_app.base_url}/v1/enhance/derain", png_bytes(16, 16))
    post(f"{served_app.base_url}/v1/enhance/derain", b"not an image")
    expected = [
        "ray_hdm_http_requests_total{",
        "ray_hdm_http_request_latency_s_bucket{",
        "ray_hdm_inference_latency_s_bucket{",
        "ray_hdm_batch_size_bucket{",
        'kind="not_an_image"',
        'endpoint="enhance"',
        'task="derain"',
        "ray_serve_num_http_requests_total{",  # Serve's own
    ]
    deadline = time.monotonic() + 120
    while True:
        text = requests.get(served_app.head.metrics_url, timeout=TIMEOUT_S).text
        missing = [series for series in expected if series not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(2)


def test_serve_config_overrides_apply_before_validation():
    raw = read_serve_config(CONFIGS / "local.yaml", ["http_options.port=8123"])
    assert raw["http_options"]["port"] == 8123
    with pytest.raises(ConfigError, match="http_options"):
        read_serve_config(CONFIGS / "local.yaml", ["http_options.port=not-a-port"])


def test_a_model_with_its_own_tile_runs_in_it_and_still_batches(tmp_path):
    torch.manual_seed(0)
    tiny = hdm(blocks_per_group=1, num_groups=1, channels=8, num_regions=3, inference_tile=32)
    folder = save_checkpoint(tiny, tmp_path / "own-tile")
    loaded = load_task_model("dehaze", ModelSettings(model=str(folder), device="cpu", tile_overlap=8))
    assert loaded.tile_for(64, 80) == 32 and not loaded.runs_alone(64, 80)
    assert loaded.tile_for(1100, 1000) == 32 and loaded.runs_alone(1100, 1000)  # over 1 MPix
    images = torch.rand(2, 3, 64, 80)
    expected = load_enhancer(str(folder), tile=32, tile_overlap=8, precision=loaded.info.precision)(images)
    assert torch.equal(loaded.run(images), expected)
    whole = load_task_model("dehaze", ModelSettings(model=str(folder), device="cpu", tile=0))
    assert whole.tile_for(64, 80) is None


def test_a_served_endpoint_works_as_a_model_reference(served_app):
    """``hdm evaluate``/``compare``/``enhance`` accept the endpoint: same pixels as the checkpoint."""
    image = read_image(encode_image(torch.rand(3, 40, 52)))[None]
    served = load_enhancer(f"{served_app.base_url}/v1/enhance/derain")(image)
    local = load_enhancer(str(served_app.models["derain"]))(image)
    assert served.shape == local.shape == image.shape
    assert torch.equal((served * 255).round(), (local * 255).round())
    with pytest.raises(HTTPEnhancerError, match=r"answered 404: .*rain"):
        load_enhancer(f"{served_app.base_url}/v1/enhance/derainn")(image)


def test_the_converted_published_checkpoint_is_served_like_any_other(served_app, tmp_path):
    """The authors' weights (a file with their key names and random values), converted and
    deployed as an application of its own: the reference network's pixels over HTTP."""
    state = random_published_state(seed=5)
    checkpoint = tmp_path / "hdm-published"
    import_published(save_published_file(tmp_path / "hdm_haze_sots.pk", state), checkpoint)
    name = "published"
    application = {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "hdm_platform.serve.app:build_app",
        "args": {
            "tasks": {"dehaze": {"model": str(checkpoint), "device": "cpu", "precision": "fp32"}},
            "api_keys": {"env_var": None},
        },
        "deployments": [
            {"name": "dehaze", "ray_actor_options": {"num_cpus": 0.25}},
            {"name": "ingress", "ray_actor_options": {"num_cpus": 0.25}},
        ],
    }
    config = {**served_app.config, "applications": [*served_app.config["applications"], application]}
    head = served_app.head
    deploy(config, address=head.dashboard_url, headers=head.headers)
    try:
        wait_until_running([name], address=head.dashboard_url, headers=head.headers, timeout_s=600)
        hazy = min((REALWORLD / "dehaze" / "SOTS-indoor" / "hazy").glob("*.png"))
        image = read_image(hazy)[None, :, 100:220, 200:360]  # 120x160 of a real scene
        response = post(f"{served_app.base_url}/{name}/v1/enhance/dehaze", encode_image(image[0]))
        assert response.status_code == 200, response.text
        expected = reference_forward(state, image, dcp_region_masks(image, mode="published"))
        served = read_image(response.content)[None]
        assert served.shape == image.shape
        # Outputs equal to ~1e-6 round to the same 8-bit level or a neighbour.
        assert ((served * 255).round() - (expected.clamp(0, 1) * 255).round()).abs().max() <= 1
        [described] = requests.get(f"{served_app.base_url}/{name}/v1/models", timeout=TIMEOUT_S).json()
        assert described["parameters"] == 2_819_292
        assert described["config"]["blocks_per_group"] == 9
        assert described["config"]["dcp_mask_mode"] == "published"
    finally:
        remove_application(name, address=head.dashboard_url, headers=head.headers)
        wait_until_removed(name, address=head.dashboard_url, headers=head.headers, timeout_s=300)
