"""The words the platform's schemas share: the three tasks and the dataset splits.

A module of its own, with no heavy imports, so that the command line's choices, the
experiment schema, the dataset manifest and Serve's settings all read one definition.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["SPLITS", "TASKS", "Split", "Task", "registered_model_name"]

Task = Literal["dehaze", "derain", "lowlight"]
TASKS: tuple[str, ...] = get_args(Task)
Split = Literal["train", "val", "test", "infer"]
SPLITS: tuple[str, ...] = get_args(Split)


def registered_model_name(task: str) -> str:
    """``dehaze`` -> ``hdm-dehaze``: the MLflow registered model of a task's versions."""
    return f"hdm-{task}"
