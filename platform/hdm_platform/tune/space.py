"""Search spaces: a YAML file beside the experiment configs, checked before any trial starts.

A space names experiment settings by their dotted config keys and gives each a list of
values or a range::

    searcher: optuna            # grid | random | optuna
    num_samples: 16             # trials (random, optuna); grid: passes over the whole grid
    asha: {grace_period: 2, reduction_factor: 3}   # or `asha: false` to run every trial out
    params:
      train.lr: {loguniform: [5.0e-5, 1.0e-3]}
      loss.perceptual_weight: {uniform: [0.0, 0.1]}
      model.num_regions: {int: [3, 7]}
      data.crop_size: [128, 192, 256]

A list is the grid of a grid search and a categorical choice otherwise. :meth:`SearchSpace.check`
applies every listed value and every range end to the experiment and runs the schema and
training's preflight on the result, so an unknown key, a value out of range or a setting
training rejects (e.g. ``model.mask_source: external``) fails with the key's name before
Ray starts. Combinations of values are not enumerated; a trial that still fails is retried
and then reported failed without stopping the sweep.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from hdm_platform.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    read_yaml_mapping,
    validate_config,
    validation_message,
)
from hdm_platform.train.driver import preflight
from hdm_platform.tune.ablations import PAPER_TABLES

__all__ = [
    "SEARCHABLE_SECTIONS",
    "AshaSettings",
    "Choice",
    "FloatRange",
    "IntRange",
    "SearchSpace",
    "load_space",
    "planned_validations",
]

SearcherName = Literal["grid", "random", "optuna"]
PaperTableName = Literal["table4", "table5", "table6", "regions"]

#: Config sections a trial may vary; scaling, run, mlflow and storage belong to the sweep.
SEARCHABLE_SECTIONS = ("model", "data", "loss", "train")
#: Settings that change how many validations a run makes, so ASHA's default horizon.
_HORIZON_KEYS = ("train.epochs", "train.max_steps", "train.val_every_epochs", "train.val_every_steps")


@dataclass(frozen=True)
class Choice:
    """Listed values: the grid of a grid search, a categorical choice otherwise."""

    values: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        return self.values


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool

    def candidates(self) -> tuple[Any, ...]:
        return (self.low, self.high)


@dataclass(frozen=True)
class IntRange:
    """Integers from ``low`` to ``high`` inclusive, multiples of ``step`` when it is above 1."""

    low: int
    high: int
    step: int = 1

    def candidates(self) -> tuple[Any, ...]:
        # With a step, an inner value shows whether the step keeps values valid (e.g. a crop
        # size must stay a multiple of 4).
        inner = (self.low + self.step,) if self.step > 1 and self.low + self.step < self.high else ()
        return (self.low, *inner, self.high)


Param = Choice | FloatRange | IntRange


class AshaSettings(BaseModel):
    """ASHA early stopping on validation PSNR; times count validations (Tune iterations)."""

    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(1, ge=1, description="Validations before a trial can be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="1/reduction_factor go on at each rung.")
    max_t: int | None = Field(
        None, ge=1, description="Most validations per trial; default: what the experiment plans."
    )


class _SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    searcher: SearcherName
    num_samples: int = Field(1, ge=1)
    seed: int = 0
    asha: dict[str, Any] | Literal[False] = Field(
        default_factory=dict, description="AshaSettings, or false to run every trial out."
    )
    max_concurrent_trials: int | None = Field(None, ge=1, description="Cap; the cluster sets the rest.")
    paper_table: PaperTableName | None = None
    params: dict[str, Any] = Field(min_length=1)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file; :meth:`check` it against the experiment before sweeping."""

    name: str
    source: str
    searcher: SearcherName
    num_samples: int
    seed: int
    asha: AshaSettings | None
    max_concurrent_trials: int | None
    paper_table: PaperTableName | None
    params: dict[str, Param]

    def definition(self) -> dict[str, Any]:
        """The space as plain values (MLflow params of the sweep's parent run)."""
        return {
            "searcher": self.searcher,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "asha": self.asha.model_dump() if self.asha is not None else False,
            "max_concurrent_trials": self.max_concurrent_trials,
            "paper_table": self.paper_table,
            "params": {key: _describe_param(param) for key, param in self.params.items()},
        }

    def check(self, base: dict[str, Any]) -> ExperimentConfig:
        """Validate every key and candidate value against the experiment ``base`` (raw mapping).

        Returns the validated base experiment.

        Raises:
            ConfigError: naming the space file and the key (and value) that cannot be used.
        """
        experiment = validate_config(copy.deepcopy(base), source="(the sweep's base experiment)")
        known = experiment.flat()
        for key, param in self.params.items():
            section = key.split(".", 1)[0]
            if key not in known:
                raise ConfigError(
                    f"search space {self.source}: params.{key} is not an experiment setting "
                    f"(searchable keys look like model.num_regions, loss.l1_weight, train.lr)"
                )
            if section not in SEARCHABLE_SECTIONS:
                raise ConfigError(
                    f"search space {self.source}: params.{key} cannot be searched: trials vary "
                    f"{', '.join(SEARCHABLE_SECTIONS)} settings; {section} applies to the whole sweep"
                )
            for value in param.candidates():
                raw = apply_overrides(copy.deepcopy(base), [(key, value)])
                try:
                    preflight(validate_config(raw, source=f"with {key}={value!r}"))
                except ConfigError as error:
                    raise ConfigError(
                        f"search space {self.source}: params.{key} value {value!r} is not usable: {error}"
                    ) from None
        if self.asha is not None and self.asha.max_t is None:
            horizon = sorted(set(_HORIZON_KEYS) & set(self.params))
            if horizon:
                raise ConfigError(
                    f"search space {self.source}: asha.max_t must be given when params.{horizon[0]} "
                    f"is searched: trials then plan different numbers of validations"
                )
        return experiment

    def candidate_configs(self, base: dict[str, Any], key: str) -> dict[Any, ExperimentConfig]:
        """The experiment with each listed value of ``key`` applied (for paper-table checks)."""
        param = self.params[key]
        return {
            value: validate_config(apply_overrides(copy.deepcopy(base), [(key, value)]))
            for value in param.candidates()
        }

    def param_space(self) -> dict[str, Any]:
        """The Tune ``param_space``: dotted keys to Tune domains."""
        return {key: _tune_domain(param, grid=self.searcher == "grid") for key, param in self.params.items()}

    def search_algorithm(self, *, max_concurrent: int) -> SearchAlgorithm | Searcher:
        """The searcher, running at most ``max_concurrent`` trials at a time."""
        if self.searcher == "optuna":
            # Tree-structured Parzen estimator, seeded; metric and mode come from TuneConfig.
            return ConcurrencyLimiter(OptunaSearch(seed=self.seed), max_concurrent=max_concurrent)
        # Grid and random both expand the param space; random draws with this seed.
        return BasicVariantGenerator(random_state=self.seed, max_concurrent=max_concurrent)

    def asha_max_t(self, experiment: ExperimentConfig) -> int:
        """ASHA's horizon in validations: the space's ``max_t`` or what the experiment plans."""
        assert self.asha is not None
        return self.asha.max_t or planned_validations(experiment)


def planned_validations(experiment: ExperimentConfig) -> int:
    """Validations (Tune iterations) a run of ``experiment`` reports, without ``max_steps``.

    The loop validates every ``val_every_epochs`` epochs and once more at the end when the
    last epoch is not one of those; mid-epoch validations (``val_every_steps``) are not
    counted, so a space using them gives ``asha.max_t`` itself.
    """
    return math.ceil(experiment.train.epochs / experiment.train.val_every_epochs)


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and structurally validate a space file (no experiment needed yet).

    Raises:
        ConfigError: naming the file and the offending key.
    """
    source = os.fspath(path)
    raw = read_yaml_mapping(source, "search space")
    try:
        parsed = _SpaceFile.model_validate(raw)
        asha = AshaSettings.model_validate(parsed.asha) if parsed.asha is not False else None
    except ValidationError as error:
        # Both models' errors name the key; AshaSettings' lack their "asha." prefix.
        field = "asha" if error.title == AshaSettings.__name__ else ""
        raise ConfigError(validation_message(error, source=f"search space {source}", field=field)) from None
    params = {key: _parse_param(source, key, spec) for key, spec in parsed.params.items()}
    if parsed.searcher == "grid":
        ranges = [key for key, param in params.items() if not isinstance(param, Choice)]
        if ranges:
            raise ConfigError(
                f"search space {source}: params.{ranges[0]} is a range, but the grid searcher "
                f"needs a list of values; use searcher: random or optuna for ranges"
            )
    space = SearchSpace(
        name=Path(source).stem,
        source=source,
        searcher=parsed.searcher,
        num_samples=parsed.num_samples,
        seed=parsed.seed,
        asha=asha,
        max_concurrent_trials=parsed.max_concurrent_trials,
        paper_table=parsed.paper_table,
        params=params,
    )
    if space.paper_table is not None:
        table = PAPER_TABLES[space.paper_table]
        if table.key not in params:
            raise ConfigError(
                f"search space {source}: paper_table {space.paper_table} compares values of "
                f"{table.key}, which params does not list"
            )
    return space


def _parse_param(source: str, key: str, spec: Any) -> Param:
    where = f"search space {source}: params.{key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: the list of values is empty")
        if len({yaml.safe_dump(value) for value in spec}) != len(spec):
            raise ConfigError(f"{where}: the list of values repeats a value")
        return Choice(tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: give a list of values or one of {{uniform: [low, high]}}, "
            f"{{loguniform: [low, high]}}, {{int: [low, high], step: n}}; got {spec!r}"
        )
    kinds = sorted(set(spec) & {"uniform", "loguniform", "int"})
    extra = sorted(set(spec) - {"uniform", "loguniform", "int", "step"})
    if len(kinds) != 1 or extra or ("step" in spec and kinds != ["int"]):
        raise ConfigError(
            f"{where}: a range is exactly one of uniform, loguniform or int (int may add step); "
            f"got keys {sorted(spec)}"
        )
    kind = kinds[0]
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise ConfigError(f"{where}.{kind}: give [low, high], got {bounds!r}")
    low, high = bounds
    if kind == "int":
        step = spec.get("step", 1)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (low, high, step)):
            raise ConfigError(f"{where}.int: low, high and step must be integers, got {spec!r}")
        if step < 1 or low >= high:
            raise ConfigError(f"{where}.int: needs low < high and step >= 1, got {spec!r}")
        if step > 1 and (low % step or high % step):
            # Tune rounds draws to multiples of step; ends off the step would be left out.
            raise ConfigError(f"{where}.int: low and high must be multiples of step {step}")
        return IntRange(low, high, step)
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in (low, high)):
        raise ConfigError(f"{where}.{kind}: low and high must be numbers, got {bounds!r}")
    if low >= high:
        raise ConfigError(f"{where}.{kind}: low must be below high, got {bounds!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be above 0, got {low!r}")
    return FloatRange(float(low), float(high), log=kind == "loguniform")


def _tune_domain(param: Param, *, grid: bool) -> Any:
    if isinstance(param, Choice):
        return tune.grid_search(list(param.values)) if grid else tune.choice(list(param.values))
    if isinstance(param, FloatRange):
        return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)
    if param.step > 1:
        return tune.qrandint(param.low, param.high, param.step)  # both ends included
    return tune.randint(param.low, param.high + 1)  # Tune's upper bound is exclusive


def _describe_param(param: Param) -> Any:
    if isinstance(param, Choice):
        return list(param.values)
    if isinstance(param, FloatRange):
        return {"loguniform" if param.log else "uniform": [param.low, param.high]}
    return {"int": [param.low, param.high], "step": param.step}
