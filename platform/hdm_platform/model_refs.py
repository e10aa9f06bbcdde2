"""What enhances an image, by name: a registered model, a checkpoint folder, or a baseline.

Every command that runs a model (``hdm enhance``, ``hdm explain``, ``hdm evaluate``, the
jobs) resolves its model reference here, so they all accept the same things:

* ``models:/hdm-dehaze@champion`` or ``models:/hdm-dehaze/3``: a registered version (only
  its weights and config are downloaded; nothing is unpickled);
* a checkpoint folder, local or any fsspec URI: an ``hdm_model`` checkpoint
  (``model.safetensors`` + ``config.json``) or a training checkpoint (its ``model/``);
* ``http://HOST:PORT/v1/enhance/TASK`` (or ``https://``): a model served by ``hdm serve``,
  called over HTTP one image at a time (PNG both ways, so nothing is lost in transit;
  ``$HDM_API_KEY`` is sent as the bearer key when set);
* ``dcp``: the classic dark-channel-prior dehazer (the paper's "DCP" column);
* ``input``: no enhancement at all, the degraded input itself (the "hazy input" row of a
  comparison).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hdm_model import HDM, enhance, load_checkpoint, prepare_for_inference
from hdm_model.checkpoint import EXPORTED_MODEL_DIR
from hdm_model.inference import tile_for
from hdm_model.priors import dehaze
from hdm_platform.data.storage import is_local, open_filesystem
from hdm_platform.imageio import encode_image, read_image
from hdm_platform.tracking.registry import is_registry_uri, load_registered

__all__ = [
    "BASELINES",
    "Enhancer",
    "HTTPEnhancerError",
    "is_http_reference",
    "load_enhancer",
    "load_model",
]

Enhancer = Callable[[Tensor], Tensor]

#: Non-learned "models": the classic dehazer, and the identity for the input's own scores.
BASELINES: dict[str, Callable[[Tensor], Tensor]] = {
    "dcp": lambda images: dehaze(images),
    "input": lambda images: images.clamp(0.0, 1.0),
}
_FILES = ("config.json", "model.safetensors")
#: Seconds to wait for one served image (a large photo on a CPU replica takes a while).
HTTP_TIMEOUT_S = 600.0


class HTTPEnhancerError(RuntimeError):
    """A served model answered with an error (or not at all); the message says which."""


def is_http_reference(reference: str) -> bool:
    """Whether ``reference`` names a served endpoint rather than weights."""
    return reference.startswith(("http://", "https://"))


def _http_enhancer(url: str, device: str | torch.device) -> Enhancer:
    """Each image of a batch POSTed to ``url`` as PNG; the PNG answers decoded back."""
    headers = {"Content-Type": "image/png", "Accept": "image/png"}
    if api_key := os.environ.get("HDM_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"

    def post(image: Tensor) -> Tensor:
        request = urllib.request.Request(url, data=encode_image(image), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                return read_image(response.read(), name=url)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise HTTPEnhancerError(f"{url} answered {error.code}: {detail}") from None
        except OSError as error:
            raise HTTPEnhancerError(f"{url}: {error}") from None

    def run(images: Tensor) -> Tensor:
        return torch.stack([post(image.cpu()) for image in images]).to(device)

    return run


def load_model(
    reference: str,
    *,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> HDM:
    """The network a registry URI or a checkpoint folder names, in eval mode on ``device``."""
    if is_registry_uri(reference):
        return load_registered(reference, tracking_uri=tracking_uri, device=device)  # type: ignore[return-value]
    filesystem, path = open_filesystem(reference, storage_options)
    if not filesystem.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {reference}")
    if filesystem.isfile(f"{path}/{EXPORTED_MODEL_DIR}/config.json"):  # a training checkpoint
        path = f"{path}/{EXPORTED_MODEL_DIR}"
    if is_local(filesystem):
        return load_checkpoint(path, device=device)
    with tempfile.TemporaryDirectory(prefix="hdm-model-") as staging:
        for name in _FILES:
            filesystem.get_file(f"{path}/{name}", os.path.join(staging, name))
        return load_checkpoint(staging, device=device)


def load_enhancer(
    reference: str,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    tile: int | None = None,
    tile_overlap: int | None = None,
    tracking_uri: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Enhancer:
    """A function ``[B, 3, H, W] -> [B, 3, H, W]`` in [0, 1] for ``reference``, tiled by
    :func:`hdm_model.inference.tile_for` (``tile=None``: whole up to a megapixel)."""
    if reference in BASELINES:
        baseline = BASELINES[reference]
        return lambda images: baseline(images.to(device))
    if is_http_reference(reference):
        return _http_enhancer(reference, device)
    model = load_model(
        reference, device=device, tracking_uri=tracking_uri, storage_options=storage_options
    )
    if model.config.mask_source == "external":
        raise ValueError(
            f"{reference} needs an external guide map (mask_source 'external'), "
            "which only the Python API (hdm_model.enhance(..., guide=...)) takes"
        )
    model = prepare_for_inference(model, device=device)

    def run(images: Tensor) -> Tensor:
        return enhance(
            model,
            images.to(device),
            precision=precision,
            tile=tile_for(*images.shape[-2:], tile, model_tile=model.config.inference_tile),
            tile_overlap=tile_overlap,
        )

    return run
