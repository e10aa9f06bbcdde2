"""Distributed training with Ray Train (DDP over N CPU or GPU workers), tracked in MLflow."""
