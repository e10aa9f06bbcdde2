"""The HDM architecture as one JSON-able settings object.

Defaults are the paper's HDM (ACM MM 2022, section 3 and Table 5): 64 channels, three
channel-spatial groups of seven residual blocks (the paper's 2.32M parameters fit K=7; the
released code uses K=9), a deformable block and a DCP-guided region block applied
S, R, S, R with shared weights, five regions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CASCADE_ORDERS",
    "DCP_MASK_MODES",
    "DEFAULT_TILE",
    "FEATURE_STRIDE",
    "HDMConfig",
    "MASK_SOURCES",
    "UNTILED_MAX_PIXELS",
    "VARIANT_NAMES",
    "field_names",
    "variant_config",
]

FEATURE_STRIDE = 4
"""The dynamic stages and the region masks live at 1/4 of the input resolution."""
DEFAULT_TILE = 512
"""Tile side that keeps a 12-megapixel photo well under 3 GiB on CPU (bench/memory.py)."""
DEFAULT_TILE_OVERLAP = 32
"""Pixels neighbouring tiles share, blended to hide seams, unless the model or the caller says."""
UNTILED_MAX_PIXELS = 1024 * 1024
"""By default images up to this many pixels run whole, larger ones in ``DEFAULT_TILE`` tiles."""

CASCADE_ORDERS = ("PSR", "PRS", "SRP", "SPR", "RPS", "RSP")
MASK_SOURCES = ("dcp", "learned", "external")
DCP_MASK_MODES = ("transmission", "dark_channel", "published")

MaskSource = Literal["dcp", "learned", "external"]
DCPMaskMode = Literal["transmission", "dark_channel", "published"]
CascadeOrder = Literal["PSR", "PRS", "SRP", "SPR", "RPS", "RSP"]


@dataclass(frozen=True, kw_only=True)
class HDMConfig:
    """Every knob of the HDM network; ``HDMConfig()`` is the paper's model.

    ``use_attention`` switches the channel-spatial level P (the "FA" of Table 5, the groups
    of attention residual blocks), ``use_structure`` the structure level S (deformable conv)
    and ``use_region`` the region level R. ``order`` is the cascade order of Table 4.
    The ``dcp_*`` fields are the dark-channel-prior mask settings of the released code:
    priors computed on the input downscaled x4 to the feature grid, a
    ``dcp_patch_size`` min filter, airlight from the brightest ``dcp_top_fraction``,
    ``t = 1 - dcp_omega * dark(I / A)`` refined by a guided filter of radius
    ``dcp_guided_radius`` (pixels at 1/4 scale) and ``dcp_guided_eps``.
    ``dcp_mask_mode="published"`` computes the masks exactly as the authors' SOTS test
    script does (``hdm_model.published_masks``), with that script's own constants, so the
    ``dcp_*`` fields must keep their defaults with it.
    ``inference_tile`` is the tile side inference uses unless told otherwise
    (:func:`hdm_model.inference.tile_for`), for weights trained on crops far smaller than the
    photos they enhance: trained on 64-pixel crops, the quickstart's model darkened the middle
    of whole 740x416 photos, farther from a border than any training pixel was, in an arc
    (bench/RESULTS.md, session 21). ``None``, the paper's way: whole images.
    ``inference_tile_overlap`` is the overlap of those tiles (default
    :data:`DEFAULT_TILE_OVERLAP`): the quickstart's model, its output in each 64-pixel tile
    depending on the tile's content, leaves a checker of the tile stride in a smooth sky at 32
    pixels of overlap and none at 48 (session 26).
    """

    in_channels: int = 3
    channels: int = 64
    num_groups: int = 3
    blocks_per_group: int = 7
    use_attention: bool = True
    use_structure: bool = True
    use_region: bool = True
    mask_source: MaskSource = "dcp"
    dcp_mask_mode: DCPMaskMode = "transmission"
    num_regions: int = 5
    sr_repeats: int = 2
    share_sr_weights: bool = True
    order: CascadeOrder = "PSR"
    normalize_input: bool = True
    input_mean: tuple[float, ...] = (0.64, 0.6, 0.58)
    input_std: tuple[float, ...] = (0.14, 0.15, 0.152)
    dcp_patch_size: int = 15
    dcp_omega: float = 0.95
    dcp_top_fraction: float = 0.001
    dcp_guided_radius: int = 60
    dcp_guided_eps: float = 1e-4
    inference_tile: int | None = None
    inference_tile_overlap: int | None = None

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep the frozen dataclass hashable and comparable.
        object.__setattr__(self, "input_mean", tuple(float(v) for v in self.input_mean))
        object.__setattr__(self, "input_std", tuple(float(v) for v in self.input_std))
        self._validate()

    def _validate(self) -> None:
        _require_int("in_channels", self.in_channels, minimum=1)
        _require_int("channels", self.channels, minimum=8)
        if self.channels % 8:
            # The attention layers squeeze to channels // 8 (FFA-Net's ratio).
            raise ValueError(f"channels must be a multiple of 8, got {self.channels}")
        _require_int("num_groups", self.num_groups, minimum=1)
        _require_int("blocks_per_group", self.blocks_per_group, minimum=1)
        _require_int("num_regions", self.num_regions, minimum=2)
        _require_int("sr_repeats", self.sr_repeats, minimum=1)
        _require_int("dcp_patch_size", self.dcp_patch_size, minimum=1)
        _require_int("dcp_guided_radius", self.dcp_guided_radius, minimum=0)
        if self.inference_tile is not None:
            _require_int("inference_tile", self.inference_tile, minimum=FEATURE_STRIDE)
            if self.inference_tile % FEATURE_STRIDE:
                raise ValueError(
                    f"inference_tile must be a multiple of {FEATURE_STRIDE}, got {self.inference_tile}"
                )
        if self.inference_tile_overlap is not None:
            # Without an inference_tile it is unused: a run may set the tile to null (whole
            # images) on a config that names both.
            overlap, tile = self.inference_tile_overlap, self.inference_tile
            _require_int("inference_tile_overlap", overlap, minimum=0)
            if overlap % FEATURE_STRIDE or (tile is not None and overlap >= tile):
                below = f" below inference_tile ({tile})" if tile is not None else ""
                raise ValueError(
                    f"inference_tile_overlap must be a multiple of {FEATURE_STRIDE}{below}, got {overlap}"
                )
        for name in ("use_attention", "use_structure", "use_region", "share_sr_weights",
                     "normalize_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _require_choice("mask_source", self.mask_source, MASK_SOURCES)
        _require_choice("dcp_mask_mode", self.dcp_mask_mode, DCP_MASK_MODES)
        _require_choice("order", self.order, CASCADE_ORDERS)
        for name in ("input_mean", "input_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(
                    f"{name} needs one value per input channel ({self.in_channels}), "
                    f"got {getattr(self, name)}"
                )
        if any(v <= 0 for v in self.input_std):
            raise ValueError(f"input_std must be positive, got {self.input_std}")
        if not 0.0 < self.dcp_omega <= 1.0:
            raise ValueError(f"dcp_omega must be in (0, 1], got {self.dcp_omega}")
        if not 0.0 < self.dcp_top_fraction <= 1.0:
            raise ValueError(f"dcp_top_fraction must be in (0, 1], got {self.dcp_top_fraction}")
        if self.dcp_guided_eps <= 0:
            raise ValueError(f"dcp_guided_eps must be positive, got {self.dcp_guided_eps}")
        if self.dcp_mask_mode == "published":
            changed = [name for name in _DCP_SETTINGS if getattr(self, name) != _default(name)]
            if changed:
                raise ValueError(
                    "dcp_mask_mode 'published' runs the authors' script with its own constants; "
                    f"{', '.join(changed)} cannot be changed with it"
                )
        if self.use_region and self.mask_source == "dcp" and self.in_channels != 3:
            raise ValueError(
                f"mask_source 'dcp' needs RGB input (in_channels=3), got in_channels={self.in_channels}"
            )

    def dcp_mask_settings(self) -> dict[str, Any]:
        """Keyword arguments of :mod:`hdm_model.masks`' DCP functions for this config."""
        return {
            "num_regions": self.num_regions,
            "mode": self.dcp_mask_mode,
            "patch_size": self.dcp_patch_size,
            "omega": self.dcp_omega,
            "top_fraction": self.dcp_top_fraction,
            "guided_radius": self.dcp_guided_radius,
            "guided_eps": self.dcp_guided_eps,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HDMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        unknown = sorted(set(data) - field_names())
        if unknown:
            raise ValueError(f"unknown HDMConfig field(s): {', '.join(unknown)}")
        return cls(**data)


def field_names() -> set[str]:
    """Names of all :class:`HDMConfig` fields."""
    return {field.name for field in dataclasses.fields(HDMConfig)}


_DCP_SETTINGS = ("dcp_patch_size", "dcp_omega", "dcp_top_fraction", "dcp_guided_radius", "dcp_guided_eps")


def _default(name: str) -> Any:
    return next(field.default for field in dataclasses.fields(HDMConfig) if field.name == name)


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _require_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


_VARIANT_SETTINGS: dict[str, dict[str, object]] = {
    "B": {"use_attention": False, "use_structure": False, "use_region": False},
    "B+FA": {"use_structure": False, "use_region": False},
    "B+FA+S": {"use_region": False},
    "HDM-F": {"mask_source": "learned"},
    "HDM": {},
}


def variant_config(name: str, **overrides: object) -> HDMConfig:
    """The config of a Table 5 variant, with field overrides (e.g. ``blocks_per_group=9``)."""
    if name not in _VARIANT_SETTINGS:
        raise ValueError(f"unknown HDM variant {name!r}; choose from {', '.join(_VARIANT_SETTINGS)}")
    unknown = sorted(set(overrides) - field_names())
    if unknown:
        raise ValueError(f"unknown HDMConfig field(s): {', '.join(unknown)}")
    return HDMConfig(**{**_VARIANT_SETTINGS[name], **overrides})


#: The Table 5 variants, in the paper's order (``hdm_model.VARIANTS`` builds each).
VARIANT_NAMES: tuple[str, ...] = tuple(_VARIANT_SETTINGS)
