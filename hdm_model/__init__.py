"""HDM: hierarchical dynamic mechanism for image enhancement (ACM MM 2022), in pure PyTorch."""

from hdm_model.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from hdm_model.config import HDMConfig
from hdm_model.model import (
    HDM,
    VARIANTS,
    build_hdm,
    hdm,
    hdm_b,
    hdm_b_fa,
    hdm_b_fa_s,
    hdm_f,
    variant_config,
)
from hdm_model.inference import DEFAULT_TILE, enhance, prepare_for_inference
from hdm_model.masks import DCPMaps, bin_into_regions, compute_dcp_maps, dcp_region_masks

__all__ = [
    "DEFAULT_TILE",
    "HDM",
    "HDMConfig",
    "VARIANTS",
    "DCPMaps",
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
