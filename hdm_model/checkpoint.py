"""HDM checkpoints: ``model.safetensors`` (weights) + ``config.json`` (architecture, metadata).

The JSON config rebuilds the exact variant, and safetensors holds plain tensors, so loading
never unpickles anything. Each file is written to a temporary name and renamed into place,
``config.json`` last: a directory with a ``config.json`` always has its matching weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hdm_model.atomic import write_atomically
from hdm_model.config import HDMConfig
from hdm_model.model import HDM

__all__ = [
    "CONFIG_FILE",
    "EXPORTED_MODEL_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "hdm"
FORMAT_VERSION = 1
#: A training checkpoint keeps its exported (EMA) model, an HDM checkpoint, in this subfolder.
EXPORTED_MODEL_DIR = "model"


def save_checkpoint(
    model: HDM, directory: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``directory`` (created if missing) and return the directory.

    ``metadata`` (e.g. task, dataset, metrics) must be JSON-serialisable.
    """
    directory = Path(directory)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "metadata": dict(metadata or {}),
    }
    try:
        config_text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {error}") from error
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors wants dense, contiguous tensors (channels_last weights are not).
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(state, str(path)))
    write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(config_text))
    return directory


def read_checkpoint_config(directory: str | Path) -> tuple[HDMConfig, dict[str, Any]]:
    """The architecture and metadata stored in ``directory/config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {path}")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not an HDM checkpoint config (expected \"format\": \"{FORMAT}\")")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {document.get('format_version')!r} "
            f"(this code reads {FORMAT_VERSION})"
        )
    if not isinstance(document.get("model"), dict):
        raise ValueError(f"{path}: field 'model' must be an object of HDMConfig fields")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: field 'metadata' must be an object")
    try:
        config = HDMConfig.from_dict(document["model"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad field 'model': {error}") from error
    return config, metadata


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> HDM:
    """Rebuild the saved model on ``device`` in eval mode."""
    config, _ = read_checkpoint_config(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {weights_path}")
    try:
        state = load_file(str(weights_path), device=str(torch.device(device)))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
    model = HDM(config).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not match {CONFIG_FILE}: {error}") from error
    return model.eval()
