"""The image in a request: its type, its byte and pixel limits, and its decoding.

A request carries the image as its raw body (``Content-Type: image/*`` or
``application/octet-stream``) or as the ``file`` field of a ``multipart/form-data`` form.
The byte limit is checked against ``Content-Length`` before anything is read and again
while reading, so a chunked upload cannot exceed it either. Decoding is ``hdm enhance``'s
(``hdm_platform.imageio.read_image``): by content, EXIF orientation applied, grayscale,
alpha, 16-bit, palette and CMYK converted to RGB, and the pixel limit checked from the
header before any pixel is decoded, which stops decompression bombs.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from torch import Tensor

from hdm_platform.imageio import ImageDecodeError, ImageTooLargeError, read_image
from hdm_platform.serve.errors import APIError
from hdm_platform.serve.settings import Limits

__all__ = ["FORM_FIELD", "read_image_upload"]

#: The multipart form field that holds the image.
FORM_FIELD = "file"

_MULTIPART = "multipart/form-data"
_BINARY = "application/octet-stream"
# image/* types that are not raster images PIL decodes.
_NOT_RASTER = frozenset({"image/svg+xml"})


def _media_type(content_type: str | None) -> str:
    return (content_type or _BINARY).split(";", 1)[0].strip().lower()


def _check_image_type(media_type: str, what: str) -> None:
    if media_type == _BINARY or (media_type.startswith("image/") and media_type not in _NOT_RASTER):
        return
    raise APIError(
        "unsupported_media_type",
        f"{what} has type {media_type!r}; send a raster image as the body (image/* or "
        f"{_BINARY}) or as the {FORM_FIELD!r} field of a {_MULTIPART} form",
    )


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(
            "payload_too_large", f"the body is {declared} bytes; the limit is {max_bytes}"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError("payload_too_large", f"the body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_file(request: Request, body: bytes) -> bytes:
    async def replay_body() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    # The body is already read (within the byte limit); Starlette's parser reads it again
    # from this replay instead of the socket.
    try:
        form = await Request(request.scope, replay_body).form(max_files=1, max_fields=8)
    except HTTPException as error:
        raise APIError("bad_upload", f"malformed {_MULTIPART} body: {error.detail}") from None
    try:
        upload = form.get(FORM_FIELD)
        if not isinstance(upload, UploadFile):
            raise APIError("bad_upload", f"the form has no {FORM_FIELD!r} file field")
        _check_image_type(_media_type(upload.content_type), f"the {FORM_FIELD!r} field")
        return await upload.read()
    finally:
        await form.close()


async def read_image_upload(request: Request, limits: Limits) -> Tensor:
    """The request's image as ``[3, H, W]`` float32 RGB in [0, 1], or an ``APIError``."""
    media_type = _media_type(request.headers.get("content-type"))
    if media_type != _MULTIPART:
        _check_image_type(media_type, "the body")
    data = await _read_body(request, limits.max_body_bytes)
    if media_type == _MULTIPART:
        data = await _form_file(request, data)
    if not data:
        raise APIError("not_an_image", "the upload is empty")
    try:
        # Decoding a large photo takes a while: off the event loop, which keeps serving.
        return await asyncio.to_thread(
            read_image, data, max_pixels=limits.max_pixels, name="upload"
        )
    except ImageTooLargeError as error:
        raise APIError("image_too_large", str(error)) from None
    except ImageDecodeError as error:
        raise APIError("not_an_image", str(error)) from None
