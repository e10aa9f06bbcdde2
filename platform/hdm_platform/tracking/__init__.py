"""MLflow tracking (one run per training run, resumable) and the model registry."""
