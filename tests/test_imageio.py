"""read_image / write_image / encode_image: content-sniffed decoding of every common mode."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hdm_platform.imageio import (
    ImageDecodeError,
    ImageError,
    ImageTooLargeError,
    decode_rgb8,
    encode_image,
    probe_image,
    read_image,
    write_image,
)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _raw_png(width: int, height: int, *, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG assembled by hand, for layouts PIL cannot write (48-bit RGB, lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _save(image: Image.Image, path: Path, format: str, **options) -> Path:
    image.save(path, format=format, **options)
    return path


def _pixels(seed: int = 0, size: tuple[int, int] = (8, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = _pixels()
    path = _save(Image.fromarray(pixels), tmp_path / "a.png", "PNG")
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 8, 12)
    np.testing.assert_array_equal(np.round(image.permute(1, 2, 0).numpy() * 255), pixels)


def test_decodes_by_content_not_extension(tmp_path):
    pixels = _pixels(1)
    liar = _save(Image.fromarray(pixels), tmp_path / "photo.jpg", "BMP")
    np.testing.assert_array_equal(np.round(read_image(liar).permute(1, 2, 0).numpy() * 255), pixels)


def test_jpeg_and_bytes_input(tmp_path):
    flat = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(flat).save(buffer, format="JPEG", quality=95)
    image = read_image(buffer.getvalue(), name="upload.jpg")
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([200, 100, 50]) / 255, atol=3 / 255, rtol=0)


def test_grayscale_and_bilevel_become_three_equal_channels(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    image = read_image(_save(Image.fromarray(grey), tmp_path / "g.png", "PNG"))
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image[0], torch.from_numpy(grey) / 255.0)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])

    bilevel = Image.fromarray(grey > 100).convert("1")
    image = read_image(_save(bilevel, tmp_path / "b.png", "PNG"))
    assert set(image.unique().tolist()) == {0.0, 1.0}


def test_palette_and_palette_transparency(tmp_path):
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    image = read_image(_save(palette, tmp_path / "p.png", "PNG"))
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(image[:, 0, 3], torch.tensor([0.0, 0.0, 1.0]))

    palette.info["transparency"] = 1  # index 1 (blue) transparent: composited over white
    image = read_image(_save(palette, tmp_path / "pt.png", "PNG", transparency=1))
    torch.testing.assert_close(image[:, 0, 3], torch.ones(3))
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3] = 0, 255, 128
    image = read_image(_save(Image.fromarray(rgba), tmp_path / "a.png", "PNG"))
    assert image.shape == (3, 2, 3)
    torch.testing.assert_close(image[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(image[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(image[:, 0, 2], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=1 / 255, rtol=0)

    grey_alpha = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8))
    image = read_image(_save(grey_alpha, tmp_path / "la.png", "PNG"))
    torch.testing.assert_close(image[:, 0], torch.tensor([[1.0, 0.0]] * 3))


def test_cmyk_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan ink
    image = read_image(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100))
    torch.testing.assert_close(image[:, 4, 4], torch.tensor([0.0, 1.0, 1.0]), atol=3 / 255, rtol=0)


def test_sixteen_bit_grayscale_is_rounded_to_eight_bits(tmp_path):
    # Every path feeds the network the 256 levels it was trained on (the module's rule).
    values = np.array([[0, 1000, 1001, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png", "PNG")
    image = read_image(path)
    expected = torch.from_numpy(np.round(values.astype(np.float32) / 257.0) / 255.0)
    torch.testing.assert_close(image[0], expected)
    assert torch.equal(image[0], image[2])


def test_sixteen_bit_rgb_png_is_rounded_to_eight_bits(tmp_path):
    samples = [0x0000, 0x8000, 0xFFFF, 0x4020, 0x0101, 0xC0FF]
    rows = b"\x00" + struct.pack(">6H", *samples)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_raw_png(2, 1, bit_depth=16, colour_type=2, rows=rows))
    image = read_image(path)
    expected = torch.tensor([round(sample / 257) for sample in samples], dtype=torch.float32) / 255
    torch.testing.assert_close(image.permute(1, 2, 0).flatten(), expected)


def test_probe_reports_the_upright_size_and_the_format(tmp_path):
    stored = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(stored, tmp_path / "r.jpg", "JPEG", exif=exif).read_bytes()
    assert probe_image(data, "r.jpg") == ("JPEG", 20, 40)
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        probe_image(data[: len(data) // 2], "cut.jpg")


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(stored), tmp_path / "rotated.jpg", "JPEG", quality=95, exif=exif)
    image = read_image(path)
    assert image.shape == (3, 40, 20)
    assert image[0, 5, 10] > 0.9 and image[2, 5, 10] < 0.1  # the left half is now on top
    assert image[2, 35, 10] > 0.9 and image[0, 35, 10] < 0.1


def test_truncated_png_names_the_file(tmp_path):
    data = encode_image(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        read_image(path)


def test_non_image_and_missing_file_are_decode_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("definitely not pixels")
    with pytest.raises(ImageDecodeError, match="notes.png"):
        read_image(text)
    with pytest.raises(ImageDecodeError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="upload-7"):
        read_image(b"\x00\x01garbage", name="upload-7")


def test_float_pixels_are_rejected(tmp_path):
    path = _save(Image.fromarray(np.full((4, 4), 3.5, dtype=np.float32)), tmp_path / "f.tif", "TIFF")
    with pytest.raises(ImageDecodeError, match="floating-point"):
        read_image(path)


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    # The header claims 100000 x 100000 pixels; the data is a single row.
    path = tmp_path / "bomb.png"
    path.write_bytes(_raw_png(100_000, 100_000, bit_depth=8, colour_type=2, rows=b"\x00" * 301))
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image(path, max_pixels=4096 * 4096)
    # With no limit of ours, PIL's decompression-bomb guard still refuses it.
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image(path)
    assert time.perf_counter() - started < 1.0


def test_max_pixels_applies_to_ordinary_images(tmp_path):
    path = _save(Image.fromarray(_pixels()), tmp_path / "small.png", "PNG")
    with pytest.raises(ImageTooLargeError, match="12x8 = 96 pixels"):
        read_image(path, max_pixels=95)
    assert read_image(path, max_pixels=96).shape == (3, 8, 12)
    assert issubclass(ImageTooLargeError, ValueError) and issubclass(ImageDecodeError, ImageError)


@pytest.mark.parametrize("format", ["png", "jpeg", "webp"])
def test_encode_image_formats_decode_back(format):
    image = torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16)
    data = encode_image(image, format=format, quality=100)
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[format]
    tolerance = 0.0 if format == "png" else 0.06
    torch.testing.assert_close(read_image(data), (image * 255).round() / 255, atol=tolerance, rtol=0)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="gif"):
        encode_image(torch.zeros(3, 4, 4), format="gif")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        encode_image(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        encode_image(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_write_image_is_atomic_and_takes_the_format_from_suffix_or_argument(tmp_path):
    image = torch.rand(3, 10, 14, generator=torch.Generator().manual_seed(2))
    target = tmp_path / "out" / "result.png"
    assert write_image(image, target) == target
    torch.testing.assert_close(read_image(target), (image * 255).round() / 255)

    write_image(torch.zeros(3, 10, 14), target)  # replaces the old file in one rename
    assert read_image(target).max() == 0.0

    explicit = write_image(image, tmp_path / "out" / "no-suffix", format="jpeg")
    assert Image.open(explicit).format == "JPEG"
    assert Image.open(write_image(image, tmp_path / "out" / "x.webp")).format == "WEBP"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["no-suffix", "result.png", "x.webp"]

    with pytest.raises(ValueError, match="no file suffix"):
        write_image(image, tmp_path / "out" / "bare")
    with pytest.raises(ValueError, match="tiff"):
        write_image(image, tmp_path / "out" / "x.tiff")


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return exif


def _photo_like() -> np.ndarray:
    """Smooth RGB content (an upscaled random image), so JPEG keeps chroma detail."""
    noise = np.random.default_rng(0).integers(0, 256, (19, 27, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((54, 38), Image.Resampling.BILINEAR))


_MODES = {
    "png-rgb": lambda rgb: _encoded(Image.fromarray(rgb), "PNG"),
    "png-grey": lambda rgb: _encoded(Image.fromarray(rgb[..., 0]), "PNG"),
    "png-1-bit": lambda rgb: _encoded(Image.fromarray(rgb[..., 0] > 128), "PNG"),
    "png-grey-transparency": lambda rgb: _encoded(Image.fromarray(rgb[..., 0]), "PNG", transparency=5),
    "png-rgb-transparency": lambda rgb: _encoded(Image.fromarray(rgb), "PNG", transparency=(10, 20, 30)),
    "png-palette-4-bit": lambda rgb: _encoded(Image.fromarray(rgb).quantize(16), "PNG", bits=4),
    "png-palette": lambda rgb: _encoded(Image.fromarray(rgb).quantize(64), "PNG"),
    "png-palette-transparency": lambda rgb: _encoded(Image.fromarray(rgb).quantize(64), "PNG", transparency=0),
    "png-rgba": lambda rgb: _encoded(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
    "png-grey-alpha": lambda rgb: _encoded(Image.fromarray(rgb).convert("LA"), "PNG"),
    "jpeg-rgb": lambda rgb: _encoded(Image.fromarray(rgb), "JPEG", quality=90),
    "jpeg-progressive": lambda rgb: _encoded(Image.fromarray(rgb), "JPEG", progressive=True),
    "jpeg-grey": lambda rgb: _encoded(Image.fromarray(rgb[..., 0]), "JPEG"),
    "jpeg-cmyk": lambda rgb: _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
    "jpeg-exif-rotated": lambda rgb: _encoded(Image.fromarray(rgb), "JPEG", exif=_rotated_exif()),
    "png-exif-rotated": lambda rgb: _encoded(Image.fromarray(rgb), "PNG", exif=_rotated_exif()),
    "bmp": lambda rgb: _encoded(Image.fromarray(rgb), "BMP"),
    "webp-lossless": lambda rgb: _encoded(Image.fromarray(rgb), "WEBP", lossless=True),
}


def _displayed_by_pil(data: bytes) -> np.ndarray:
    """PIL's picture of ``data`` under the module's rule: upright, transparency over white."""
    with Image.open(io.BytesIO(data)) as image:
        rgba = ImageOps.exif_transpose(image).convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_decode_rgb8_gives_pils_displayed_pixels_for_every_8_bit_mode(mode):
    # Opaque 8-bit PNG goes through libspng, JPEG through torchvision, everything else
    # through PIL; the pixels must not depend on which, so every file is seen as PIL shows it.
    data = _MODES[mode](_photo_like())
    decoded = decode_rgb8(data)
    expected = _displayed_by_pil(data)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


def test_decode_rgb8_rounds_16_bit_png_to_8_bits():
    levels = np.array([[0, 128, 257, 32896, 65535, 65407]], dtype=np.uint16)
    decoded = decode_rgb8(_encoded(Image.fromarray(levels), "PNG"))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 0, 1, 128, 255, 255])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_decode_rgb8_refuses_a_truncated_png_naming_it():
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_rgb8(_MODES["png-rgb"](_photo_like())[:80], name="cut.png")
