"""``hdm data synth``: degraded/clean pairs from clean photos with physical degradation models.

The benchmarks the paper trains on are themselves synthetic, and this module renders
pairs the same ways:

* **haze** (RESIDE ITS/SOTS): the atmospheric scattering model ``I = J t + A (1 - t)``,
  ``t = exp(-beta d)``, with ``beta ~ U(0.3, 1.8)`` (RESIDE's U(0.6, 1.8), reaching down to
  lighter haze: ``_BETA``) and an airlight ``A ~ U(0.7, 1.0)`` (RESIDE's range), near grey
  with a tint of its own per pair (each channel scaled by ``1 + N(0, _AIRLIGHT_TINT)``,
  capped at 1). Half of the hazes (``_BLUE_HAZE_SHARE``) scatter blue more than red, as the
  air over a long outdoor view does: each channel's ``beta`` is scaled by ``(550 nm /
  wavelength) ** alpha``, with the Angstrom exponent ``alpha ~ U(0, 4)`` (``_ANGSTROM``: 0 is
  a grey aerosol haze, 4 Rayleigh's clear air); the other half are grey. ``d`` is a real
  depth map where the source has one (a ``depth/`` folder beside the images, larger =
  farther, or ``disparity/``, larger = nearer, with the same stems; the built-in motorcycle
  photo ships with its stereo disparity).
  Otherwise it is a heuristic: 0.6 x a vertical ramp (far at the top, as in most
  outdoor photos) + 0.4 x the dark channel (15x15 min filter) blurred by a Gaussian of
  sigma = 1/16 of the image (bright,
  colourless regions such as sky and haze-like walls read as far). The normalised depth
  is scaled by ``_OPTICAL_DEPTH`` so that transmissions span roughly [0.07, 1].
* **scenes** (the ``builtin-scenes`` source): "dead leaves"
  compositions (:func:`compose_scene`) of the built-in photos, whose depth is known by
  construction: a far wall, then 5-40 shapes (discs, rectangles, ellipses) filled with a crop
  of a photo or with a photo's colour under a shading gradient and a photo's texture. A quarter
  of them stand in front, each nearer than the one before by up to 10% (``_SCENE_NEARER``); the
  others are painted on what lies under them (``_SCENE_DECALS``: a rug, a poster, wood grain),
  so most colour edges are not depth edges, as in real rooms. Depth is then piecewise smooth
  with jumps at object edges, as in the NYU depth maps that RESIDE hazes, and brightness says
  nothing about depth: a white wall can be near. Trained on scenes where every colour edge was
  also a depth edge, the quickstart's model gave each patch of a real wooden floor its own haze
  and mottled it red (bench/RESULTS.md, session 17). A scene is a room, so its far
  wall sits at ``_SCENE_FAR`` of the photos' far plane: transmissions span about [0.39, 0.98]
  (SOTS-indoor's, measured from its hazy/clear pairs, 0.41-0.91 between the 5th and 95th
  percentiles). Trained on photos with the heuristic depth, the quickstart's model learned
  "bright and flat = dense haze" and repainted real hazy photos; trained on scenes it dehazes
  them (bench/RESULTS.md, sessions 12 and 13).
* **JPEG** (dehaze): half of the hazy images (``_JPEG_SHARE``) go through a JPEG round trip
  at quality U(60, 95) (``_JPEG_QUALITY``), as real hazy photos come from cameras and the
  web; the clean target stays lossless. Dehazing a dense haze stretches its contrast several
  times, and a model that only saw lossless inputs stretched the 8x8 blocks of a JPEG's hazy
  sky into vertical stripes (bench/RESULTS.md, session 24).
* **rain** (Rain100L/H, Rain200H): 1-3 streak layers added to the image, each a sparse
  random impulse field convolved with a line kernel (motion-blurred noise) of its own
  length (8-30 px at 256 px, scaled with the image), coverage (2-8% of the pixels),
  brightness and angle around a common wind angle, softened by a small Gaussian.
* **low light** (LOL-style): ``clean ** gamma * exposure`` with ``gamma ~ U(1.5, 3)`` and
  ``exposure ~ U(0.1, 0.5)``, then Poisson shot noise at ``peak ~ U(60, 600)`` photons
  for a full-scale pixel and Gaussian read noise ``sigma ~ U(0.002, 0.012)``.

Every pair ``i`` draws from ``numpy.random.default_rng([seed, i])``, so a seed reproduces
byte-identical PNGs regardless of thread count or which pairs were rendered before.

Splits are by source photo: each clean photo belongs to one split (:func:`photo_splits`), and
a pair, whose split is drawn from the val/test fractions, crops a photo of its own split. A
test image therefore never shows a scene the model was trained on, as in the benchmarks
(SOTS scenes are not in ITS).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import matplotlib.cbook
import numpy as np
import skimage
import skimage.data
from PIL import Image
from scipy import ndimage, signal
from skimage.draw import line_aa
from tqdm import tqdm

from hdm_platform.data.layouts import is_image
from hdm_platform.data.manifest import TASKS, Manifest, Split
from hdm_platform.data.storage import join_uri, list_files, open_filesystem
from hdm_platform.imageio import decode_rgb8
from hdm_platform.data.shard_writer import DEFAULT_SHARD_SIZE, DatasetWriter, Row, current_manifest, fingerprint

__all__ = [
    "BUILTIN",
    "BUILTIN_PHOTOS",
    "CleanImage",
    "SynthResult",
    "BUILTIN_SCENES",
    "builtin_images",
    "compose_scene",
    "photo_splits",
    "load_clean_images",
    "heuristic_depth",
    "add_haze",
    "jpeg_round_trip",
    "add_rain",
    "darken",
    "DEGRADATIONS",
    "synthesize",
]

BUILTIN = "builtin"
BUILTIN_SCENES = "builtin-scenes"
BUILTIN_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "grace_hopper", "china", "flower"
)  # fmt: skip
"""Real colour photos shipped inside installed packages (no download): scikit-image's five
(without its pooch downloads), matplotlib's sample Grace Hopper and scikit-learn's two
sample images."""

_DEPTH_FOLDERS = {"depth": False, "disparity": True}  # folder -> values are inverse depth
_OPTICAL_DEPTH = 1.5
_SCENE_FAR = 1.0 / 3.0
# Each shape is nearer than the one before by a factor drawn from this range. A wider range
# (0.75-1) put the later shapes of a scene almost against the camera, nearly free of haze, and
# the model trained on it left haze on the far walls of real rooms (bench/RESULTS.md, session 13).
_SCENE_NEARER = (0.9, 1.0)
# The share of shapes that are painted on what lies under them (a rug, a poster, wood grain)
# rather than standing in front of it: a colour edge that is not a depth edge.
_SCENE_DECALS = 0.75
# The airlight's colour spread around grey, per channel (standard deviation, relative): outdoor
# haze is bluish and smog yellowish, and a model that only saw grey haze repainted a bluish one.
_AIRLIGHT_TINT = 0.05
# The scattering coefficient's range. From RESIDE's 0.6 the far wall of every training scene kept
# a transmission of 0.74 at most, and the quickstart's model took more haze off lightly hazed
# photos than there was (a grey haze taken off twice leaves a purple rock blue); from 0.3 it
# scored higher on real SOTS with each of three synthesis seeds (bench/RESULTS.md, session 22).
_BETA = (0.3, 1.8)
# The share of pairs whose haze scatters blue more than red, as air over long outdoor distances
# does: the scattering coefficient of each channel is scaled by (550 nm / its wavelength) to the
# power of an Angstrom exponent drawn from _ANGSTROM (0: grey aerosol haze; 4: Rayleigh's clear
# air). With grey haze only, the quickstart's model took the real canyon's bluish far haze for
# a grey one over blue rock and painted its red rock blue (bench/RESULTS.md, session 25).
_BLUE_HAZE_SHARE = 0.5
_ANGSTROM = (0.0, 4.0)
_WAVELENGTHS_NM = np.array([610.0, 550.0, 465.0])  # red, green, blue: green's beta is the drawn one
# The share of hazy images stored as JPEG before they are decoded again, and the quality range.
_JPEG_SHARE = 0.5
_JPEG_QUALITY = (60, 95)
_BATCH = 16


@dataclass(frozen=True)
class CleanImage:
    """A clean photo (``uint8 [H, W, 3]``), and its depth (``[H, W]``, 0 near, 1 far) if known."""

    name: str
    source: str
    pixels: np.ndarray
    depth: np.ndarray | None = None


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high - low < 1e-12 else (values - low) / (high - low)


def _depth_from(values: np.ndarray, inverse: bool) -> np.ndarray:
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("depth map has no finite values")
    if not finite.all():
        # Stereo disparity marks unmatched pixels (occlusions, no texture) inf/nan: give each
        # the value of its nearest matched pixel, so the haze stays smooth across the holes.
        _, (rows, cols) = ndimage.distance_transform_edt(~finite, return_indices=True)
        values = values[rows, cols]
    if inverse:
        values = 1.0 / np.maximum(values, 1e-6)
    return _normalise(values).astype(np.float32)


def _builtin_image(name: str) -> CleanImage:
    if name == "motorcycle":
        left, _, disparity = skimage.data.stereo_motorcycle()
        return CleanImage(name, "skimage.data.stereo_motorcycle", left, _depth_from(disparity, True))
    if name == "grace_hopper":
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            pixels = decode_rgb8(handle.read(), name="matplotlib sample_data/grace_hopper.jpg")
        return CleanImage(name, "matplotlib.cbook.get_sample_data('grace_hopper.jpg')", pixels)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image  # imports scipy.sparse & co: only here

        source = f"sklearn.datasets.load_sample_image('{name}.jpg')"
        return CleanImage(name, source, load_sample_image(f"{name}.jpg"))
    return CleanImage(name, f"skimage.data.{name}", getattr(skimage.data, name)())


@functools.cache
def builtin_images() -> tuple[CleanImage, ...]:
    """The built-in real photos (:data:`BUILTIN_PHOTOS`); the motorcycle comes with its stereo
    disparity.

    Cached: the arrays are read-only, so sharing them between calls is safe.
    """
    images = [_builtin_image(name) for name in BUILTIN_PHOTOS]
    for image in images:
        for array in (image.pixels, image.depth):
            if array is not None:
                array.flags.writeable = False
    return tuple(images)


def _decode_depth(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("F") if image.mode not in ("I", "I;16", "F") else image)
    except (OSError, ValueError) as error:
        raise ValueError(f"unreadable depth map {name}: {error}") from error


def load_clean_images(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[CleanImage, ...]:
    """Clean photos under ``uri`` (any fsspec URI), with depth from ``depth/`` or
    ``disparity/`` folders beside them where present (same stem, any image format)."""
    fs, root = open_filesystem(uri, storage_options)
    entries = [entry.path for entry in list_files(fs, root) if is_image(entry.path)]
    depth_maps: dict[tuple[tuple[str, ...], str], tuple[str, bool]] = {}
    photos = []
    for path in entries:
        parts = PurePosixPath(path).parts
        folder = parts[-2].lower() if len(parts) > 1 else ""
        if folder in _DEPTH_FOLDERS:
            depth_maps[(parts[:-2], PurePosixPath(path).stem)] = (path, _DEPTH_FOLDERS[folder])
        else:
            photos.append(path)
    if not photos:
        raise FileNotFoundError(f"no clean images under {uri}")
    images = []
    for path in photos:
        parts = PurePosixPath(path).parts
        name = join_uri(uri, path)
        pixels = decode_rgb8(fs.cat_file(f"{root}/{path}"), name=name)
        depth = None
        depth_entry = depth_maps.get((parts[:-1], PurePosixPath(path).stem))
        if depth_entry is not None:
            depth_path, inverse = depth_entry
            depth_name = join_uri(uri, depth_path)
            raw = _decode_depth(fs.cat_file(f"{root}/{depth_path}"), depth_name)
            if raw.shape[:2] != pixels.shape[:2]:
                raise ValueError(
                    f"depth map {depth_name} is {raw.shape[1]}x{raw.shape[0]}, "
                    f"image {name} is {pixels.shape[1]}x{pixels.shape[0]}"
                )
            depth = _depth_from(raw, inverse)
        images.append(CleanImage(str(PurePosixPath(path).with_suffix("")), name, pixels, depth))
    return tuple(images)


def heuristic_depth(clean: np.ndarray) -> np.ndarray:
    """A depth guess for photos without depth (module docstring): 0 near, 1 far."""
    height, width = clean.shape[:2]
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    dark = ndimage.minimum_filter(clean.min(axis=2), size=15)
    smooth = ndimage.gaussian_filter(dark.astype(np.float32), sigma=max(1.0, min(height, width) / 16))
    return (0.6 * ramp + 0.4 * _normalise(smooth)).astype(np.float32)


def _scene_colour(photos: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    return photo[rng.integers(photo.shape[0]), rng.integers(photo.shape[1])]


def _scene_crop(photos: Sequence[np.ndarray], side: int, rng: np.random.Generator) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    return photo[top : top + side, left : left + side]


def _scene_fill(photos: Sequence[np.ndarray], grid: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """What one shape shows: a photo's crop (40%), else a photo's colour under a linear
    shading gradient, with that of a photo's grey texture at a random contrast (70%)."""
    rows, cols = grid
    side = rows.shape[0]
    if rng.random() < 0.4:
        return _scene_crop(photos, side, rng)
    gain, slope_x, slope_y = rng.uniform(0.7, 1.1), *rng.normal(0.0, 0.3, 2)
    shading = np.clip(gain + slope_x * (cols - 0.5) + slope_y * (rows - 0.5), 0.3, 1.3)[..., None]
    fill = _scene_colour(photos, rng) * shading
    if rng.random() < 0.7:
        texture = _scene_crop(photos, side, rng).mean(axis=2)
        texture = texture / max(float(texture.mean()), 1e-3)
        fill = fill * (1.0 + rng.uniform(0.0, 0.5) * (texture - 1.0))[..., None]
    return fill


def _scene_shape(grid: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A disc, an upright rectangle or a tilted ellipse; radii follow the dead-leaves power law."""
    rows, cols = grid
    radius = min(0.05 * (1.0 - rng.random()) ** -0.5, 0.8)
    centre_y, centre_x = rng.uniform(-0.1, 1.1, 2)
    dy, dx = rows - centre_y, cols - centre_x
    kind = rng.integers(3)
    if kind == 0:
        return dy**2 + dx**2 < radius**2
    if kind == 1:
        return (np.abs(dy) < radius * rng.uniform(0.3, 1.5)) & (np.abs(dx) < radius)
    angle = rng.uniform(0.0, np.pi)
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return (along / radius) ** 2 + (across / (radius * rng.uniform(0.2, 1.0))) ** 2 < 1.0


def compose_scene(
    photos: Sequence[np.ndarray], size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A dead-leaves scene of ``photos`` (float ``[H, W, 3]`` in [0, 1], each at least twice
    ``size``) and its depth (module docstring): ``uint8 [H, W, 3]`` and ``float32 [H, W]``.

    Drawn at twice the size and averaged down, so that shape edges are anti-aliased.
    """
    width, height = size
    side = 2 * max(width, height)
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32) / side
    grid = (rows, cols)

    def plane(distance: float, tilt: float) -> np.ndarray:
        return distance + rng.normal(0.0, tilt) * (rows - 0.5) + rng.normal(0.0, tilt) * (cols - 0.5)

    distance = float(rng.uniform(0.6, 1.0))
    image = _scene_fill(photos, grid, rng)
    depth = plane(distance, 0.1)
    for _ in range(rng.integers(5, 41)):
        mask = _scene_shape(grid, rng)
        if not mask.any():
            continue
        image = np.where(mask[..., None], _scene_fill(photos, grid, rng), image)
        if rng.random() >= _SCENE_DECALS:
            distance = max(0.05, distance * float(rng.uniform(*_SCENE_NEARER)))
            depth = np.where(mask, plane(distance, 0.05), depth)
    image = image[: 2 * height, : 2 * width].reshape(height, 2, width, 2, 3).mean(axis=(1, 3))
    depth = np.clip(depth[: 2 * height, : 2 * width], 0.02, 1.2).reshape(height, 2, width, 2).mean(axis=(1, 3))
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels, (depth * _SCENE_FAR).astype(np.float32)


def add_haze(clean: np.ndarray, rng: np.random.Generator, depth: np.ndarray | None = None) -> np.ndarray:
    """Atmospheric scattering ``J t + A (1 - t)`` on a float ``[H, W, 3]`` image in [0, 1]."""
    depth = heuristic_depth(clean) if depth is None else depth
    beta = rng.uniform(*_BETA)
    airlight = np.minimum(rng.uniform(0.7, 1.0) * (1.0 + rng.normal(0.0, _AIRLIGHT_TINT, 3)), 1.0)
    angstrom = rng.uniform(*_ANGSTROM) if rng.random() < _BLUE_HAZE_SHARE else 0.0
    per_channel = (_WAVELENGTHS_NM[1] / _WAVELENGTHS_NM) ** angstrom
    transmission = np.exp(-beta * _OPTICAL_DEPTH * depth[..., None] * per_channel)
    return clean * transmission + airlight * (1.0 - transmission)


def jpeg_round_trip(degraded: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``degraded`` (float ``[H, W, 3]``) as a JPEG of quality U(60, 95) decodes it, for a share
    ``_JPEG_SHARE`` of the draws; otherwise unchanged."""
    if rng.random() >= _JPEG_SHARE:
        return degraded
    pixels = np.round(np.clip(degraded, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    quality = int(rng.integers(_JPEG_QUALITY[0], _JPEG_QUALITY[1] + 1))
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    # PIL, not hdm_platform.imageio: its JPEG path imports torchvision into the render threads.
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64) / 255.0


def _streak_kernel(length: int, angle_degrees: float) -> np.ndarray:
    """An anti-aliased line of ``length`` pixels at ``angle_degrees`` from vertical."""
    size = length | 1
    centre = size // 2
    angle = np.deg2rad(angle_degrees)
    dy, dx = round(float(np.cos(angle)) * centre), round(float(np.sin(angle)) * centre)
    rows, cols, weights = line_aa(centre - dy, centre - dx, centre + dy, centre + dx)
    kernel = np.zeros((size, size), dtype=np.float64)
    kernel[rows, cols] = np.maximum(kernel[rows, cols], weights)
    return kernel


def add_rain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds 1-3 layers of motion-blurred noise streaks to a float ``[H, W, 3]`` image."""
    height, width = clean.shape[:2]
    scale = min(height, width) / 256.0
    wind = rng.uniform(-25.0, 25.0)
    rain = np.zeros((height, width), dtype=np.float64)
    for _ in range(rng.integers(1, 4)):
        length = max(3, round(float(rng.uniform(8.0, 30.0)) * scale))
        # Seeds per pixel such that streaks cover 2-8% of the image at any streak length.
        density = rng.uniform(0.02, 0.08) / length
        angle = wind + rng.uniform(-4.0, 4.0)
        brightness = rng.uniform(0.35, 0.8)
        seeds = (rng.random((height, width)) < density) * rng.uniform(0.6, 1.0, (height, width))
        streaks = signal.fftconvolve(seeds, _streak_kernel(length, angle), mode="same")
        rain += brightness * ndimage.gaussian_filter(np.clip(streaks, 0.0, 1.0), sigma=0.6)
    return clean + np.clip(rain, 0.0, 1.0)[..., None]


def darken(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma/exposure drop plus Poisson shot noise and Gaussian read noise."""
    gamma = rng.uniform(1.5, 3.0)
    exposure = rng.uniform(0.1, 0.5)
    peak = rng.uniform(60.0, 600.0)
    read_sigma = rng.uniform(0.002, 0.012)
    dark = exposure * np.power(clean, gamma)
    noisy = rng.poisson(dark * peak) / peak
    return noisy + rng.normal(0.0, read_sigma, size=dark.shape)


Degradation = Callable[[np.ndarray, np.random.Generator, np.ndarray | None], np.ndarray]

DEGRADATIONS: dict[str, Degradation] = {
    "dehaze": lambda clean, rng, depth: jpeg_round_trip(add_haze(clean, rng, depth), rng),
    "derain": lambda clean, rng, depth: add_rain(clean, rng),
    "lowlight": lambda clean, rng, depth: darken(clean, rng),
}
"""Per task: ``(clean float [H, W, 3] in [0, 1], rng, depth or None) -> degraded (unclipped)``."""


def _to_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _crop(
    image: CleanImage, size: tuple[int, int] | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    pixels, depth = image.pixels, image.depth
    if size is not None:
        width, height = size
        factor = max(height / pixels.shape[0], width / pixels.shape[1])
        if factor > 1.0:
            # Too small for the crop: upscale (and the depth with it) so the crop fits.
            new_size = (int(np.ceil(pixels.shape[1] * factor)), int(np.ceil(pixels.shape[0] * factor)))
            pixels = np.asarray(Image.fromarray(pixels).resize(new_size, Image.Resampling.BICUBIC))
            if depth is not None:
                depth = np.asarray(Image.fromarray(depth).resize(new_size, Image.Resampling.BILINEAR))
        top = int(rng.integers(0, pixels.shape[0] - height + 1))
        left = int(rng.integers(0, pixels.shape[1] - width + 1))
        pixels = pixels[top : top + height, left : left + width]
        depth = None if depth is None else depth[top : top + height, left : left + width]
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
        depth = None if depth is None else depth[:, ::-1]
    return np.ascontiguousarray(pixels), None if depth is None else np.ascontiguousarray(depth)


def _draw(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8]) / 2**64


def _split_of(index: int, seed: int, val_fraction: float, test_fraction: float) -> Split:
    draw = _draw(seed, f"pair-{index}")
    if draw < test_fraction:
        return "test"
    if draw < test_fraction + val_fraction:
        return "val"
    return "train"


def photo_splits(
    names: Sequence[str], *, seed: int, val_fraction: float, test_fraction: float
) -> dict[Split, list[int]]:
    """Which photos (indices into ``names``) each split crops from; the splits share none.

    A split with a positive fraction gets ``round(fraction x photos)`` photos, at least one,
    and training keeps the rest; which ones is drawn from the seed and each photo's name.

    Raises:
        ValueError: too few photos to give every requested split one of its own.
    """
    held_out = {
        split: max(1, round(fraction * len(names))) if fraction > 0 else 0
        for split, fraction in (("test", test_fraction), ("val", val_fraction))
    }
    if sum(held_out.values()) >= len(names):
        wanted = " and ".join(f"{count} {split}" for split, count in held_out.items() if count)
        raise ValueError(
            f"{len(names)} clean photo(s) cannot split by photo into {wanted} and at least one "
            "for training: add photos, or lower --val-fraction/--test-fraction"
        )
    order = sorted(range(len(names)), key=lambda index: _draw(seed, f"photo-{names[index]}"))
    test, val = held_out["test"], held_out["val"]
    return {
        "test": sorted(order[:test]),
        "val": sorted(order[test : test + val]),
        "train": sorted(order[test + val :]),
    }


@dataclass(frozen=True)
class SynthResult:
    """What a synthesis did; ``unchanged`` means the dataset was already up to date."""

    manifest: Manifest
    unchanged: bool
    pairs: int
    seconds: float

    def summary(self) -> str:
        if self.unchanged:
            return f"{self.manifest.uri} is up to date: {self.pairs} pairs, nothing written"
        splits = ", ".join(f"{name} {info.rows}" for name, info in self.manifest.splits.items())
        return f"synthesised {self.pairs} pairs ({splits}) in {self.seconds:.1f} s -> {self.manifest.uri}"


def synthesize(
    clean_source: str,
    dest: str,
    *,
    task: str,
    count: int,
    seed: int = 0,
    size: tuple[int, int] | None = (256, 256),
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 4,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SynthResult:
    """Renders ``count`` degraded/clean pairs into the dataset at ``dest``.

    Args:
        clean_source: a folder/URI of clean photos, or ``"builtin"``.
        task: "dehaze", "derain" or "lowlight".
        count: number of pairs; pair ``i`` crops photo ``i mod n`` of the ``n`` of its split.
        seed: reproduces the dataset byte for byte.
        size: ``(width, height)`` of the random crops; None keeps whole photos.
        val_fraction, test_fraction: fractions of pairs (by hash of the index) for val/test;
            each split crops its own photos (:func:`photo_splits`).
    """
    started = time.perf_counter()
    _check_arguments(task, count, size, val_fraction, test_fraction)
    scenes = clean_source == BUILTIN_SCENES
    if clean_source not in (BUILTIN, BUILTIN_SCENES):
        clean_source = clean_source.rstrip("/")
    images, listing = _clean_photos(clean_source, storage_options)
    if scenes:
        _check_scene_size(images, size)
    arguments = {
        "task": task,
        "count": count,
        "seed": seed,
        "size": size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "shard_size": shard_size,
        "name": name,
        "source": clean_source,
        "split_by": "photo",
        # A change of the degradation's parameters renders the dataset again.
        "recipe": _recipe(task),
    }
    digest = fingerprint("synth", arguments, listing)
    existing = current_manifest(dest, digest, storage_options)
    if existing is not None:
        return SynthResult(existing, True, existing.rows, time.perf_counter() - started)

    splits = photo_splits(
        [image.name for image in images], seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    render = _PairRenderer(images, splits, task, seed, size, val_fraction, test_fraction, scenes)
    with (
        DatasetWriter(
            dest, storage_options=storage_options, shard_size=shard_size, workers=workers
        ) as writer,
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="synth") as pool,
        tqdm(total=count, unit="pair", desc=f"synth {task}", disable=not progress) as bar,
    ):
        for start in range(0, count, _BATCH):
            for row in pool.map(render, range(start, min(count, start + _BATCH))):
                writer.add(row)
            bar.update(min(count, start + _BATCH) - start)
        manifest = writer.commit(
            name=name or PurePosixPath(dest.rstrip("/")).name or "dataset",
            task=task,
            layout="synth",
            paired=True,
            source=clean_source,
            fingerprint=digest,
        )
    return SynthResult(manifest, False, manifest.rows, time.perf_counter() - started)


def _recipe(task: str) -> dict[str, Any]:
    if task != "dehaze":
        return {}
    return {
        "beta": _BETA,
        "airlight_tint": _AIRLIGHT_TINT,
        "blue_haze_share": _BLUE_HAZE_SHARE,
        "angstrom": _ANGSTROM,
        "jpeg_share": _JPEG_SHARE,
        "jpeg_quality": _JPEG_QUALITY,
    }


def _check_arguments(
    task: str, count: int, size: tuple[int, int] | None, val_fraction: float, test_fraction: float
) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if val_fraction < 0.0 or test_fraction < 0.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val ({val_fraction}) and test ({test_fraction}) fractions must be >= 0 and sum below 1"
        )
    if size is not None and min(size) < 1:
        raise ValueError(f"crop size must be positive, got {size}")


def _check_scene_size(images: Sequence[CleanImage], size: tuple[int, int] | None) -> None:
    if size is None:
        raise ValueError(f"{BUILTIN_SCENES} composes scenes of a given size: pass --size")
    smallest = min(min(image.pixels.shape[:2]) for image in images)
    if 2 * max(size) > smallest:
        raise ValueError(
            f"{BUILTIN_SCENES} draws at twice the size from photos of at least {smallest} px: "
            f"--size {max(size)} is too large (at most {smallest // 2})"
        )


def _clean_photos(
    clean_source: str, storage_options: Mapping[str, Any] | None
) -> tuple[tuple[CleanImage, ...], Sequence[Sequence[Any]]]:
    """The clean photos, and the listing that identifies them in the fingerprint."""
    if clean_source in (BUILTIN, BUILTIN_SCENES):
        versions = [importlib.metadata.version(name) for name in ("scikit-image", "matplotlib", "scikit-learn")]
        return builtin_images(), [(clean_source, *versions, *BUILTIN_PHOTOS)]
    fs, root = open_filesystem(clean_source, storage_options)
    listing = [(e.path, e.size, e.modified) for e in list_files(fs, root) if is_image(e.path)]
    return load_clean_images(clean_source, storage_options), listing


@dataclass(frozen=True)
class _PairRenderer:
    """Renders pair ``index`` from its own random stream; safe to call from several threads."""

    images: Sequence[CleanImage]
    photos_of_split: Mapping[Split, Sequence[int]]
    task: str
    seed: int
    size: tuple[int, int] | None
    val_fraction: float
    test_fraction: float
    scenes: bool = False

    @functools.cached_property
    def _scene_photos(self) -> dict[Split, list[np.ndarray]]:
        return {
            split: [self.images[index].pixels.astype(np.float32) / 255.0 for index in photos]
            for split, photos in self.photos_of_split.items()
        }

    def __call__(self, index: int) -> Row:
        rng = np.random.default_rng([self.seed, index])
        split = _split_of(index, self.seed, self.val_fraction, self.test_fraction)
        if self.scenes:
            assert self.size is not None  # _check_scene_size
            pixels, depth = compose_scene(self._scene_photos[split], self.size, rng)
            name, source = "scene", f"{BUILTIN_SCENES}:{split} photos"
        else:
            photos = self.photos_of_split[split]
            image = self.images[photos[index % len(photos)]]
            pixels, depth = _crop(image, self.size, rng)
            name, source = PurePosixPath(image.name).name, image.source
        clean = pixels.astype(np.float64) / 255.0
        degraded = DEGRADATIONS[self.task](clean, rng, depth)
        degraded_pixels = np.round(np.clip(degraded, 0.0, 1.0) * 255.0).astype(np.uint8)
        pair_id = f"synth-{self.task}/{name}-{index:06d}"
        return Row(
            id=pair_id,
            task=self.task,
            split=split,
            input=_to_png(degraded_pixels),
            target=_to_png(pixels),
            input_format="PNG",
            target_format="PNG",
            width=pixels.shape[1],
            height=pixels.shape[0],
            source_input=f"synth:{self.task}:seed={self.seed}:pair={index}",
            source_target=source,
        )
