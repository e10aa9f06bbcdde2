"""The training checkpoint folder: everything needed to resume, without pickle.

Layout of one checkpoint (one folder that Ray Train persists to the run's storage; each
worker contributes its own RNG file and Ray merges the workers' folders into one)::

    model/model.safetensors, model/config.json   the network to validate and export (the
                                                 EMA copy when EMA is on), written by
                                                 hdm_model.save_checkpoint, so
                                                 hdm_model.load_checkpoint reads it
    trainer/tensors.safetensors                  raw training weights ("model.*"), optimizer
                                                 tensors ("optimizer.<param>.<key>"), EMA
                                                 counter ("ema.n_averaged")
    trainer/state.json                           step, epoch, optimizer hyper-parameters and
                                                 scalar state, LR scheduler, metrics, MLflow
                                                 run id
    rng/rank-<R>.safetensors, rng/rank-<R>.json  each worker's torch/CUDA and Python RNGs

Optimizer state is flattened: tensors go to safetensors, everything else to JSON. The
folder is written in a private temporary directory and handed to ``ray.train.report``;
Ray Train registers the checkpoint only once every worker's part is persisted, so a
checkpoint that exists in storage is complete.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from hdm_model import HDM, load_checkpoint, save_checkpoint
from hdm_model.checkpoint import EXPORTED_MODEL_DIR

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TrainingState",
    "exported_model_dir",
    "load_rng_state",
    "load_training_state",
    "save_rng_state",
    "save_training_state",
]

FORMAT = "hdm-training-checkpoint"
FORMAT_VERSION = 1

_TRAINER_DIR = "trainer"
_RNG_DIR = "rng"
_TENSORS_FILE = "tensors.safetensors"
_STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """Where training stands: the counters and bookkeeping restored on resume."""

    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def exported_model_dir(checkpoint_dir: str | Path) -> Path:
    """The ``model/`` folder of a training checkpoint (an ``hdm_model`` checkpoint)."""
    return Path(checkpoint_dir) / EXPORTED_MODEL_DIR


def save_training_state(
    directory: str | Path,
    *,
    model: HDM,
    ema: AveragedModel | None,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    state: TrainingState,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write model, EMA, optimizer, scheduler and counters into ``directory`` (rank 0)."""
    directory = Path(directory)
    exported = ema.module if ema is not None else model
    save_checkpoint(
        exported,
        exported_model_dir(directory),
        metadata={**(metadata or {}), "step": state.step, "metrics": state.metrics},
    )
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    optimizer_tensors, optimizer_json = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    if ema is not None:
        tensors["ema.n_averaged"] = ema.n_averaged
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "metrics": state.metrics,
        "mlflow_run_id": state.mlflow_run_id,
        "optimizer": optimizer_json,
        "scheduler": scheduler.state_dict(),
        "has_ema": ema is not None,
    }
    trainer_dir = directory / _TRAINER_DIR
    trainer_dir.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous_cpu(tensors), str(trainer_dir / _TENSORS_FILE))
    (trainer_dir / _STATE_FILE).write_text(json.dumps(document, indent=2, allow_nan=False))
    return directory


def load_training_state(
    directory: str | Path,
    *,
    model: HDM,
    ema: AveragedModel | None,
    optimizer: Optimizer,
    scheduler: LRScheduler,
) -> TrainingState:
    """Restore the objects in place from a checkpoint folder and return its counters."""
    directory = Path(directory)
    trainer_dir = directory / _TRAINER_DIR
    document = _read_json(trainer_dir / _STATE_FILE)
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{trainer_dir / _STATE_FILE}: not a version-{FORMAT_VERSION} {FORMAT} "
            f"(format={document.get('format')!r}, format_version={document.get('format_version')!r})"
        )
    device = next(model.parameters()).device
    tensors = load_file(str(trainer_dir / _TENSORS_FILE), device=str(device))
    model.load_state_dict(_with_prefix(tensors, "model."))
    optimizer.load_state_dict(
        _unflatten_optimizer(_with_prefix(tensors, "optimizer."), document["optimizer"])
    )
    scheduler.load_state_dict(document["scheduler"])
    if ema is not None:
        if not document.get("has_ema"):
            raise ValueError(f"{directory} has no EMA weights but this run keeps an EMA")
        exported = load_checkpoint(exported_model_dir(directory), device=device)
        ema.module.load_state_dict(exported.state_dict())
        ema.n_averaged.copy_(tensors["ema.n_averaged"])
    return TrainingState(
        step=int(document["step"]),
        epoch=int(document["epoch"]),
        metrics=dict(document.get("metrics", {})),
        mlflow_run_id=document.get("mlflow_run_id"),
    )


def save_rng_state(directory: str | Path, *, rank: int) -> None:
    """Each worker's RNG states, so a resumed worker continues the same random streams."""
    rng_dir = Path(directory) / _RNG_DIR
    rng_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    save_file(tensors, str(rng_dir / f"rank-{rank}.safetensors"))
    version, internal, gauss = random.getstate()
    (rng_dir / f"rank-{rank}.json").write_text(
        json.dumps({"python": [version, list(internal), gauss]})
    )


def load_rng_state(directory: str | Path, *, rank: int) -> bool:
    """Restore this rank's RNGs; False when the checkpoint has none for it (new world size)."""
    rng_dir = Path(directory) / _RNG_DIR
    tensor_path = rng_dir / f"rank-{rank}.safetensors"
    if not tensor_path.is_file():
        return False
    tensors = load_file(str(tensor_path))
    torch.set_rng_state(tensors["torch"])
    cuda_count = sum(name.startswith("cuda.") for name in tensors)
    cuda_states = [tensors[f"cuda.{index}"] for index in range(cuda_count)]
    if cuda_states and torch.cuda.is_available() and cuda_count == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = _read_json(rng_dir / f"rank-{rank}.json")["python"]
    random.setstate((version, tuple(internal), gauss))
    return True


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able remainder."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], document: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in document.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": document["param_groups"]}


def _with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _contiguous_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors stores dense tensors only (channels_last weights are not contiguous).
    return {name: value.detach().contiguous().cpu() for name, value in tensors.items()}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
