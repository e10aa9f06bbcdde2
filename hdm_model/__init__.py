"""HDM: hierarchical dynamic mechanism for image enhancement (ACM MM 2022), in pure PyTorch.

The names below load their submodule on first use (PEP 562), so that importing a light
submodule such as :mod:`hdm_model.config` does not import torch: the ``hdm`` command line
answers ``--help`` without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "load_checkpoint": "checkpoint",
    "read_checkpoint_config": "checkpoint",
    "save_checkpoint": "checkpoint",
    "HDMConfig": "config",
    "variant_config": "config",
    "HDM": "model",
    "VARIANTS": "model",
    "build_hdm": "model",
    "hdm": "model",
    "hdm_b": "model",
    "hdm_b_fa": "model",
    "hdm_b_fa_s": "model",
    "hdm_f": "model",
    "DEFAULT_TILE": "inference",
    "enhance": "inference",
    "prepare_for_inference": "inference",
    "DCPMaps": "masks",
    "bin_into_regions": "masks",
    "compute_dcp_maps": "masks",
    "dcp_region_masks": "masks",
}

__all__ = [
    "DCPMaps",
    "DEFAULT_TILE",
    "HDM",
    "HDMConfig",
    "VARIANTS",
    "bin_into_regions",
    "build_hdm",
    "compute_dcp_maps",
    "dcp_region_masks",
    "enhance",
    "hdm",
    "hdm_b",
    "hdm_b_fa",
    "hdm_b_fa_s",
    "hdm_f",
    "load_checkpoint",
    "prepare_for_inference",
    "read_checkpoint_config",
    "save_checkpoint",
    "variant_config",
]

if TYPE_CHECKING:
    from hdm_model.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from hdm_model.config import HDMConfig, variant_config
    from hdm_model.inference import DEFAULT_TILE, enhance, prepare_for_inference
    from hdm_model.masks import DCPMaps, bin_into_regions, compute_dcp_maps, dcp_region_masks
    from hdm_model.model import HDM, VARIANTS, build_hdm, hdm, hdm_b, hdm_b_fa, hdm_b_fa_s, hdm_f


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hdm_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hdm_model.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
