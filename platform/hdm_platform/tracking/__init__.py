"""MLflow tracking (one run per training run, resumable) and the model registry."""

from hdm_platform.tracking.mlflow_run import (
    MODEL_ARTIFACT_PATH,
    TrackedRun,
    git_commit,
    image_grid,
    source_tags,
)
from hdm_platform.tracking.registry import (
    MODEL_FILES,
    download_model_files,
    is_registry_uri,
    list_versions,
    load_registered,
    register_model,
    registry_client,
    resolve_version,
    set_alias,
)

__all__ = [
    "MODEL_ARTIFACT_PATH",
    "MODEL_FILES",
    "TrackedRun",
    "download_model_files",
    "git_commit",
    "image_grid",
    "is_registry_uri",
    "list_versions",
    "load_registered",
    "register_model",
    "registry_client",
    "resolve_version",
    "set_alias",
    "source_tags",
]
