"""The authors' published HDM weights (``hdm_haze_sots.pk``) as an ``hdm_model`` checkpoint.

The authors released one dehazing model, trained on RESIDE ITS and scored 38.56 dB PSNR on
SOTS indoor (paper Table 1), as ``trained_models/hdm_haze_sots.pk`` of
https://github.com/DongLiangSXU/HDM: a ``torch.save``\\d dict whose ``"model"`` entry is the
state dict of their ``DR_Net_phy`` saved from ``torch.nn.DataParallel`` (every key starts
with ``module.``). That network is this project's :class:`~hdm_model.HDM` at
``blocks_per_group=9`` with the code's defaults (64 channels, 3 groups, 5 regions, S, R, S, R
with shared weights), plus modules its ``forward`` never calls: the learned-mask region
block ``drconv`` and the mixup scalars ``mix3`` and ``mix4``. The file is read with
``torch.load(weights_only=True)`` only, so nothing in it can run code; every used key is
mapped by name, every shape is checked, and an unknown or missing key is an error.

The converted config computes the region masks as the authors' test script does
(``dcp_mask_mode="published"``, :mod:`hdm_model.published_masks`), which is what the
weights were scored with. Facts: ``shared/design/hdm-published-checkpoint.md``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hdm_model.checkpoint import save_checkpoint
from hdm_model.config import HDMConfig
from hdm_model.model import HDM

__all__ = [
    "PUBLISHED_CODE_URL",
    "PUBLISHED_WEIGHTS_URL",
    "PublishedCheckpointError",
    "PublishedConversion",
    "convert_published_state",
    "import_published",
    "published_config",
    "published_key_map",
    "read_published_state",
]

PUBLISHED_CODE_URL = "https://github.com/DongLiangSXU/HDM"
#: Where the authors' ``trained_models/README.md`` says the weights file is.
PUBLISHED_WEIGHTS_URL = "https://drive.google.com/file/d/1hlqQ6m5rZnxOjHcRewELeB8vAvsgM3wp/view?usp=share_link"
_DATA_PARALLEL_PREFIX = "module."
_WEIGHTS_ENTRY = "model"
#: Parts of ``DR_Net_phy`` that its ``forward`` never uses: the DRConv region block with
#: learned masks and two mixup scalars.
_UNUSED_PREFIXES = ("drconv.conv_kernel.", "drconv.conv_guide.")
_UNUSED_KEYS = ("mix3.w", "mix4.w")


class PublishedCheckpointError(ValueError):
    """A file that is not the published checkpoint (or one this converter cannot read)."""


def published_config() -> HDMConfig:
    """The settings that reproduce the published pipeline: the paper's HDM with the code's
    9 blocks per group and the test script's region masks."""
    return HDMConfig(blocks_per_group=9, dcp_mask_mode="published")


def _block_keys(group: int, block: int) -> dict[str, str]:
    source = f"FAB.{group}.gp.{block}."
    target = f"groups.{group}.body.{block}."
    parts = {
        "conv1": "conv1",
        "conv2": "conv2",
        "calayer.ca.0": "channel_attention.gate.0",
        "calayer.ca.2": "channel_attention.gate.2",
        "palayer.pa.0": "pixel_attention.gate.0",
        "palayer.pa.2": "pixel_attention.gate.2",
    }
    return {
        f"{source}{name}.{kind}": f"{target}{ours}.{kind}"
        for name, ours in parts.items()
        for kind in ("weight", "bias")
    }


def published_key_map(*, num_groups: int = 3, blocks_per_group: int = 9) -> dict[str, str]:
    """Every used ``DR_Net_phy`` key (without ``module.``) -> this project's HDM key."""
    layers = {
        "conv0.0": "encoder.stem.0",
        "conv1.0": "encoder.down1.0",
        "conv1.1": "encoder.down1.1",
        "conv2.0": "encoder.down2.0",
        "conv2.1": "encoder.down2.1",
        "dcn_block.dcn": "structure.0.deform_conv",
        # DCNv2's offset-and-mask conv: its 27 outputs are chunked (o1, o2, m), the offset is
        # cat(o1, o2) with tap k's (dy, dx) at channels (2k, 2k+1), as torchvision reads it.
        "dcn_block.dcn.conv_offset_mask": "structure.0.offset_conv",
        "drconv_phy.conv_kernel.1": "region.0.filter_generator.body.1",
        "drconv_phy.conv_kernel.3": "region.0.filter_generator.body.3",
        "deconv1.0": "decoder.up1.0",
        "deconv2.0": "decoder.up2.0",
        "output.0": "decoder.head.0",
        "output.1": "decoder.head.1",
        "output.2": "decoder.head.2",
    }
    mapping = {
        f"{source}.{kind}": f"{target}.{kind}"
        for source, target in layers.items()
        for kind in ("weight", "bias")
    }
    for group in range(num_groups):
        for block in range(blocks_per_group):
            mapping.update(_block_keys(group, block))
        mapping[f"FAB.{group}.gp.{blocks_per_group}.weight"] = f"groups.{group}.body.{blocks_per_group}.weight"
        mapping[f"FAB.{group}.gp.{blocks_per_group}.bias"] = f"groups.{group}.body.{blocks_per_group}.bias"
    # Mix(res2, x) mixes the 1/4 skip, Mix(res1, x) the 1/2 skip; the skip is the first term.
    mapping["mix1.w"] = "decoder.mix_quarter.weight"
    mapping["mix2.w"] = "decoder.mix_half.weight"
    return mapping


def _is_unused(key: str) -> bool:
    return key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES)


def read_published_state(path: str | Path) -> dict[str, Tensor]:
    """The weights in ``path``, keys without ``module.``, read with ``weights_only=True``.

    Takes the authors' layout (a dict with the state dict under ``"model"``) or a bare state
    dict. A file that needs pickled code to load is refused: it is never loaded another way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if reason.startswith("Unsupported operand"):  # not a pickle stream at all
            raise PublishedCheckpointError(f"{path} is not a readable torch file: {reason}") from None
        raise PublishedCheckpointError(
            f"{path} needs pickled code to load ({reason}); such files are refused, never "
            "loaded with weights_only=False: the published checkpoint holds only tensors and "
            "plain values"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise PublishedCheckpointError(f"{path} is not a readable torch file: {error}") from None
    state = loaded.get(_WEIGHTS_ENTRY, loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise PublishedCheckpointError(
            f"{path} holds {type(loaded).__name__}, not a state dict (expected a dict with "
            f"the weights under {_WEIGHTS_ENTRY!r}, as the authors saved it)"
        )
    return _strip_prefix(path, state)


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler stopped at (the rest of its message suggests
    loading the file unsafely)."""
    _, marker, reason = str(error).partition("WeightsUnpickler error:")
    reason = " ".join(reason.split("Check the documentation")[0].split(". Please")[0].split())
    return reason if marker and reason else "an object the weights-only unpickler refuses"


def _strip_prefix(path: Path, state: Mapping[Any, Any]) -> dict[str, Tensor]:
    stripped: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise PublishedCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a named tensor"
            )
        name = key.removeprefix(_DATA_PARALLEL_PREFIX)
        if name in stripped:
            raise PublishedCheckpointError(f"{path}: {name!r} appears with and without 'module.'")
        stripped[name] = value
    return stripped


@dataclass(frozen=True)
class PublishedConversion:
    """The converted network and what the conversion did."""

    model: HDM
    used_tensors: int
    used_values: int
    dropped: dict[str, int]  # unused published key -> its number of values

    @property
    def dropped_values(self) -> int:
        return sum(self.dropped.values())


def convert_published_state(state: Mapping[str, Tensor], *, source: str = "state dict") -> PublishedConversion:
    """This project's HDM holding ``state`` (published keys, ``module.`` stripped).

    Raises :class:`PublishedCheckpointError` naming every unknown key, every missing key
    and every shape that differs from the network's.
    """
    config = published_config()
    mapping = published_key_map(num_groups=config.num_groups, blocks_per_group=config.blocks_per_group)
    unknown = sorted(key for key in state if key not in mapping and not _is_unused(key))
    missing = sorted(key for key in mapping if key not in state)
    problems = []
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    model = HDM(config)
    expected = model.state_dict()
    for key in sorted(set(mapping) & set(state)):
        want, got = tuple(expected[mapping[key]].shape), tuple(state[key].shape)
        if want != got:
            problems.append(f"{key} has shape {list(got)}, expected {list(want)}")
        elif not state[key].is_floating_point():
            problems.append(f"{key} is {state[key].dtype}, expected floating point")
    if problems:
        raise PublishedCheckpointError(f"{source} is not the published DR_Net_phy: {'; '.join(problems)}")
    converted = {
        mapping[key]: state[key].detach().to(torch.float32).contiguous() for key in mapping
    }
    model.load_state_dict(converted, strict=True)
    return PublishedConversion(
        model=model.eval(),
        used_tensors=len(converted),
        used_values=sum(tensor.numel() for tensor in converted.values()),
        dropped={key: state[key].numel() for key in sorted(state) if _is_unused(key)},
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_published(
    path: str | Path, directory: str | Path, *, task: str = "dehaze"
) -> tuple[PublishedConversion, dict[str, Any]]:
    """Convert the published file at ``path`` into a checkpoint folder ``directory``
    (``model.safetensors`` + ``config.json``); returns the conversion and the metadata
    written, which names the file's origin and sha256."""
    path = Path(path)
    conversion = convert_published_state(read_published_state(path), source=str(path))
    metadata = {
        "task": task,
        "origin": "published",
        "origin_file": path.name,
        "origin_sha256": _sha256(path),
        "origin_code": PUBLISHED_CODE_URL,
        "origin_weights": PUBLISHED_WEIGHTS_URL,
        "origin_architecture": "DR_Net_phy",
        "paper": "Liang et al., ACM MM 2022; SOTS indoor 38.56 dB / 0.991 (Table 1)",
        "dropped_unused": sorted(conversion.dropped),
    }
    save_checkpoint(conversion.model, directory, metadata=metadata)
    return conversion, metadata
