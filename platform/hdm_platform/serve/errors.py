"""Every failure the HTTP API reports, as JSON: ``{"error": {"kind": ..., "message": ...}}``.

The ``kind`` is stable (clients and the ``hdm_http_errors`` metric use it); the message is
for people. Routes raise :class:`APIError`; :func:`install_error_handlers` turns it, and
FastAPI's own errors (unknown route, bad query parameter, an unexpected exception), into
that shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

__all__ = [
    "ERROR_STATUS",
    "APIError",
    "ErrorBody",
    "ExplainUnsupportedError",
    "error_response",
    "install_error_handlers",
]

#: Each error kind and its HTTP status.
ERROR_STATUS: dict[str, int] = {
    "not_an_image": 400,  # undecodable, truncated or empty upload
    "bad_upload": 400,  # a malformed multipart form, or one without the image field
    "invalid_request": 422,  # a bad query or path parameter
    "unauthorized": 401,  # missing or wrong API key
    "not_found": 404,  # no such route
    "unknown_task": 404,  # a task this application does not serve
    "method_not_allowed": 405,
    "explain_unsupported": 409,  # the model's masks are not DCP masks
    "payload_too_large": 413,  # more bytes than limits.max_body_bytes
    "image_too_large": 413,  # more pixels than limits.max_pixels, decompression bombs included
    "unsupported_media_type": 415,  # a body that is not an image upload
    "internal": 500,
    "page_missing": 500,  # the web page is not installed
    "overloaded": 503,  # the task's queue is full (max_queued_requests); has Retry-After
    "replica_unavailable": 503,  # the replica died mid-request or none is running; has Retry-After
    "timeout": 504,  # over limits.request_timeout_s
}


class ErrorDetail(BaseModel):
    kind: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response (for the OpenAPI page)."""

    error: ErrorDetail


class APIError(Exception):
    """A request that fails with ``kind`` (a key of :data:`ERROR_STATUS`)."""

    def __init__(self, kind: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = ERROR_STATUS[kind]
        self.message = message
        self.headers = headers or {}


class ExplainUnsupportedError(ValueError):
    """Raised by a model replica asked to explain a model whose masks are not DCP masks."""


def error_response(error: APIError) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(kind=error.kind, message=error.message))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


_HTTP_KINDS = {404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the JSON shape above."""

    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(error.status_code, "invalid_request")
        response = error_response(APIError(kind, str(error.detail)))
        response.status_code = error.status_code
        return response

    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return error_response(APIError("invalid_request", problems))

    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        # Starlette raises the error again after this answer: Serve logs it with its traceback.
        return error_response(APIError("internal", f"internal error: {type(error).__name__}"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
