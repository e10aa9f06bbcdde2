"""Batch inference with Ray Data: enhance every image under a folder, a bucket prefix or a
dataset split, and write the results under a destination at any fsspec URI.

The pipeline is the one Ray's batch-inference guide describes, one operator per kind of work:

1. **Listing** (Ray tasks, one per source and one for the destination): the image files
   under each source (recursively, by suffix), or each shard's ``id`` column for a dataset
   split, and the outputs that already exist. The driver pairs each input with its output
   key, ``DEST/<relative path>.<format>``, and drops those already written (resuming).
2. **Reading and decoding** (Ray tasks on CPU, ``map_batches`` over blocks of
   at most :data:`READ_BLOCK_IMAGES` inputs or :data:`READ_BLOCK_BYTES` of files): the
   bytes through fsspec, decoded by
   :func:`hdm_platform.imageio.read_image` exactly as ``hdm enhance`` decodes them (EXIF
   orientation, alpha over white, 16-bit, the pixel limit).
3. **The model** (an actor pool, ``map_batches`` with the callable class
   :class:`EnhancePredictor`): each actor loads the model chain once, through
   :func:`hdm_platform.model_refs.load_enhancer` (so large images are tiled as ``hdm
   enhance`` tiles them), on one GPU where the cluster has GPUs and on CPU threads
   otherwise (:func:`plan_actor_pool`).
4. **Encoding and writing** (Ray tasks): PNG/JPEG/WebP through
   :func:`hdm_platform.imageio.encode_image`, written with
   :func:`hdm_platform.data.storage.write_atomic` (a temporary name then a rename on a
   disk; on object stores a single PUT, which S3 makes visible only once complete).

A row that fails at any stage carries its reason to the end instead of raising, so a bad
input never stops the job; the driver streams the status rows (a progress bar), then writes
:data:`FAILURES_NAME` under the destination and returns a :class:`Summary`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from tqdm import tqdm

from hdm_platform.console import ray_init_options, route_ray_data_logs
from hdm_platform.data.manifest import Manifest
from hdm_platform.data.shard_source import ShardDatasource, arrow_filesystem
from hdm_platform.data.storage import is_remote, join_uri, list_files, open_filesystem, write_atomic
from hdm_platform.imageio import IMAGE_SUFFIXES, encode_image, read_image

# Every Ray worker that runs a task of this module imports it: the model's modules (MLflow,
# torchvision and, through torchvision.ops, torch._dynamo) load only where the model runs
# (EnhancePredictor, pin_reference), which takes seconds off the start of each read and
# write worker.

__all__ = [
    "FAILURES_NAME",
    "READ_BLOCK_BYTES",
    "READ_BLOCK_IMAGES",
    "ActorPool",
    "EnhancePredictor",
    "Failure",
    "Summary",
    "WorkItem",
    "connect_ray",
    "enhance_on_ray",
    "pin_reference",
    "plan_actor_pool",
]

#: Written under the destination when any input failed: one JSON object per line.
FAILURES_NAME = "_failures.jsonl"
#: Inputs per read task (one block) at most, and their files' bytes at most. A block is also
#: what one model actor takes per task, so large photos go a few to a block: the actors
#: share them evenly and the first results are written early. Small images go 8 to a block,
#: which amortises a task's fixed cost.
READ_BLOCK_IMAGES = 8
READ_BLOCK_BYTES = 4 * 2**20
#: Images per model call on a GPU (same-shape, untiled images are stacked); on a CPU one at
#: a time, which computes exactly what the local ``hdm enhance`` loop computes.
GPU_BATCH_SIZE = 8

_SOURCE, _OUTPUT, _ERROR, _IMAGE = "source", "output", "error", "image"
_NO_IMAGE = np.zeros((3, 0, 0), dtype=np.float32)


@dataclass(frozen=True)
class WorkItem:
    """One input, the output key (relative to the destination) it is written to, and its size."""

    source: str
    output: str
    size: int = 0


@dataclass(frozen=True)
class Failure:
    source: str
    reason: str


@dataclass
class Summary:
    """What a run did: ``done`` written now, ``skipped`` written before, and the failures."""

    done: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self, destination: str) -> str:
        return (
            f"enhanced {self.done}, skipped {self.skipped} (already written), failed "
            f"{len(self.failures)} into {destination} in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s)"
        )


# -- Ray and the actor pool --------------------------------------------------------------


def connect_ray() -> None:
    """Attach to the cluster at ``RAY_ADDRESS``, or start a local Ray, as ``hdm train`` does.

    Token authentication stays as Ray sets it. A local Ray gets one logical CPU more than
    the machine has cores: the model's actors take one per core, and the read and write
    tasks need one beside them (they run in the gaps, as the local loop runs them in turn
    between images). Ray's and Ray Data's INFO logs and the workers' output stay off the
    console, where the driver's progress bar counts images, unless ``-v``.
    """
    route_ray_data_logs()
    if ray.is_initialized():
        return
    ray.init(**ray_init_options(local_cpus=(os.cpu_count() or 1) + 1))


@dataclass(frozen=True)
class ActorPool:
    """How many model replicas, and what each one holds."""

    actors: int
    num_gpus: float
    num_cpus: float
    threads: int
    batch_size: int

    def describe(self) -> str:
        unit = "1 GPU" if self.num_gpus else f"{self.threads} CPU threads"
        return f"{self.actors} model actor(s), {unit} each, {self.batch_size} image(s) per call"


def plan_actor_pool(
    nodes: Iterable[dict[str, Any]],
    *,
    device: str | None = None,
    actors: int | None = None,
    threads_per_actor: int | None = None,
    batch_size: int | None = None,
) -> ActorPool:
    """Size the model's actor pool from the cluster's nodes (``ray.nodes()``).

    With GPUs (and ``device`` not ``"cpu"``): one actor per GPU. Otherwise CPU actors of
    ``threads_per_actor`` torch threads (default 1), as many as fit on each node with one
    CPU left there for the read and write tasks. One-thread replicas, one per core, are
    no slower than fewer wide ones on this network's small convolutions: on 2 cores they
    tie one 2-thread actor at 256x256 and give 1.1x its images/s at 1024x1024
    (bench/batch_enhance.py, bench/RESULTS.md). ``actors`` overrides the count (an
    autoscaling cluster may not show its nodes yet).
    """
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    gpus = sum(int(resources.get("GPU", 0)) for resources in alive)
    if device == "cuda" and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no GPUs")
    if gpus and device != "cpu":
        return ActorPool(
            actors=actors or gpus, num_gpus=1, num_cpus=1, threads=1,
            batch_size=batch_size or GPU_BATCH_SIZE,
        )  # fmt: skip
    node_cpus = [int(resources.get("CPU", 0)) for resources in alive] or [1]
    threads = threads_per_actor or 1
    fitting = sum(max(0, (cpus - 1) // threads) for cpus in node_cpus)
    return ActorPool(
        actors=actors or max(1, fitting), num_gpus=0, num_cpus=threads, threads=threads,
        batch_size=batch_size or 1,
    )  # fmt: skip


def pin_reference(reference: str, tracking_uri: str | None = None) -> str:
    """``models:/NAME@ALIAS`` as the version the alias names now (``models:/NAME/7``), so
    every actor loads the same weights even if the alias moves during the job."""
    from hdm_platform.tracking.registry import is_registry_uri, registry_client, resolve_version

    if not is_registry_uri(reference) or "@" not in reference:
        return reference
    version = resolve_version(registry_client(tracking_uri), reference)
    return f"models:/{version.name}/{version.version}"


class EnhancePredictor:
    """The model stage: one instance per actor, holding the chain of models it applies.

    Each image runs through every model in turn (``derain`` then ``dehaze``, say) as float
    tensors, and is quantised to 8 bits once, at the end, exactly as
    :func:`hdm_platform.imageio.encode_image` quantises. Images of one shape that run
    untiled are stacked into one call, up to the batch Ray Data hands over.
    """

    def __init__(
        self,
        references: Sequence[str],
        *,
        precision: str,
        tile: int | None,
        tile_overlap: int | None,
        threads: int,
        storage_options: dict[str, Any] | None,
    ) -> None:
        from hdm_model.inference import resolve_device, tile_for
        from hdm_platform.model_refs import load_enhancer

        torch.set_num_threads(threads)
        self._device = resolve_device()
        self._tile_for = functools.partial(tile_for, tile=tile)
        self._models = [
            load_enhancer(
                reference,
                device=self._device,
                precision=precision,
                tile=tile,
                tile_overlap=tile_overlap,
                storage_options=storage_options,
            )  # fmt: skip
            for reference in references
        ]

    def _tiled(self, height: int, width: int) -> bool:
        """Tiled images (the shared rule, ``tile_for``) run one at a time: tiles bound one
        image's memory."""
        return self._tile_for(height, width) is not None

    def _run(self, images: torch.Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` floats -> ``[B, H, W, 3]`` uint8."""
        with torch.inference_mode():
            images = images.to(self._device)
            for model in self._models:
                images = model(images)
            pixels = images.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = list(batch[_IMAGE])
        errors = list(batch[_ERROR])
        results: list[np.ndarray] = [np.zeros((0, 0, 3), np.uint8)] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            if not errors[index]:
                groups.setdefault(tuple(image.shape), []).append(index)
        for shape, indices in groups.items():
            runs = [[index] for index in indices] if self._tiled(*shape[-2:]) else [indices]
            for run in runs:
                try:
                    outputs = self._run(torch.from_numpy(np.stack([images[index] for index in run])))
                except (ValueError, RuntimeError, OSError) as error:
                    # RuntimeError covers a device running out of memory: the rest goes on.
                    for index in run:
                        errors[index] = f"enhancing failed: {error}"
                    continue
                for index, output in zip(run, outputs):
                    results[index] = output
        return {
            _SOURCE: batch[_SOURCE],
            _OUTPUT: batch[_OUTPUT],
            _ERROR: np.array(errors, dtype=object),
            _IMAGE: _object_array(results),
        }


def _object_array(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays (``np.array`` would try to stack equal shapes)."""
    column = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        column[index] = array
    return column


# -- Reading, decoding and writing (Ray tasks) -------------------------------------------


def _decoded_batch(
    sources: Sequence[str],
    outputs: Sequence[str],
    contents: Sequence[bytes | Exception],
    max_pixels: int | None,
) -> dict[str, np.ndarray]:
    images, errors = [], []
    for source, data in zip(sources, contents):
        try:
            if isinstance(data, Exception):
                raise OSError(f"cannot read: {data}") from data
            images.append(read_image(data, max_pixels=max_pixels, name=source).numpy())
            errors.append("")
        except (ValueError, OSError) as error:
            images.append(_NO_IMAGE)
            # The report pairs each reason with its source already.
            errors.append(str(error).removeprefix(f"{source}: "))
    return {
        _SOURCE: np.array(sources, dtype=object),
        _OUTPUT: np.array(outputs, dtype=object),
        _ERROR: np.array(errors, dtype=object),
        _IMAGE: _object_array(images),
    }


def read_and_decode_files(
    batch: dict[str, np.ndarray], *, storage_options: dict[str, Any] | None, max_pixels: int | None
) -> dict[str, np.ndarray]:
    """Read a block's files (concurrently, where the filesystem is asynchronous) and decode them."""
    sources = [str(source) for source in batch[_SOURCE]]
    by_protocol: dict[str | None, list[str]] = {}
    for source in sources:  # SRC arguments on different stores may share a block
        by_protocol.setdefault(fsspec.core.split_protocol(source)[0], []).append(source)
    contents: dict[str, bytes | Exception] = {}
    for group in by_protocol.values():
        filesystem, _ = open_filesystem(group[0], storage_options)
        paths = [fsspec.core.strip_protocol(source) for source in group]
        read = filesystem.cat(paths, on_error="return")
        contents.update((source, read[path]) for source, path in zip(group, paths))
    return _decoded_batch(sources, list(batch[_OUTPUT]), [contents[source] for source in sources], max_pixels)


def decode_dataset_rows(
    batch: dict[str, np.ndarray], *, done: np.ndarray, suffix: str, max_pixels: int | None
) -> dict[str, np.ndarray]:
    """Decode a read unit of dataset rows, leaving out the rows whose output exists."""
    outputs = np.array([f"{row_id}{suffix}" for row_id in batch["id"]], dtype=object)
    todo = ~_contains(done, outputs)
    contents = [bytes(data) for data in batch["input"][todo]]
    sources = [
        f"{source} (row {row_id})" for source, row_id in zip(batch["source_input"][todo], batch["id"][todo])
    ]
    return _decoded_batch(sources, list(outputs[todo]), contents, max_pixels)


def _contains(sorted_names: np.ndarray, names: np.ndarray) -> np.ndarray:
    if not len(sorted_names) or not len(names):
        return np.zeros(len(names), dtype=bool)
    names = names.astype(str)
    positions = np.searchsorted(sorted_names, names).clip(max=len(sorted_names) - 1)
    return sorted_names[positions] == names


def encode_and_write(
    batch: dict[str, np.ndarray], *, destination: str, suffix: str, storage_options: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """Encode each enhanced image and write it atomically; returns the status rows."""
    filesystem, root = open_filesystem(destination, storage_options)
    errors = list(batch[_ERROR])
    for index, (output, pixels) in enumerate(zip(batch[_OUTPUT], batch[_IMAGE])):
        if errors[index]:
            continue
        try:
            # uint8 back to the floats k/255 that quantise to the same k: encode_image's bytes.
            image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(255.0)
            write_atomic(filesystem, f"{root}/{output}", encode_image(image, format=suffix))
        except (ValueError, OSError) as error:
            errors[index] = f"cannot write {join_uri(destination, output)}: {error}"
    return {_SOURCE: batch[_SOURCE], _OUTPUT: batch[_OUTPUT], _ERROR: np.array(errors, dtype=object)}


# -- Listing (Ray tasks) -------------------------------------------------------------------


@ray.remote(num_cpus=0.25)
def _list_images(source: str, storage_options: dict[str, Any] | None) -> list[tuple[str, str, int]]:
    """``(URI, path relative to source, bytes)`` of an image file, or of every image under a folder."""
    filesystem, path = open_filesystem(source, storage_options)
    if filesystem.isfile(path):
        return [(source, PurePosixPath(path).name, filesystem.size(path))]
    if not filesystem.isdir(path):
        raise FileNotFoundError(f"no such file or folder: {source}")
    return [
        (join_uri(source, entry.path), entry.path, entry.size)
        for entry in list_files(filesystem, path)
        if PurePosixPath(entry.path).suffix.lower() in IMAGE_SUFFIXES
    ]


@ray.remote(num_cpus=0.25)
def _list_outputs(destination: str, storage_options: dict[str, Any] | None) -> list[str]:
    filesystem, path = open_filesystem(destination, storage_options)
    if not filesystem.isdir(path):
        return []
    return [entry.path for entry in list_files(filesystem, path)]


@ray.remote(num_cpus=0.25)
def _list_row_ids(shard_uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    filesystem, path = open_filesystem(shard_uri, storage_options)
    table = pq.read_table(path, columns=["id"], filesystem=arrow_filesystem(filesystem))
    return table.column("id").to_pylist()


def _gather(refs: list[ray.ObjectRef]) -> list[Any]:
    """``ray.get``, raising a listing's own error (a missing folder, say) rather than Ray's
    wrapper of it, whose message is a remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        raise error.cause from None


def plan_files(
    listings: Sequence[tuple[str, list[tuple[str, str, int]]]],
    destination: str,
    suffix: str,
    existing: set[str],
) -> tuple[list[WorkItem], int, list[Failure]]:
    """The inputs still to enhance, how many are already written, and inputs refused now.

    ``listings`` pairs each source as given with its ``_list_images`` result. An input
    whose output key another input already claims (``x.jpg`` and ``x.png`` both become
    ``x.png``) fails naming that input; so does one whose output would replace it. Inputs
    under the destination (when it lies inside a source) are not inputs.
    """
    destination_prefix = destination.rstrip("/") + "/"
    claimed: dict[str, str] = {}
    items, failures, skipped = [], [], 0
    for given, files in listings:
        source_prefix = given.rstrip("/") + "/"
        holds_destination = (
            destination_prefix.startswith(source_prefix) and destination_prefix != source_prefix
        )
        for uri, relative, size in sorted(files, key=lambda file: file[1]):
            if holds_destination and uri.startswith(destination_prefix):
                continue
            output = str(PurePosixPath(relative).with_suffix(suffix))
            target = join_uri(destination, output)
            if output in claimed:
                failures.append(Failure(uri, f"the output {target} is already written for {claimed[output]}"))
            elif os.path.normpath(target) == os.path.normpath(uri):
                failures.append(Failure(uri, f"the output {target} would overwrite the input"))
            elif output in existing:
                claimed[output] = uri
                skipped += 1
            else:
                claimed[output] = uri
                items.append(WorkItem(uri, output, size))
    return items, skipped, failures


# -- The run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """What is left to enhance, as a dataset of ``blocks`` read blocks, and what is not."""

    dataset: ray.data.Dataset | None
    todo: int
    skipped: int
    failures: list[Failure]
    blocks: int


def _file_inputs(
    sources: Sequence[str],
    destination: str,
    suffix: str,
    existing: set[str],
    storage_options: dict[str, Any] | None,
) -> _Inputs:
    listed = _gather([_list_images.remote(source, storage_options) for source in sources])
    items, skipped, failures = plan_files(list(zip(sources, listed)), destination, suffix, existing)
    blocks = [
        pa.table({_SOURCE: [item.source for item in block], _OUTPUT: [item.output for item in block]})
        for block in _blocks(items)
    ]
    dataset = ray.data.from_arrow(blocks) if blocks else None
    return _Inputs(dataset, len(items), skipped, failures, len(blocks))


def _blocks(items: Sequence[WorkItem]) -> Iterator[list[WorkItem]]:
    """Consecutive items, :data:`READ_BLOCK_IMAGES` or :data:`READ_BLOCK_BYTES` to a block."""
    block: list[WorkItem] = []
    size = 0
    for item in items:
        if block and (len(block) == READ_BLOCK_IMAGES or size + item.size > READ_BLOCK_BYTES):
            yield block
            block, size = [], 0
        block.append(item)
        size += item.size
    if block:
        yield block


def _dataset_inputs(
    datasets: Sequence[str], split: str, suffix: str, existing: set[str], storage_options: dict[str, Any] | None,
    max_pixels: int | None,
) -> _Inputs:  # fmt: skip
    """Each dataset's split through the shard source, decoded in its read tasks."""
    parts, todo, skipped, blocks = [], 0, 0, 0
    # Sorted for searchsorted; carried in the operator's function, which Ray Data puts in
    # the object store once (numpy arrays deserialise from there without a copy).
    done = np.array(sorted(existing), dtype=str)
    for uri in datasets:
        manifest = Manifest.load(uri, storage_options=storage_options)
        shard_uris = manifest.shard_uris(split)
        if not shard_uris:
            raise ValueError(
                f"dataset {uri} has no rows in split {split!r} (it has {sorted(manifest.splits)})"
            )
        listed = _gather([_list_row_ids.remote(shard_uri, storage_options) for shard_uri in shard_uris])
        ids = [row_id for shard in listed for row_id in shard]
        written = sum(f"{row_id}{suffix}" in existing for row_id in ids)
        todo, skipped = todo + len(ids) - written, skipped + written
        filesystem, _ = open_filesystem(shard_uris[0], storage_options)
        source = ShardDatasource(
            shard_uris, filesystem, columns=["id", "input", "source_input"], unit_rows=READ_BLOCK_IMAGES,
            shuffle=False, seed=None,
        )  # fmt: skip
        blocks += len(source.units)
        parts.append(
            ray.data.read_datasource(source, override_num_blocks=len(source.units)).map_batches(
                decode_dataset_rows,
                fn_kwargs={"done": done, "suffix": suffix, "max_pixels": max_pixels},
                batch_format="numpy",
                batch_size=None,
            )  # fmt: skip
        )
    if not todo:
        return _Inputs(None, 0, skipped, [], 0)
    return _Inputs(parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]), todo, skipped, [], blocks)


def _stream(statuses: ray.data.Dataset, total: int, summary: Summary, progress: bool) -> None:
    with tqdm(total=total, desc="enhance", unit=" images", file=sys.stderr, disable=not progress) as bar:
        for batch in statuses.iter_batches(batch_size=None, batch_format="pyarrow"):
            for source, error in zip(batch.column(_SOURCE).to_pylist(), batch.column(_ERROR).to_pylist()):
                if error:
                    summary.failures.append(Failure(source, error))
                    bar.write(f"FAILED {source}: {error}", file=sys.stderr)
                else:
                    summary.done += 1
            bar.update(batch.num_rows)


def write_failures(
    destination: str, failures: Sequence[Failure], storage_options: dict[str, Any] | None
) -> None:
    """:data:`FAILURES_NAME` under ``destination`` (atomically), or no such file when none failed."""
    filesystem, root = open_filesystem(destination, storage_options)
    path = f"{root}/{FAILURES_NAME}"
    if failures:
        lines = "".join(json.dumps({"source": f.source, "reason": f.reason}) + "\n" for f in failures)
        write_atomic(filesystem, path, lines.encode())
    elif filesystem.exists(path):
        filesystem.rm_file(path)


def enhance_on_ray(
    sources: Sequence[str],
    destination: str,
    references: Sequence[str],
    *,
    suffix: str = ".png",
    split: str | None = None,
    overwrite: bool = False,
    precision: str = "auto",
    tile: int | None = None,
    tile_overlap: int | None = None,
    device: str | None = None,
    max_pixels: int | None = None,
    actors: int | None = None,
    threads_per_actor: int | None = None,
    batch_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Summary:
    """Enhance ``sources`` (files, folders, prefixes; datasets with ``split``) into
    ``destination`` with the chain of models ``references``, on the Ray cluster this
    process is connected to (see :func:`connect_ray`)."""
    started = time.perf_counter()
    # Ray's workers need not share this process's working directory.
    sources = [_absolute(source) for source in sources]
    destination = _absolute(destination)
    existing = set() if overwrite else set(_gather([_list_outputs.remote(destination, storage_options)])[0])
    if split is None:
        inputs = _file_inputs(sources, destination, suffix, existing, storage_options)
    else:
        inputs = _dataset_inputs(sources, split, suffix, existing, storage_options, max_pixels)
    summary = Summary(skipped=inputs.skipped, failures=list(inputs.failures))
    for failure in inputs.failures:
        print(f"FAILED {failure.source}: {failure.reason}", file=sys.stderr)
    if inputs.dataset is not None:
        pool = plan_actor_pool(
            ray.nodes(),
            device=device,
            actors=actors,
            threads_per_actor=threads_per_actor,
            batch_size=batch_size,
        )
        # An actor is a process that imports torch and loads the models (seconds): no more
        # of them than there are blocks to give them.
        pool = replace(pool, actors=min(pool.actors, inputs.blocks))
        if progress:
            print(
                f"{inputs.todo} to enhance, {inputs.skipped} already written; {pool.describe()}",
                file=sys.stderr,
            )
        statuses = _pipeline(
            inputs.dataset, pool, references, destination=destination, suffix=suffix, split=split,
            precision=precision, tile=tile, tile_overlap=tile_overlap, max_pixels=max_pixels,
            storage_options=storage_options,
        )  # fmt: skip
        _stream(statuses, inputs.todo, summary, progress)
    write_failures(destination, summary.failures, storage_options)
    summary.seconds = time.perf_counter() - started
    return summary


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) or "://" in uri else os.path.abspath(uri)


def _pipeline(
    inputs: ray.data.Dataset, pool: ActorPool, references: Sequence[str], *, destination: str, suffix: str,
    split: str | None, precision: str, tile: int | None, tile_overlap: int | None, max_pixels: int | None,
    storage_options: dict[str, Any] | None,
) -> ray.data.Dataset:  # fmt: skip
    decoded = inputs
    if split is None:
        decoded = inputs.map_batches(
            read_and_decode_files, fn_kwargs={"storage_options": storage_options, "max_pixels": max_pixels},
            batch_format="numpy", batch_size=None,
        )  # fmt: skip
    enhanced = decoded.map_batches(
        EnhancePredictor,
        fn_constructor_args=(list(references),),
        fn_constructor_kwargs={
            "precision": precision,
            "tile": tile,
            "tile_overlap": tile_overlap,
            "threads": pool.threads,
            "storage_options": storage_options,
        },  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    statuses = enhanced.map_batches(
        encode_and_write,
        fn_kwargs={"destination": destination, "suffix": suffix, "storage_options": storage_options},
        batch_format="numpy",
        batch_size=None,
    )
    context = statuses.context
    context.enable_progress_bars = False  # the driver's own bar counts images
    # As in the training input pipeline: on a few CPUs Ray Data's per-operator reservation
    # held the read and write tasks back behind the actor's share.
    context.op_resource_reservation_enabled = False
    return statuses
