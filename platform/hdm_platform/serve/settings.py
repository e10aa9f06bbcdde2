"""The Serve application's typed arguments: the ``args:`` of an application in ``serve_configs/``.

``build_app`` (``hdm_platform.serve.app``) takes a :class:`ServeAppArgs`; ``serve run``,
``serve deploy`` and ``hdm serve up`` validate a config's ``args`` against it. Each task's
:class:`ModelSettings` becomes that model deployment's ``user_config``, so a deployment's
``user_config`` in a config (which overrides the builder's) is validated by the same class
when a replica applies it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hdm_model.config import DEFAULT_TILE_OVERLAP, FEATURE_STRIDE
from hdm_platform.config import ConfigError, validation_message
from hdm_platform.vocabulary import TASKS, Task, registered_model_name

__all__ = [
    "DEFAULT_APP_NAME",
    "DEFAULT_BATCH_WAIT_TIMEOUT_S",
    "DEFAULT_MAX_BATCH_SIZE",
    "ApiKeySettings",
    "Limits",
    "ModelSettings",
    "ServeAppArgs",
]

#: The application name every config in ``serve_configs/`` uses; ``hdm serve`` defaults to it.
DEFAULT_APP_NAME = "hdm"
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Settings):
    """One task's model and how its replicas run it (the deployment's ``user_config``)."""

    model: str = Field(
        description="models:/NAME@ALIAS or models:/NAME/VERSION from the MLflow registry, "
        "or a checkpoint folder (local path or any fsspec URI)."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else HDM_HOME's SQLite.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica has a GPU."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 where it is faster (CUDA with bf16, CPUs with AMX or AMD AVX512_BF16)."
    )
    tile: int | None = Field(
        None,
        ge=0,
        multiple_of=FEATURE_STRIDE,
        description="Tile side; None: the model's own inference_tile if it has one, else whole "
        "images up to 1 MPix and 512-pixel tiles above (as hdm enhance); 0: never tile.",
    )
    tile_overlap: int | None = Field(
        None,
        ge=0,
        multiple_of=FEATURE_STRIDE,
        description="Pixels neighbouring tiles share; None: the model's own inference_tile_overlap "
        f"for its own tile, else {DEFAULT_TILE_OVERLAP}.",
    )
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE,
        ge=1,
        description="Same-shape images run as one batch of at most this many.",
    )
    batch_wait_timeout_s: float = Field(
        DEFAULT_BATCH_WAIT_TIMEOUT_S,
        ge=0,
        description="How long a batch waits to fill before it runs.",
    )

    @model_validator(mode="after")
    def _tile_exceeds_overlap(self) -> ModelSettings:
        if self.tile and self.tile_overlap is not None and self.tile <= self.tile_overlap:
            raise ValueError(f"tile ({self.tile}) must exceed tile_overlap ({self.tile_overlap})")
        return self


class Limits(_Settings):
    """What one request may cost; beyond these the ingress answers 413 or 504."""

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Upload size (413 above).")
    max_pixels: int = Field(
        25_000_000, ge=1, description="Decoded width x height, read from the header (413 above)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Whole request: upload, decoding, inference, encoding (504 after)."
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="Retry-After of a 503 when the deployment's backpressure_config sets none.",
    )


class ApiKeySettings(_Settings):
    """Where API keys come from. With at least one key, every route but ``/healthz`` needs
    ``Authorization: Bearer KEY``; with none, the API is open."""

    env_var: str | None = Field(
        "HDM_API_KEYS", description="Environment variable holding comma-separated keys."
    )
    file: str | None = Field(
        None, description="File with one key per line ('#' starts a comment); must hold a key."
    )


def _registry_champions() -> dict[Task, ModelSettings]:
    return {task: ModelSettings(model=f"models:/{registered_model_name(task)}@champion") for task in TASKS}


class ServeAppArgs(_Settings):
    """``args:`` of the HDM application: one model deployment per task, and the ingress."""

    tasks: dict[Task, ModelSettings] = Field(
        default_factory=_registry_champions,
        min_length=1,
        description="The tasks served and their models; default: each task's registry champion.",
    )
    limits: Limits = Limits()
    api_keys: ApiKeySettings = ApiKeySettings()

    @classmethod
    def parse(cls, raw: Any, *, source: str = "args", field: str = "") -> ServeAppArgs:
        """Validate ``raw``; a bad value raises ``ConfigError`` naming ``source`` and the
        field (its dotted name after ``field``)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise ConfigError(validation_message(error, source=source, field=field)) from None
