"""Distributed training with Ray Train (DDP over N CPU or GPU workers), tracked in MLflow.

The names below load their submodule on first use (PEP 562): every model reference imports
``training_state`` (checkpoint folders), and a Ray Data model actor or a Serve replica
should not pay for importing Ray Train and MLflow's run tracking with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE_OF = {
    "TrainingOutcome": "driver",
    "TrainingState": "training_state",
    "build_trainer": "driver",
    "exported_model_dir": "training_state",
    "fit": "driver",
    "preflight": "driver",
    "resolve_precision": "loop",
    "train_loop_per_worker": "loop",
}

__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
