"""The HTTP API (FastAPI), built by each ingress replica around its deployment handles.

Routes (OpenAPI page at ``/docs``):

* ``POST /v1/enhance/{task}``: an image (raw body or multipart field ``file``) -> the
  enhanced image of the same size, PNG, or JPEG/WebP with ``?format=``;
* ``POST /v1/pipeline?tasks=derain,dehaze``: several tasks in order, one deployment's
  result handed to the next through chained deployment handles;
* ``POST /v1/explain/{task}``: the image's DCP priors and region masks as one PNG;
* ``GET /v1/models``: what each task serves; ``GET /healthz``; ``GET /``: the web page.

Image responses carry ``X-Model-Version`` (per stage, comma-separated: ``NAME/VERSION``
for a registered model, ``sha256:<12 hex>`` of the weights for a checkpoint folder),
``X-Inference-Time-Ms`` (time in the network, summed over stages),
``X-Processing-Time-Ms`` (the whole request), ``X-Batch-Size`` (per stage) and a W3C
``Server-Timing`` header that splits the request's time in the ingress: ``upload`` (reading
and decoding the body), ``model`` (the deployment handle calls: queueing, the tensor's
transfer, the batch wait and the network) and ``encode`` (the output image). Errors are
JSON (``errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from torchvision.transforms.functional import pil_to_tensor

from hdm_platform import __version__
from hdm_platform.imageio import encode_image
from hdm_platform.serve.auth import BearerAuthMiddleware
from hdm_platform.serve.deployments import Enhanced, ModelInfo
from hdm_platform.serve.errors import (
    ERROR_STATUS,
    APIError,
    ErrorBody,
    ExplainUnsupportedError,
    install_error_handlers,
)
from hdm_platform.serve.metrics import IngressMetrics
from hdm_platform.serve.settings import Limits
from hdm_platform.serve.uploads import FORM_FIELD, read_image_upload

__all__ = ["OPEN_PATHS", "OUTPUT_MEDIA_TYPES", "WEB_PAGE", "create_api"]

OutputFormat = Annotated[Literal["png", "jpeg", "webp"], Query(description="Output image format.")]
PipelineTasks = Annotated[
    str, Query(description="Comma-separated tasks, run in this order.", examples=["derain,dehaze"])
]
OUTPUT_MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
#: Routes that need no API key.
OPEN_PATHS = frozenset({"/healthz"})
#: The web page, inside the ``hdm_platform`` package.
WEB_PAGE = "web/index.html"

_BINARY_SCHEMA = {"type": "string", "format": "binary"}
_IMAGE_REQUEST = {
    "requestBody": {
        "required": True,
        "description": f"The image: the raw body, or the {FORM_FIELD!r} field of a form.",
        "content": {
            "image/*": {"schema": _BINARY_SCHEMA},
            "application/octet-stream": {"schema": _BINARY_SCHEMA},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FORM_FIELD: _BINARY_SCHEMA},
                    "required": [FORM_FIELD],
                }
            },
        },
    }
}
_IMAGE_HEADERS = {
    "X-Model-Version": {
        "description": "Per stage: NAME/VERSION (registry) or sha256:<12 hex> (checkpoint).",
        "schema": {"type": "string"},
    },
    "X-Inference-Time-Ms": {"description": "Time in the network(s).", "schema": {"type": "number"}},
    "X-Processing-Time-Ms": {
        "description": "Time for the whole request.",
        "schema": {"type": "number"},
    },
    "X-Batch-Size": {
        "description": "Per stage: images in the batch.",
        "schema": {"type": "string"},
    },
    "Server-Timing": {
        "description": "Milliseconds in the ingress: upload (read + decode), model (the "
        "handle calls), encode.",
        "schema": {"type": "string"},
    },
}
_UPLOAD_ERRORS = (
    "not_an_image",
    "bad_upload",
    "payload_too_large",
    "image_too_large",
    "unsupported_media_type",
)
_SERVING_ERRORS = ("unknown_task", "overloaded", "replica_unavailable", "timeout")


def _responses(success: dict[str, Any], *kinds: str) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {200: success}
    for kind in kinds:
        status = ERROR_STATUS[kind]
        entry = responses.setdefault(status, {"model": ErrorBody, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], kind]))
    return responses


def _image_success(media_types: Sequence[str]) -> dict[str, Any]:
    return {
        "description": "The enhanced image, the same size as the input.",
        "content": {media_type: {} for media_type in media_types},
        "headers": _IMAGE_HEADERS,
    }


def _retry_after(seconds: float | None, default: int) -> dict[str, str]:
    return {"Retry-After": str(math.ceil(seconds) if seconds is not None else default)}


async def _result(responses: Sequence[DeploymentResponse], limits: Limits) -> Any:
    """The last response of a chain, with Serve's failures as ``APIError``s; if the request
    is abandoned (timeout, client gone) the whole chain is cancelled in the replicas."""
    try:
        return await responses[-1]
    except asyncio.CancelledError:
        for response in responses:
            response.cancel()
        raise
    except BackPressureError as error:
        raise APIError(
            "overloaded",
            f"too many requests are waiting; retry later ({error.message})",
            headers=_retry_after(error.retry_after_s, limits.retry_after_s),
        ) from None
    except (DeploymentUnavailableError, RayActorError) as error:
        # A replica that died with the request in it; Serve starts another.
        raise APIError(
            "replica_unavailable",
            f"the model replica is unavailable; retry ({type(error).__name__})",
            headers=_retry_after(None, limits.retry_after_s),
        ) from None


@contextlib.asynccontextmanager
async def _deadline(seconds: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise APIError("timeout", f"the request took longer than {seconds:g} s") from None


async def _image_response(
    responses: Sequence[DeploymentResponse],
    output_format: str,
    limits: Limits,
    started: float,
    uploaded: float,
) -> Response:
    """The enhanced image that ends a chain of deployment responses, encoded, with the
    per-stage headers; ``started`` and ``uploaded`` are when the request came in and when
    its image was decoded (``time.perf_counter()``)."""
    result: Enhanced = await _result(responses, limits)
    answered = time.perf_counter()
    body = await asyncio.to_thread(encode_image, result.image, output_format)
    encoded = time.perf_counter()
    stages = result.stages
    headers = {
        "X-Model-Version": ",".join(stage.model_version for stage in stages),
        "X-Inference-Time-Ms": f"{sum(stage.inference_ms for stage in stages):.1f}",
        "X-Processing-Time-Ms": f"{(encoded - started) * 1000.0:.1f}",
        "X-Batch-Size": ",".join(str(stage.batch_size) for stage in stages),
        "Server-Timing": (
            f"upload;dur={(uploaded - started) * 1000.0:.1f}, "
            f"model;dur={(answered - uploaded) * 1000.0:.1f}, "
            f"encode;dur={(encoded - answered) * 1000.0:.1f}"
        ),
    }
    return Response(body, media_type=OUTPUT_MEDIA_TYPES[output_format], headers=headers)


class _ServedTasks:
    """The tasks this server runs: their model deployments, and their label in metrics."""

    def __init__(self, models: Mapping[str, DeploymentHandle]) -> None:
        self.models = models

    def handle(self, task: str) -> DeploymentHandle:
        if task not in self.models:
            raise APIError(
                "unknown_task", f"no task {task!r}; this server runs {', '.join(sorted(self.models))}"
            )
        return self.models[task]

    def label(self, *tasks: str) -> str:
        # Metric tags stay a small set: a task the server lacks is counted as "unknown".
        return "+".join(tasks) if all(task in self.models for task in tasks) else "unknown"


def create_api(
    models: Mapping[str, DeploymentHandle],
    limits: Limits,
    api_keys: frozenset[str],
    metrics: IngressMetrics,
) -> FastAPI:
    """The FastAPI app over ``models`` (task -> handle of its model deployment)."""
    app = FastAPI(
        title="HDM image enhancement",
        version=__version__,
        description=(
            "Dehazing, deraining and low-light enhancement with HDM. Send an image, get the "
            "enhanced image back. Every error is JSON: "
            '`{"error": {"kind": "...", "message": "..."}}`. '
            + ("Every route but /healthz needs `Authorization: Bearer <key>`." if api_keys else "")
        ),
    )
    install_error_handlers(app)
    if api_keys:
        app.add_middleware(
            BearerAuthMiddleware,
            keys=api_keys,
            open_paths=OPEN_PATHS,
            on_reject=lambda: metrics.record("any", "", 401, 0.0, "unauthorized"),
        )
    served = _ServedTasks(models)
    _add_status_routes(app, served, limits, metrics)
    _add_image_routes(app, served, limits, metrics)
    return app


def _add_status_routes(app: FastAPI, served: _ServedTasks, limits: Limits, metrics: IngressMetrics) -> None:
    """``/healthz``, the web page and ``/v1/models``."""

    @app.get("/healthz", summary="Liveness of the ingress; needs no API key.")
    async def healthz() -> dict[str, Any]:
        with metrics.track("healthz"):
            return {"status": "ok", "tasks": sorted(served.models)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page() -> HTMLResponse:
        with metrics.track("page"):
            page = resources.files("hdm_platform").joinpath(WEB_PAGE)
            if not page.is_file():
                raise APIError(
                    "page_missing", f"the web page hdm_platform/{WEB_PAGE} is not installed"
                )
            return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get(
        "/v1/models",
        summary="The model each task serves.",
        response_model=list[ModelInfo],
        responses=_responses(
            {"description": "One entry per task."}, "overloaded", "replica_unavailable", "timeout"
        ),
    )
    async def list_models() -> list[ModelInfo]:
        with metrics.track("models"):
            async with _deadline(limits.request_timeout_s):
                handles = [served.models[task] for task in sorted(served.models)]
                return list(
                    await asyncio.gather(
                        *(_result([handle.describe.remote()], limits) for handle in handles)
                    )
                )



def _add_image_routes(app: FastAPI, served: _ServedTasks, limits: Limits, metrics: IngressMetrics) -> None:
    """``/v1/enhance/{task}``, ``/v1/pipeline`` and ``/v1/explain/{task}``: an image in."""
    enhanced_image = _image_success(list(OUTPUT_MEDIA_TYPES.values()))

    @app.post(
        "/v1/enhance/{task}",
        summary="Enhance one image with a task's model.",
        response_class=Response,
        openapi_extra=_IMAGE_REQUEST,
        responses=_responses(enhanced_image, *_UPLOAD_ERRORS, *_SERVING_ERRORS),
    )
    async def enhance(task: str, request: Request, format: OutputFormat = "png") -> Response:
        with metrics.track("enhance", served.label(task)):
            started = time.perf_counter()
            handle = served.handle(task)
            async with _deadline(limits.request_timeout_s):
                image = await read_image_upload(request, limits)
                return await _image_response(
                    [handle.enhance.remote(image)], format, limits, started, time.perf_counter()
                )

    @app.post(
        "/v1/pipeline",
        summary="Run several tasks in order on one image (e.g. derain, then dehaze).",
        response_class=Response,
        openapi_extra=_IMAGE_REQUEST,
        responses=_responses(enhanced_image, "invalid_request", *_UPLOAD_ERRORS, *_SERVING_ERRORS),
    )
    async def pipeline(
        request: Request, tasks: PipelineTasks, format: OutputFormat = "png"
    ) -> Response:
        order = [task.strip() for task in tasks.split(",")]
        with metrics.track("pipeline", served.label(*order)):
            started = time.perf_counter()
            if "" in order or len(set(order)) != len(order):
                raise APIError(
                    "invalid_request", f"tasks={tasks!r}: name each task once, comma-separated"
                )
            handles = [served.handle(task) for task in order]
            async with _deadline(limits.request_timeout_s):
                image = await read_image_upload(request, limits)
                uploaded = time.perf_counter()
                # Each response is the next deployment's argument: Serve hands the result
                # from replica to replica without bringing it back here in between.
                responses: list[DeploymentResponse] = []
                upstream: Any = image
                for handle in handles:
                    upstream = handle.enhance.remote(upstream)
                    responses.append(upstream)
                return await _image_response(responses, format, limits, started, uploaded)

    @app.post(
        "/v1/explain/{task}",
        summary="The image's dark channel, transmission and region masks (paper Figure 1), as PNG.",
        response_class=Response,
        openapi_extra=_IMAGE_REQUEST,
        responses=_responses(
            {"description": "The figure.", "content": {"image/png": {}}},
            "explain_unsupported",
            *_UPLOAD_ERRORS,
            *_SERVING_ERRORS,
        ),
    )
    async def explain(task: str, request: Request) -> Response:
        with metrics.track("explain", served.label(task)):
            handle = served.handle(task)
            async with _deadline(limits.request_timeout_s):
                image = await read_image_upload(request, limits)
                try:
                    figure = await _result([handle.explain.remote(image)], limits)
                except ExplainUnsupportedError as error:
                    # Raised in the replica: Ray's wrapper keeps the original as its cause.
                    raise APIError(
                        "explain_unsupported", str(getattr(error, "cause", error))
                    ) from None
                pixels = pil_to_tensor(figure).float() / 255.0
                body = await asyncio.to_thread(encode_image, pixels, "png")
            return Response(body, media_type="image/png")

