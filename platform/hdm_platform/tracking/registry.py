"""The MLflow model registry: one registered model per task, aliases, pickle-free loading.

Each finished training run registers a version of ``hdm-<task>`` whose source is the run's
``model/`` artifact folder (``model.safetensors`` + ``config.json`` + ``metrics.json``).
Aliases (``challenger``, ``champion``) name versions; promoting moves an alias.
:func:`load_registered` resolves ``models:/hdm-dehaze@champion`` (or ``models:/NAME/3``),
downloads only the weights and the config, and builds the network with
:func:`hdm_model.load_checkpoint`, which never unpickles.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

# MLflow is imported where it is used (seconds of start-up): a model actor or replica that
# loads a checkpoint folder never needs it.

__all__ = [
    "MODEL_FILES",
    "download_model_files",
    "is_registry_uri",
    "list_versions",
    "load_registered",
    "register_model",
    "registry_client",
    "resolve_version",
    "set_alias",
]

#: The files a registered HDM model needs; everything else in the artifact folder is skipped.
MODEL_FILES = ("model.safetensors", "config.json")

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client whose registry is the tracking server (``None``: MLflow's usual lookup).

    A server that does not answer its health check fails here, at once, with its URI: MLflow's
    own client would retry every request with back-off for minutes.
    """
    import mlflow
    from mlflow import MlflowClient

    _check_server(tracking_uri or mlflow.get_tracking_uri())
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _check_server(uri: str, timeout_s: float = 10.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answers: the request itself will say what is wrong
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable: {reason}") from None


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def register_model(
    client: MlflowClient,
    *,
    name: str,
    source: str,
    run_id: str,
    alias: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Register ``source`` (a run's ``model/`` artifact URI) as a new version of ``name``.

    The registered model is created on first use; ``alias``, when given, is moved to the
    new version.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags=tags)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def set_alias(client: MlflowClient, *, name: str, version: int | str, alias: str) -> ModelVersion:
    """Point ``alias`` at ``version`` of ``name`` (moving it from any other version)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise ValueError(f"registered model {name!r} has no version {version}: {error.message}") from None
    client.set_registered_model_alias(name, alias, found.version)
    return client.get_model_version(name, found.version)


def list_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """All versions of ``name`` with their aliases, newest first (empty if not registered)."""
    found = client.search_model_versions(f"name = '{name}'")
    numbers = sorted((int(version.version) for version in found), reverse=True)
    # Search results leave out aliases; a version fetched by number carries them.
    return [client.get_model_version(name, str(number)) for number in numbers]


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    """The model version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names."""
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(
            f"model URI {uri!r} is not of the form models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name = match["name"]
    from mlflow.exceptions import MlflowException

    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException as error:
        raise ValueError(f"cannot resolve {uri}: {error.message}") from None


def download_model_files(
    uri: str, destination: str | Path, *, tracking_uri: str | None = None
) -> tuple[Path, ModelVersion]:
    """Download only :data:`MODEL_FILES` of the version ``uri`` names into ``destination``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    version = resolve_version(registry_client(tracking_uri), uri)
    # Two small files: MLflow's bar per file would only clutter a command's own progress line
    # (`hdm explain`, `hdm evaluate`); MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true keeps them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for filename in MODEL_FILES:
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source.rstrip('/')}/{filename}",
                dst_path=str(destination),
                tracking_uri=tracking_uri,
            )
        except (MlflowException, OSError) as error:
            raise FileNotFoundError(
                f"{uri} (version {version.version}, source {version.source}) lacks {filename}: "
                f"{error}"
            ) from None
    return destination, version


def load_registered(
    uri: str, *, tracking_uri: str | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The HDM network registered under ``uri``, in eval mode on ``device``."""
    from hdm_model import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="hdm-registered-") as staging:
        folder, _ = download_model_files(uri, staging, tracking_uri=tracking_uri)
        return load_checkpoint(folder, device=device)
