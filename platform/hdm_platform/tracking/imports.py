"""Register a checkpoint that was not trained here (the authors' published weights) in the
MLflow registry, as a version of the task's model like any training run's.

The checkpoint folder is logged to an MLflow run of its own (experiment ``hdm-imports``)
and registered from that run's ``model/`` artifacts, so ``models:/hdm-dehaze/N`` loads it
the same way. The version's tags name its origin; one whose ``hdm.origin_sha256`` tag
matches is reused, so importing the same file twice registers it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from hdm_platform.tracking.mlflow_run import TrackedRun, source_tags
from hdm_platform.tracking.registry import (
    list_versions,
    register_model,
    registry_client,
    set_alias,
)

__all__ = ["IMPORTS_EXPERIMENT", "ORIGIN_SHA256_TAG", "register_imported"]

IMPORTS_EXPERIMENT = "hdm-imports"
ORIGIN_SHA256_TAG = "hdm.origin_sha256"


def register_imported(
    folder: str | Path,
    *,
    name: str,
    task: str,
    tracking_uri: str,
    origin_tags: Mapping[str, str],
    alias: str | None = None,
) -> tuple[ModelVersion, bool]:
    """Register ``folder`` as a version of ``name`` tagged with ``origin_tags`` (which must
    hold :data:`ORIGIN_SHA256_TAG`); returns the version and whether it is new."""
    client = registry_client(tracking_uri)
    sha256 = origin_tags[ORIGIN_SHA256_TAG]
    for version in list_versions(client, name):
        if version.tags.get(ORIGIN_SHA256_TAG) == sha256:
            if alias:
                version = set_alias(client, name=name, version=version.version, alias=alias)
            return version, False
    run = TrackedRun.create(
        tracking_uri=tracking_uri,
        experiment=IMPORTS_EXPERIMENT,
        run_name=f"import-{Path(folder).name}",
        tags={**source_tags(), "hdm.task": task, **origin_tags},
    )
    try:
        source = run.log_model_folder(folder)
        version = register_model(
            client, name=name, source=source, run_id=run.run_id, alias=alias, tags={"task": task}
        )
        # On the version only: the registered model also holds versions trained here.
        for key, value in origin_tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    except BaseException:
        run.finish(failed=True)
        raise
    run.finish()
    return client.get_model_version(name, version.version), True
