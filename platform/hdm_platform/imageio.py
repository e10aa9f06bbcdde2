"""The one image decoder and encoder of the platform: ingest, the training pipeline,
``hdm evaluate``, ``hdm enhance``, the batch path and the HTTP server all decode here.

The rule, chosen once: decoding goes by content, never by file extension, and gives 8-bit
RGB as the image is displayed:

* EXIF orientation applied (a phone photo comes out upright, and its width and height are
  those of the upright picture);
* transparency (an alpha channel or a PNG ``tRNS`` colour) composited over white;
* grayscale, palette and CMYK converted to RGB;
* 16-bit samples rounded to 8 bits (``round(v / 257)``): the network is trained on 8-bit
  pairs, so every path feeds it the same 256 levels.

Opaque 8-bit PNGs without EXIF (nearly every paired benchmark) decode through libspng
(``pyspng``, the PNG decoder of NVlabs' StyleGAN2-ADA/StyleGAN3 loaders: 5.0-5.5 ms for a
512 x 512 photo on one core against 7.2-7.5 ms with torchvision's libpng, bench/RESULTS.md);
JPEGs and 16-bit opaque PNGs through torchvision's libjpeg-turbo/libpng decoders; anything
else through PIL. Each path gives PIL's pixels for the images it takes
(tests/test_imageio.py). Oversized images are refused from their header, before any pixel
is decoded, so an upload that declares 100000 x 100000 pixels costs nothing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyspng
import torch
from PIL import Image, ImageOps
from torch import Tensor

from hdm_model.atomic import write_bytes_atomically

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDecodeError",
    "ImageError",
    "ImageInfo",
    "ImageTooLargeError",
    "decode_rgb8",
    "encode_image",
    "probe_image",
    "read_image",
    "write_image",
]

#: File suffixes the CLI and ingest treat as images when they scan folders.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)

_ENCODE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# A PNG's first chunk is IHDR; its bit depth is byte 24 of the file.
_PNG_BIT_DEPTH_OFFSET = 24
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


class ImageDecodeError(ImageError):
    """Not an image, truncated, or in a pixel format that has no RGB meaning."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed, detected from the header before decoding."""


class ImageInfo(NamedTuple):
    """What ingest records of a file: PIL's format name and the displayed (upright) size."""

    format: str
    width: int
    height: int


def _is_rotated(header: Image.Image) -> bool:
    # Read from the header only: PngImageFile.getexif() would decode the whole image when
    # the eXIf chunk is missing.
    if header.format == "PNG":
        exif_bytes = header.info.get("exif")
        if not exif_bytes:
            return False
        exif = Image.Exif()
        exif.load(exif_bytes)
    else:
        exif = header.getexif()
    return exif.get(_EXIF_ORIENTATION, 1) != 1


def _native_decoder(header: Image.Image, data: bytes) -> str | None:
    """``"spng"``, ``"torchvision"`` or ``None`` (PIL) for an image whose header is open."""
    if header.format not in ("PNG", "JPEG") or _is_rotated(header):
        return None
    if header.format == "JPEG":
        return "torchvision"
    if header.mode in _ALPHA_MODES or "transparency" in header.info:
        return None
    eight_bit = data[_PNG_BIT_DEPTH_OFFSET : _PNG_BIT_DEPTH_OFFSET + 1] <= b"\x08"
    return "spng" if eight_bit else "torchvision"


def _decode_native(decoder: str, data: bytes) -> np.ndarray:
    if decoder == "spng":
        return pyspng.load(data, format="RGB")
    # Imported here: torchvision's package import (its models and ops, torch._dynamo) takes
    # seconds, which every Ray worker that reads only 8-bit PNGs would otherwise pay.
    from torchvision.io import ImageReadMode, decode_image

    pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if pixels.dtype == torch.uint16:
        pixels = pixels.to(torch.float32).div_(257.0).round_().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def _decode_with_pil(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 from any supported PIL mode, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL has no 16-bit RGB mode, but 16-bit grayscale survives as I;16 / I. Mode I
        # (32-bit integers) is read as 16-bit data, which is how PIL opens 16-bit files.
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 65535.0) / 257.0
        return np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels have no defined [0, 1] range")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"))  # writable, as torch.from_numpy wants


def _decode(data: bytes, label: str, max_pixels: int | None) -> tuple[str, np.ndarray]:
    """``(PIL format, [H, W, 3] uint8)``; errors name ``label``."""
    try:
        # PIL warns between its limit and twice its limit; treat both as too large.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: {width}x{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}"
                    )
                image_format = image.format or "unknown"
                decoder = _native_decoder(image, data)
                if decoder is None:
                    image.load()
                    return image_format, _decode_with_pil(image)
            return image_format, _decode_native(decoder, data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{label}: {error}") from error
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as error:
        # PIL reports truncated data as OSError, some corrupt headers as SyntaxError;
        # torchvision's decoders raise RuntimeError.
        raise ImageDecodeError(f"{label}: cannot decode image: {error}") from error


def _read_source(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, name or "<bytes>"
    label = name or str(source)
    try:
        return Path(source).read_bytes(), label
    except FileNotFoundError as error:
        raise ImageDecodeError(f"{label}: no such file") from error
    except OSError as error:
        raise ImageDecodeError(f"{label}: cannot read: {error}") from error


def decode_rgb8(
    source: str | Path | bytes, *, max_pixels: int | None = None, name: str | None = None
) -> np.ndarray:
    """Decode an image file or its bytes to ``[H, W, 3]`` uint8 RGB (the module's rule).

    ``name`` labels errors (defaults to the path, or ``<bytes>``). Raises
    ``ImageTooLargeError`` when ``width * height > max_pixels`` (or beyond PIL's
    decompression-bomb limit) and ``ImageDecodeError`` for anything unreadable.
    """
    data, label = _read_source(source, name)
    return _decode(data, label, max_pixels)[1]


def read_image(
    source: str | Path | bytes, *, max_pixels: int | None = None, name: str | None = None
) -> Tensor:
    """:func:`decode_rgb8` as ``[3, H, W]`` float32 in [0, 1] (what the network takes)."""
    pixels = decode_rgb8(source, max_pixels=max_pixels, name=name)
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0).contiguous()


def probe_image(data: bytes, name: str) -> ImageInfo:
    """Decode ``data`` fully (so truncated pixel data is caught at ingest) and describe it."""
    try:
        image_format, pixels = _decode(data, name, None)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"unreadable image {error}") from error
    return ImageInfo(format=image_format, width=pixels.shape[1], height=pixels.shape[0])


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
    """Write ``[3, H, W]`` floats in [0, 1] atomically (:mod:`hdm_model.atomic`).

    The format comes from ``format`` or else the file suffix (png, jpg/jpeg, webp).
    """
    path = Path(path)
    if format is None and not path.suffix:
        raise ValueError(f"{path}: no file suffix to take the image format from; pass format=")
    data = encode_image(image, format=format or path.suffix, quality=quality)
    write_bytes_atomically(path, data)
    return path
