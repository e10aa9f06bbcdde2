"""The model deployment: one per task, each replica holding one HDM network.

A replica loads its model from the deployment's ``user_config`` (a ``ModelSettings``):
only the weights and the config, through ``hdm_platform.model_refs.load_model``, so nothing
is unpickled; a registry alias is resolved once, to the version it names at that moment.
It prepares the network for fast inference (channels_last, folded head, bfloat16 where
faster), runs one warm-up image, and only then does Serve route requests to it.

Requests are batched with ``@serve.batch``; within a batch, images of the same shape run
as one tensor batch, and images above 1 MPix run alone in overlapping tiles (bounded
memory), as ``hdm enhance`` runs them; a model with its own ``inference_tile`` runs in those
tiles, batched. Each batch runs on the model that was current when
it started: ``reload`` (``hdm serve reload TASK``) and a new ``user_config`` load the new
model beside the old one and swap it in, so requests in flight finish on the old weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel
from ray import serve
from torch import Tensor

from hdm_model import HDM, enhance, prepare_for_inference
from hdm_model.inference import resolve_device, resolve_precision, tile_for
from hdm_platform.config import resolve_tracking_uri
from hdm_platform.vocabulary import Task
from hdm_platform.model_refs import load_model
from hdm_platform.explain import explain_figure
from hdm_platform.serve.errors import ExplainUnsupportedError
from hdm_platform.serve.metrics import ModelMetrics
from hdm_platform.serve.settings import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    ModelSettings,
)
from hdm_platform.tracking.registry import (
    is_registry_uri,
    registry_client,
    resolve_version,
)

__all__ = [
    "BATCHES_IN_FLIGHT",
    "QUEUED_BATCHES",
    "Enhanced",
    "LoadedModel",
    "ModelInfo",
    "Stage",
    "TaskModel",
    "load_task_model",
]

#: A replica takes ``max_ongoing_requests = BATCHES_IN_FLIGHT * max_batch_size``: one batch
#: running and the next one filling, so a full batch is always ready.
BATCHES_IN_FLIGHT = 2
#: Each caller queues at most ``QUEUED_BATCHES * max_batch_size`` requests per task before
#: Serve refuses more (``max_queued_requests``; HTTP 503).
QUEUED_BATCHES = 8
_WARMUP_SIZE = 64


class ModelInfo(BaseModel):
    """What a replica serves; ``GET /v1/models`` lists one per task."""

    task: Task
    reference: str
    registered_model: str | None
    version: str | None
    alias: str | None
    model_version: str
    weights_sha256: str
    parameters: int
    config: dict[str, Any]
    device: str
    precision: str


@dataclass(frozen=True)
class Stage:
    """One model's part in a result: which version ran it, how long, in a batch of how many."""

    task: str
    model_version: str
    inference_ms: float
    batch_size: int


@dataclass(frozen=True)
class Enhanced:
    """An enhanced image ``[3, H, W]`` in [0, 1] and the stages that produced it, in order."""

    image: Tensor
    stages: tuple[Stage, ...]


def _device(requested: str) -> torch.device:
    try:
        return resolve_device(requested)
    except ValueError as error:
        raise ValueError(f"{error}: give the deployment ray_actor_options.num_gpus: 1") from None


def _weights_sha256(network: HDM) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A network prepared for inference with the settings and the description it came from."""

    network: HDM
    settings: ModelSettings
    info: ModelInfo

    def tile_for(self, height: int, width: int) -> int | None:
        """The rule every inference path shares (:func:`hdm_model.inference.tile_for`)."""
        return tile_for(height, width, self.settings.tile, model_tile=self.network.config.inference_tile)

    def runs_alone(self, height: int, width: int) -> bool:
        """Whether images of this size run one at a time: those tiled to bound memory (above
        1 MPix, or by the deployment's ``tile``), since tiling bounds one image's memory, not a
        batch's. A model's own small ``inference_tile`` batches its tiles and needs no such bound."""
        return tile_for(height, width, self.settings.tile) is not None

    def run(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> enhanced, on the CPU."""
        tile = self.tile_for(*images.shape[-2:])
        return enhance(
            self.network,
            images,
            precision=self.info.precision,
            tile=tile,
            tile_overlap=self.settings.tile_overlap,
        ).cpu()


def load_task_model(task: Task, settings: ModelSettings) -> LoadedModel:
    """Load, prepare and warm up ``settings.model`` for ``task`` (blocking)."""
    device = _device(settings.device)
    tracking_uri = resolve_tracking_uri(settings.tracking_uri)
    reference, version, alias = settings.model, None, None
    if is_registry_uri(reference):
        # Pin the version the alias names now: the weights and the reported version agree
        # even if the alias moves while the files download.
        version = resolve_version(registry_client(tracking_uri), reference)
        reference = f"models:/{version.name}/{version.version}"
        alias = settings.model.partition("@")[2] or None
    network = load_model(reference, device=device, tracking_uri=tracking_uri)
    if network.config.mask_source == "external":
        raise ValueError(f"{settings.model} needs an external guide map, which HTTP requests lack")
    weights_sha256 = _weights_sha256(network)
    # What responses name the model by: its registry version, else its weights' digest.
    model_version = (
        f"{version.name}/{version.version}" if version else f"sha256:{weights_sha256[:12]}"
    )
    network = prepare_for_inference(network, device=device)
    info = ModelInfo(
        task=task,
        reference=settings.model,
        registered_model=version.name if version else None,
        version=str(version.version) if version else None,
        alias=alias,
        model_version=model_version,
        weights_sha256=weights_sha256,
        parameters=sum(parameter.numel() for parameter in network.parameters()),
        config=network.config.to_dict(),
        device=str(device),
        precision=resolve_precision(settings.precision, device),
    )
    loaded = LoadedModel(network=network, settings=settings, info=info)
    # The first call on a shape builds the kernels; pay it here, before Serve routes traffic.
    warmup = torch.rand(
        1, 3, _WARMUP_SIZE, _WARMUP_SIZE, generator=torch.Generator().manual_seed(0)
    )
    loaded.run(warmup)
    return loaded


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=BATCHES_IN_FLIGHT * DEFAULT_MAX_BATCH_SIZE,
    max_queued_requests=QUEUED_BATCHES * DEFAULT_MAX_BATCH_SIZE,
)
class TaskModel:
    """Serves one task's model: ``enhance`` (batched), ``explain``, ``describe``, ``reload``."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self._loaded: LoadedModel | None = None
        self._loading = asyncio.Lock()
        self._metrics = ModelMetrics(task)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` before the replica takes
        requests, and again whenever the config changes it."""
        await self._load(ModelSettings.model_validate(user_config))

    async def reload(self) -> ModelInfo:
        """Load the model again with the same settings: a moved alias, or new files at a
        checkpoint path, take effect. Called on every replica by ``hdm serve reload``."""
        return (await self._load(self._current.settings)).info

    async def _load(self, settings: ModelSettings) -> LoadedModel:
        async with self._loading:
            # Loading takes seconds; the event loop keeps serving on the current model.
            loaded = await asyncio.to_thread(load_task_model, self._task, settings)
            self._enhance_batch.set_max_batch_size(settings.max_batch_size)
            self._enhance_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
            self._loaded = loaded
            return loaded

    @property
    def _current(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError(f"no {self._task} model loaded yet")
        return self._loaded

    def describe(self) -> ModelInfo:
        return self._current.info

    async def enhance(self, image: Tensor | Enhanced) -> Enhanced:
        """Enhance ``[3, H, W]`` in [0, 1]. An ``Enhanced`` (a previous task's result, when a
        pipeline chains deployment handles) is enhanced further and keeps its stages."""
        earlier: tuple[Stage, ...] = ()
        if isinstance(image, Enhanced):
            earlier, image = image.stages, image.image
        output, stage = await self._enhance_batch(image)
        return Enhanced(image=output, stages=(*earlier, stage))

    @serve.batch(
        max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S
    )
    async def _enhance_batch(self, images: list[Tensor]) -> list[tuple[Tensor, Stage]]:
        # The whole batch runs on the model current now, even if a reload swaps it meanwhile.
        loaded = self._current
        shapes: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            shapes.setdefault(tuple(image.shape), []).append(index)
        results: list[tuple[Tensor, Stage]] = [None] * len(images)  # type: ignore[list-item]
        for shape, indices in shapes.items():
            groups = [[index] for index in indices] if loaded.runs_alone(*shape[-2:]) else [indices]
            for group in groups:
                started = time.perf_counter()
                batch = torch.stack([images[index] for index in group])
                outputs = await asyncio.to_thread(loaded.run, batch)
                seconds = time.perf_counter() - started
                self._metrics.record_batch(len(group), seconds)
                stage = Stage(
                    task=self._task,
                    model_version=loaded.info.model_version,
                    inference_ms=seconds * 1000.0,
                    batch_size=len(group),
                )
                for index, output in zip(group, outputs):
                    # clone: a view would carry the whole batch's storage back to the caller.
                    results[index] = (output.clone(), stage)
        return results

    async def explain(self, image: Tensor) -> Image.Image:
        """The DCP priors and region masks of ``image`` as one picture (``hdm explain``'s)."""
        config = self._current.network.config
        if config.mask_source != "dcp":
            raise ExplainUnsupportedError(
                f"the {self._task} model uses mask_source={config.mask_source!r}; "
                "explain draws dark-channel-prior masks"
            )
        return await asyncio.to_thread(explain_figure, image, config)
