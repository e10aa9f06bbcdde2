"""Image decoding and encoding shared by the CLI, data ingest and the HTTP server.

Decoding goes by content, never by file extension, and turns every common PIL mode into
RGB float32 in [0, 1]: EXIF orientation applied, grayscale/palette/CMYK converted, 16-bit
grayscale kept at 16-bit precision, transparency composited over white. Oversized images
are refused from their header, before any pixel is decoded, so an upload that declares
100000 x 100000 pixels costs nothing.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "ImageError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "IMAGE_SUFFIXES",
    "read_image",
    "write_image",
    "encode_image",
]

#: File suffixes the CLI and ingest treat as images when they scan folders.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)

_ENCODE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


class ImageDecodeError(ImageError):
    """Not an image, truncated, or in a pixel format that has no RGB meaning."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed, detected from the header before decoding."""


def _open(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1] from any supported PIL mode."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL has no 16-bit RGB mode, but 16-bit grayscale survives as I;16 / I. Mode I
        # (32-bit integers) is read as 16-bit data, which is how PIL opens 16-bit files.
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels have no defined [0, 1] range")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = image.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def read_image(
    source: str | Path | bytes, *, max_pixels: int | None = None, name: str | None = None
) -> Tensor:
    """Decode an image file or its bytes to ``[3, H, W]`` float32 RGB in [0, 1].

    ``name`` labels errors (defaults to the path, or ``<bytes>``). Raises
    ``ImageTooLargeError`` when ``width * height > max_pixels`` (or beyond PIL's
    decompression-bomb limit) and ``ImageDecodeError`` for anything unreadable.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        # PIL warns between its limit and twice its limit; treat both as too large.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: {width}x{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}"
                    )
                image.load()
                array = _to_rgb_array(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{label}: {error}") from error
    except FileNotFoundError as error:
        raise ImageDecodeError(f"{label}: no such file") from error
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # PIL reports truncated data as OSError, some corrupt headers as SyntaxError.
        raise ImageDecodeError(f"{label}: cannot decode image: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _to_pil(image: Tensor) -> Image.Image:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image shaped [3, H, W], got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a floating-point image in [0, 1], got {image.dtype}")
    pixels = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def _pil_format(format: str) -> str:
    try:
        return _ENCODE_FORMATS[format.lower().lstrip(".")]
    except KeyError:
        raise ValueError(
            f"unsupported image format {format!r}; use one of {sorted(_ENCODE_FORMATS)}"
        ) from None


def encode_image(image: Tensor, format: str = "png", quality: int = 95) -> bytes:
    """Encode ``[3, H, W]`` floats in [0, 1] as PNG, JPEG or WebP bytes (8 bits per channel).

    ``quality`` applies to JPEG and WebP.
    """
    pil_format = _pil_format(format)
    options = {} if pil_format == "PNG" else {"quality": quality}
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def write_image(
    image: Tensor, path: str | Path, *, format: str | None = None, quality: int = 95
) -> Path:
    """Write ``[3, H, W]`` floats in [0, 1] atomically: a temp file, then ``os.replace``.

    The format comes from ``format`` or else the file suffix (png, jpg/jpeg, webp).
    """
    path = Path(path)
    if format is None and not path.suffix:
        raise ValueError(f"{path}: no file suffix to take the image format from; pass format=")
    data = encode_image(image, format=format or path.suffix, quality=quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A uniquely named sibling opened with "x" gets the umask's permissions (mkstemp's are
    # 0600) and lives on the same file system, so os.replace is an atomic rename.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
