"""The three enhancement tasks, and the registered model each one's versions go to.

A module of its own, with no heavy imports, so that the command line's choices, the
experiment schema and the dataset manifest all read the one definition.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["TASKS", "Task", "registered_model_name"]

Task = Literal["dehaze", "derain", "lowlight"]
TASKS: tuple[str, ...] = get_args(Task)


def registered_model_name(task: str) -> str:
    """``dehaze`` -> ``hdm-dehaze``: the MLflow registered model of a task's versions."""
    return f"hdm-{task}"
