"""Full-reference evaluation of a model on one split of a dataset, as in the paper's tables.

The model is anything :mod:`hdm_platform.model_refs` resolves: a registered version
(``models:/hdm-dehaze@champion``), a checkpoint folder (local or any fsspec URI), ``dcp`` (the
classic dark-channel-prior dehazer, the "DCP" column of the paper's Table 1) or ``input``
(the degraded input itself, the "hazy" row of a comparison). Every pair of
the split is enhanced at full size (the network pads internally) and measured with
:func:`hdm_model.metrics.image_metrics` (PSNR / SSIM on RGB and on Y, 8-bit quantised);
the result has one row per image and the averages. Shards are read one at a time with
pyarrow, so memory stays bounded by one shard and one image.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm import tqdm

from hdm_model.metrics import image_metrics
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.storage import open_filesystem, write_atomic
from hdm_platform.imageio import ImageError, decode_rgb8
from hdm_platform.tracking.mlflow_run import TrackedRun, source_tags
from hdm_platform.model_refs import load_enhancer

__all__ = [
    "METRICS",
    "EvaluationResult",
    "evaluate",
    "iter_split_pairs",
    "log_evaluation",
    "write_csv",
]

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
_CSV_FIELDS = ("id", "width", "height", *METRICS, "seconds")


@dataclass(frozen=True)
class EvaluationResult:
    """Per-image rows (``id``, size, metrics, seconds) and the averages over the split.

    An output identical to its target has infinite PSNR; ``means`` averages the finite
    values and ``perfect_images`` counts the others.
    """

    model: str
    data: str
    split: str
    rows: list[dict[str, Any]]
    means: dict[str, float]
    perfect_images: int

    def summary(self) -> str:
        averages = ", ".join(f"{name} {self.means[name]:.4f}" for name in METRICS)
        return f"{self.model} on {self.data} [{self.split}], {len(self.rows)} images: {averages}"


def iter_split_pairs(
    data: str, split: str, *, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, input, target)`` as 8-bit RGB arrays for every pair of ``split``, in order."""
    manifest = Manifest.load(data, storage_options=storage_options)
    if split not in manifest.splits:
        raise ValueError(f"dataset {data} has no split {split!r}; it has {sorted(manifest.splits)}")
    for shard_uri in manifest.shard_uris(split):
        filesystem, path = open_filesystem(shard_uri, storage_options)
        with filesystem.open(path, "rb") as handle:
            shard = pq.ParquetFile(handle)
            for batch in shard.iter_batches(batch_size=8, columns=["id", "input", "target"]):
                for row in batch.to_pylist():
                    where = f"row {row['id']!r} of {shard_uri}"
                    if row["target"] is None:
                        raise ValueError(f"{where} has no target image: evaluation needs pairs")
                    try:
                        source = decode_rgb8(row["input"], name=f"{where}: input")
                        target = decode_rgb8(row["target"], name=f"{where}: target")
                    except ImageError as error:
                        raise ValueError(str(error)) from error
                    if source.shape != target.shape:
                        raise ValueError(f"{where}: input {source.shape} and target {target.shape} differ")
                    yield row["id"], source, target


def evaluate(
    model: str,
    data: str,
    *,
    split: str = "test",
    tracking_uri: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    tile: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Measure ``model`` on every pair of ``split`` of the dataset at ``data``."""
    enhancer = load_enhancer(
        model, tracking_uri=tracking_uri, device=device, precision=precision, tile=tile,
        storage_options=storage_options,
    )  # fmt: skip
    rows = []
    pairs = iter_split_pairs(data, split, storage_options=storage_options)
    progress_bar = tqdm(pairs, desc=f"evaluate {split}", unit="image", disable=not progress)
    for pair_id, source, target in progress_bar:
        started = time.perf_counter()
        output = enhancer(_to_tensor(source, device))
        seconds = time.perf_counter() - started
        values = image_metrics(output.float(), _to_tensor(target, device))
        rows.append(
            {"id": pair_id, "width": source.shape[1], "height": source.shape[0],
             **{name: values[name].item() for name in METRICS}, "seconds": seconds}
        )  # fmt: skip
    if not rows:
        raise ValueError(f"split {split!r} of {data} has no pairs to evaluate")
    means = {}
    for name in METRICS:
        finite = [row[name] for row in rows if math.isfinite(row[name])]
        means[name] = sum(finite) / len(finite) if finite else math.inf
    perfect = sum(not math.isfinite(row["psnr"]) for row in rows)
    return EvaluationResult(
        model=model, data=data, split=split, rows=rows, means=means, perfect_images=perfect
    )


def write_csv(
    result: EvaluationResult, destination: str, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Per-image rows then a ``mean`` row, written atomically (temp file + rename)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS)
    writer.writeheader()
    writer.writerows(result.rows)
    writer.writerow({"id": "mean", **result.means})
    filesystem, path = open_filesystem(destination, storage_options)
    write_atomic(filesystem, path, buffer.getvalue().encode())


def log_evaluation(result: EvaluationResult, *, tracking_uri: str, experiment: str) -> str:
    """One MLflow run per evaluation: params, mean metrics and the per-image CSV; its id."""
    run = TrackedRun.create(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=f"evaluate {result.model} on {result.data} [{result.split}]",
        tags={**source_tags(), "hdm.evaluation": "true"},
    )
    run.log_params(
        {"model": result.model, "data": result.data, "split": result.split, "images": len(result.rows)}
    )
    run.log_metrics({f"{result.split}_{name}": value for name, value in result.means.items()}, step=0)
    with tempfile.TemporaryDirectory(prefix="hdm-eval-") as staging:
        table = Path(staging) / f"{result.split}_metrics.csv"
        write_csv(result, str(table))
        run.client.log_artifact(run.run_id, str(table))
    run.finish()
    return run.run_id


def _to_tensor(image: np.ndarray, device: str | torch.device) -> Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0).to(device).float().div(255)
