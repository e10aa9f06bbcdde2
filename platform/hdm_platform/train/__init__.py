"""Distributed training with Ray Train (DDP over N CPU or GPU workers), tracked in MLflow."""

from hdm_platform.train.training_state import TrainingState, exported_model_dir
from hdm_platform.train.driver import TrainingOutcome, build_trainer, fit, preflight
from hdm_platform.train.loop import train_loop_per_worker

__all__ = [
    "TrainingOutcome",
    "TrainingState",
    "build_trainer",
    "exported_model_dir",
    "fit",
    "preflight",
    "train_loop_per_worker",
]
