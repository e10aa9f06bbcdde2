"""The one typed experiment schema shared by the CLI, the jobs, Tune and Serve.

An experiment is a YAML file (``jobs/configs/*.yaml``, one per paper experiment, in the
spirit of BasicSR's option files) validated by :class:`ExperimentConfig`. ``--set a.b=c``
overrides are applied to the raw mapping before validation, so a typo in either place is
rejected with the dotted name of the field before any Ray resource starts.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from hdm_model.config import VARIANT_NAMES, HDMConfig, variant_config
from hdm_platform.vocabulary import TASKS, Task, registered_model_name

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "MLflowConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "StorageConfig",
    "TASKS",
    "Task",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "local_home",
    "parse_overrides",
    "read_yaml_mapping",
    "resolve_tracking_uri",
    "validation_message",
]

class ConfigError(ValueError):
    """An experiment config that cannot be used; the message names the field."""


def local_home() -> Path:
    """Where the laptop defaults keep their state: ``$HDM_HOME`` or ``./.hdm``."""
    return Path(os.environ.get("HDM_HOME", ".hdm")).expanduser().resolve()


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The MLflow tracking URI every command uses: ``explicit``, else ``$MLFLOW_TRACKING_URI``,
    else SQLite under :func:`local_home`."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{local_home() / 'mlflow.db'}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _model_settings_fields() -> dict[str, Any]:
    # Every HDMConfig field becomes an optional, typed key of the `model:` section, so the
    # schema follows the model library without a second list of names to keep in sync.
    hints = typing.get_type_hints(HDMConfig)
    return {
        field.name: (hints[field.name] | None, None) for field in dataclasses.fields(HDMConfig)
    }


_ModelSettings = create_model(  # type: ignore[call-overload]
    "_ModelSettings", __base__=_Section, **_model_settings_fields()
)


class ModelConfig(_ModelSettings):  # type: ignore[misc, valid-type]
    """A Table 5 variant plus any HDMConfig field that differs from the variant's preset."""

    variant: str = "HDM"

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        if value not in VARIANT_NAMES:
            raise ValueError(f"unknown variant {value!r}; choose one of {sorted(VARIANT_NAMES)}")
        return value

    def settings(self) -> dict[str, Any]:
        """The HDMConfig fields set explicitly, as plain values."""
        return {
            name: getattr(self, name)
            for name in self.model_fields_set
            if name != "variant" and getattr(self, name) is not None
        }

    def to_hdm_config(self) -> HDMConfig:
        return variant_config(self.variant, **self.settings())


class StorageConfig(_Section):
    """Object-storage settings; credentials stay in the usual AWS environment variables."""

    endpoint_url: str | None = None
    region: str | None = None

    def storage_options(self) -> dict[str, Any]:
        return {key: value for key, value in self.model_dump().items() if value is not None}


class DataConfig(_Section):
    uri: str = Field(description="Dataset root (the folder holding manifest.json); any fsspec URI.")
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = Field(256, ge=8, multiple_of=4)
    val_crop_size: int | None = Field(None, ge=8, multiple_of=4, description="None: full images.")
    augment: bool = True
    shuffle_buffer_size: int = Field(64, ge=0)


class LossConfig(_Section):
    """L1 plus a weighted VGG16 perceptual loss (paper section 4; the weight is not given)."""

    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(0.04, ge=0)
    vgg_weights: str | None = Field(
        None, description="Path or URI of torchvision's VGG16 weights (.pth or .safetensors)."
    )


class TrainConfig(_Section):
    """The paper's recipe: Adam (0.9, 0.999), lr 2e-4, global batch 16, cosine annealing."""

    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps.")
    batch_size: int = Field(16, ge=1, description="Global batch, split across the workers.")
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float | None = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    val_every_epochs: int = Field(1, ge=1)
    val_every_steps: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(3, ge=1, description="Best K by validation PSNR.")
    log_every_steps: int = Field(10, ge=1)
    logged_val_images: int = Field(4, ge=0)
    seed: int = 0


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name; re-running with it resumes.")
    storage_path: str | None = Field(None, description="Local folder or URI; default HDM_HOME/runs.")
    max_failures: int = Field(2, ge=0)

    def resolved_storage_path(self) -> str:
        if self.storage_path is None:
            return str(local_home() / "runs")
        if "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path).expanduser().resolve())


class MLflowConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI, else SQLite under HDM_HOME."
    )
    experiment: str = "hdm"
    register_model: bool = Field(True, description="Register the finished run's model.")
    registered_model: str | None = Field(None, description="Default: hdm-<task>.")
    alias: str | None = "challenger"

    def resolved_tracking_uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri)


class ExperimentConfig(_Section):
    name: str
    task: Task
    model: ModelConfig = ModelConfig()
    data: DataConfig
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    mlflow: MLflowConfig = MLflowConfig()
    storage: StorageConfig = StorageConfig()

    def registered_model_name(self) -> str:
        return self.mlflow.registered_model or registered_model_name(self.task)

    def run_name(self) -> str:
        return self.run.name or self.name

    def flat(self) -> dict[str, Any]:
        """Dotted keys to plain values: MLflow params and Tune search spaces use these."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = value

        walk("", self.model_dump(mode="json"))
        return flat


def parse_overrides(assignments: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "model.num_regions=3"]`` as (dotted key, YAML-typed value) pairs."""
    parsed = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {assignment!r} is not of the form key=value")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping, creating sections as needed; returns ``raw``."""
    for dotted, value in overrides:
        node = raw
        *parents, leaf = dotted.split(".")
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parents[: index + 1])
                raise ConfigError(f"cannot set {dotted!r}: {path!r} is a value, not a section")
            node = child
        node[leaf] = value
    return raw


def _dotted(location: tuple[Any, ...]) -> str:
    return "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
    ).lstrip(".")


def validation_message(error: ValidationError, *, source: str, field: str = "") -> str:
    """``invalid SOURCE:`` then one line per problem, naming its field (under ``field``)."""
    lines = [f"invalid {source}:"]
    for item in error.errors():
        location = ".".join(filter(None, [field, _dotted(item["loc"])]))
        lines.append(f"  {location or '<root>'}: {item['msg']}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], *, source: str = "config") -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(raw)
        config.model.to_hdm_config()
    except ValidationError as error:
        raise ConfigError(validation_message(error, source=f"experiment config {source}")) from None
    except ValueError as error:
        raise ConfigError(f"invalid experiment config {source}: model: {error}") from None
    return config


def read_yaml_mapping(source: str, kind: str) -> dict[str, Any]:
    """The mapping a YAML file holds (a path or any fsspec URI); ``ConfigError`` names
    ``kind`` and ``source`` when it is missing, unreadable, not YAML or not a mapping."""
    import fsspec

    try:
        with fsspec.open(source, "r", encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{kind} not found: {source}") from None
    except OSError as error:
        raise ConfigError(f"cannot read {kind} {source}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{kind} {source} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} {source} must be a mapping at the top level")
    return raw


def load_config(path: str | os.PathLike[str], overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (a path or any fsspec URI), apply ``--set`` overrides, validate."""
    source = os.fspath(path)
    raw = read_yaml_mapping(source, "experiment config")
    apply_overrides(raw, parse_overrides(overrides))
    return validate_config(raw, source=source)
