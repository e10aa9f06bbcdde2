"""``hdm data ingest``: a benchmark folder at any fsspec URI -> Parquet shards + manifest.

Each row keeps the degraded and the target image as their original encoded bytes, so
nothing is lost or re-encoded. The one exception is DID-data, whose files hold the input and
the target side by side: the two halves are cropped and stored as lossless PNG (the decoded
pixels of the source, exactly; the source's own encoding cannot be split without decoding).

Every image is opened with PIL before it is stored (``verify()`` then a full decode), so a
truncated file, a size mismatch or a missing partner is found at ingest time, not in the
middle of a training run.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from pathlib import PurePosixPath
from typing import Any, Literal, cast

from PIL import Image
from tqdm import tqdm

from hdm_platform.data.layouts import (
    LayoutOptions,
    PairSpec,
    Problem,
    get_layout,
    is_image,
)
from hdm_platform.data.manifest import SPLITS, TASKS, Manifest, SkippedPair, Task
from hdm_platform.data.shard_writer import (
    DEFAULT_SHARD_SIZE,
    DatasetWriter,
    Row,
    current_manifest,
    fingerprint,
)
from hdm_platform.data.storage import join_uri, list_files, open_filesystem
from hdm_platform.imageio import probe_image

__all__ = [
    "IngestError",
    "IngestOptions",
    "IngestResult",
    "OnError",
    "assign_val_split",
    "ingest",
]

OnError = Literal["raise", "skip"]
_BATCH = 32
_REPORTED_PROBLEMS = 20
_STOPPED = "nothing was written; use --on-error skip to leave these pairs out"
_NOTHING_LEFT = "no pair is left to write"


class IngestError(ValueError):
    """Bad source data; the message names every offending file (up to a limit)."""

    def __init__(self, problems: Sequence[Problem], source: str, *, hint: str) -> None:
        self.problems = list(problems)
        lines = [_describe(problem) for problem in self.problems[:_REPORTED_PROBLEMS]]
        more = len(self.problems) - len(lines)
        if more:
            lines.append(f"... and {more} more")
        super().__init__(
            f"{len(self.problems)} bad pair(s) in {source}:\n  " + "\n  ".join(lines) + f"\n{hint}"
        )


@dataclass(frozen=True)
class IngestOptions:
    """What to make of a benchmark folder: how its files pair, and how the dataset is written.

    Attributes:
        layout: one of :data:`hdm_platform.data.layouts.LAYOUTS`.
        task: "dehaze", "derain" or "lowlight"; defaults from the layout.
        pairing: the layout's options: the split for pairs whose layout and folders name
            none, the ``paired`` layout's folders and pattern, the ``did`` layout's input half.
        val_fraction: fraction of the training pairs moved to "val" (by hash).
        on_error: "raise" stops at bad pairs with nothing written; "skip" leaves them out
            and lists them in the manifest's ``skipped``.
        shard_size: encoded image bytes per shard.
        workers: threads reading images and writing shards.
        name: the dataset's name; defaults to the last component of the destination.

    Raises:
        ValueError: an unknown layout, task, split or ``on_error``, or a layout without a
            default task and no ``task``.
    """

    layout: str
    task: Task | None = None
    pairing: LayoutOptions = field(default_factory=LayoutOptions)
    val_fraction: float = 0.0
    on_error: OnError = "raise"
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 8
    name: str | None = None

    def __post_init__(self) -> None:
        task: str | None = self.resolved_task
        if task is None:
            raise ValueError(f"layout {self.layout!r} needs a task: one of {', '.join(TASKS)}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        split = self.pairing.split
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    @property
    def resolved_task(self) -> Task:
        """``task``, or the layout's default (``__post_init__`` checks that there is one)."""
        return cast(Task, self.task or get_layout(self.layout).default_task)

    def fingerprinted(self, source: str) -> dict[str, Any]:
        """What decides the dataset, for its fingerprint: every option but ``workers``
        (it changes how fast the dataset is written, not what is written)."""
        options = {item.name: getattr(self, item.name) for item in fields(self)}
        del options["pairing"], options["workers"]
        return {**options, **asdict(self.pairing), "task": self.resolved_task, "source": source}


@dataclass(frozen=True)
class IngestResult:
    """What an ingest did; ``unchanged`` means the dataset was already up to date.

    ``namings`` counts the pairs found by each of the layout's namings
    (:attr:`hdm_platform.data.layouts.Pairing.namings`).
    """

    manifest: Manifest
    unchanged: bool
    pairs: int
    bytes: int
    shards: int
    skipped: int
    seconds: float
    namings: Mapping[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        # An unpaired set holds single images, not pairs.
        rows = f"{self.pairs} {'pairs' if self.manifest.paired else 'images'}"
        if self.unchanged:
            text = (
                f"{self.manifest.uri} is up to date (fingerprint {self.manifest.fingerprint[:12]}): "
                f"{rows}, nothing written"
            )
        else:
            splits = ", ".join(f"{name} {info.rows}" for name, info in self.manifest.splits.items())
            text = (
                f"wrote {rows} ({splits}) in {self.shards} shard(s), "
                f"{self.bytes / 2**20:.1f} MiB, {self.skipped} skipped, {self.seconds:.1f} s "
                f"-> {self.manifest.uri} (generation {self.manifest.generation})"
            )
        if self.namings:
            found = "; ".join(f"{naming} ({count} pairs)" for naming, count in self.namings.items())
            text += f"\npaired by name: {found}"
        return text


def _describe(problem: Problem) -> str:
    names = " <-> ".join(name for name in (problem.input, problem.target) if name)
    return f"{names}: {problem.reason}"


def assign_val_split(pairs: Sequence[PairSpec], fraction: float) -> list[PairSpec]:
    """Moves a deterministic ``fraction`` of the training pairs to "val".

    A pair goes to val when the sha256 of its ``group`` (its target image) falls below
    ``fraction``: the choice depends on the pair alone, not on the rest of the listing,
    and every hazy rendering of one clear scene goes the same way.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(pairs)
    threshold = int(fraction * 2**64)
    return [
        replace(pair, split="val")
        if pair.split == "train"
        and int.from_bytes(hashlib.sha256(pair.group.encode()).digest()[:8]) < threshold
        else pair
        for pair in pairs
    ]


def _split_side_by_side(data: bytes, name: str, input_half: str) -> tuple[bytes, bytes, int, int]:
    """Crops a DID-data image into (input PNG, target PNG, width, height)."""
    probe_image(data, name)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width < 2:
            raise ValueError(f"{name}: {width}x{height} is too narrow to hold two halves")
        half = width // 2
        left = image.crop((0, 0, half, height))
        right = image.crop((half, 0, 2 * half, height))
    encoded = []
    for part in (left, right):
        buffer = io.BytesIO()
        part.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    left_bytes, right_bytes = encoded
    if input_half == "left":
        return left_bytes, right_bytes, half, height
    return right_bytes, left_bytes, half, height


class _PairReader:
    """Reads and validates pairs into rows; safe to call from several threads."""

    def __init__(self, fs: Any, root: str, source: str, task: str) -> None:
        self._fs = fs
        self._root = root
        self._source = source
        self._task = task

    def __call__(self, pair: PairSpec) -> Row | Problem:
        try:
            return self._read(pair)
        except (OSError, ValueError) as error:
            return Problem(pair.input, pair.target, str(error))

    def _read(self, pair: PairSpec) -> Row:
        input_name = join_uri(self._source, pair.input)
        input_data = self._fs.cat_file(f"{self._root}/{pair.input}")
        target_name = join_uri(self._source, pair.target) if pair.target else None
        target_data: bytes | None = None
        target_format: str | None = None
        if pair.input_half is not None:
            input_data, target_data, width, height = _split_side_by_side(
                input_data, input_name, pair.input_half
            )
            input_format = target_format = "PNG"
        else:
            input_format, width, height = probe_image(input_data, input_name)
            if target_name is not None:
                target_data = self._fs.cat_file(f"{self._root}/{pair.target}")
                target_format, target_width, target_height = probe_image(target_data, target_name)
                if (target_width, target_height) != (width, height):
                    raise ValueError(
                        f"size mismatch: input {width}x{height}, target {target_width}x{target_height}"
                    )
        return Row(
            id=pair.id,
            task=self._task,
            split=pair.split,
            input=input_data,
            target=target_data,
            input_format=input_format,
            target_format=target_format,
            width=width,
            height=height,
            source_input=input_name,
            source_target=target_name,
        )


def _batched(items: Sequence[PairSpec], size: int) -> Iterator[Sequence[PairSpec]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ingest(
    source: str,
    dest: str,
    options: IngestOptions,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingests the benchmark at ``source`` into the dataset at ``dest``.

    Re-running with the same options on an unchanged source is a no-op; anything else
    writes a new generation and swaps the manifest (see :mod:`hdm_platform.data.shard_writer`).

    Args:
        source: the benchmark folder (plain path or fsspec URI).
        dest: the dataset folder to write (plain path or fsspec URI).
        options: the layout, task and the rest (:class:`IngestOptions`).
        storage_options: fsspec options for both ``source`` and ``dest``.
        progress: show a tqdm progress bar.

    Raises:
        IngestError: bad pairs under ``on_error="raise"``, or no good pair left.
        ValueError: bad layout options (``--pair-pattern``, folders, val fraction).
        FileNotFoundError: ``source`` is not a folder, or holds no pairs of the layout.
    """
    started = time.perf_counter()
    source = source.rstrip("/")
    source_fs, source_root = open_filesystem(source, storage_options)
    listing = [entry for entry in list_files(source_fs, source_root) if is_image(entry.path)]
    if not listing:
        raise FileNotFoundError(f"no images under {source}")
    layout = get_layout(options.layout)
    pairing = layout.pair([entry.path for entry in listing], options.pairing)
    pairs = assign_val_split(pairing.pairs, options.val_fraction)
    digest = fingerprint("ingest", options.fingerprinted(source), (astuple(entry) for entry in listing))
    existing = current_manifest(dest, digest, storage_options)
    if existing is not None:
        skipped, seconds = len(existing.skipped), time.perf_counter() - started
        return IngestResult(existing, True, existing.rows, 0, 0, skipped, seconds, pairing.namings)
    _check_pairing(pairs, pairing.problems, options, source)

    reader = _PairReader(source_fs, source_root, source, options.resolved_task)
    with DatasetWriter(
        dest, storage_options=storage_options, shard_size=options.shard_size, workers=options.workers
    ) as writer:
        bad, stored_bytes = _write_pairs(
            writer, reader, pairs, options, source, paired=layout.paired, progress=progress
        )
        problems = [*pairing.problems, *bad]
        if stored_bytes == 0:
            raise IngestError(problems, source, hint=_NOTHING_LEFT)
        manifest = writer.commit(
            name=options.name or PurePosixPath(dest.rstrip("/")).name or "dataset",
            task=options.resolved_task,
            layout=options.layout,
            paired=layout.paired,
            source=source,
            fingerprint=digest,
            skipped=[_skipped(problem, source) for problem in problems],
        )
    shards = sum(len(info.shards) for info in manifest.splits.values())
    seconds = time.perf_counter() - started
    return IngestResult(
        manifest, False, manifest.rows, stored_bytes, shards, len(problems), seconds, pairing.namings
    )


def _check_pairing(
    pairs: Sequence[PairSpec], problems: Sequence[Problem], options: IngestOptions, source: str
) -> None:
    """Stops before anything is written: at the layout's problems under "raise", or when
    the layout found no pair at all."""
    if problems and options.on_error == "raise":
        raise IngestError(problems, source, hint=_STOPPED)
    if not pairs:
        if not problems:
            raise FileNotFoundError(
                f"layout {options.layout!r} found no pairs among the images under {source}"
            )
        raise IngestError(problems, source, hint=_NOTHING_LEFT)


def _write_pairs(
    writer: DatasetWriter,
    reader: _PairReader,
    pairs: Sequence[PairSpec],
    options: IngestOptions,
    source: str,
    *,
    paired: bool,
    progress: bool,
) -> tuple[list[Problem], int]:
    """Reads ``pairs`` in parallel batches into ``writer``; returns the bad pairs (raising
    at the first batch with any under "raise") and the image bytes stored."""
    bad: list[Problem] = []
    stored_bytes = 0
    unit = "pair" if paired else "image"
    with (
        ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="ingest") as pool,
        tqdm(total=len(pairs), unit=unit, desc=f"ingest {options.layout}", disable=not progress) as bar,
    ):
        for batch in _batched(pairs, _BATCH):
            results = list(pool.map(reader, batch))
            batch_bad = [result for result in results if isinstance(result, Problem)]
            if batch_bad and options.on_error == "raise":
                raise IngestError(batch_bad, source, hint=_STOPPED)
            bad.extend(batch_bad)
            for result in results:
                if isinstance(result, Row):
                    writer.add(result)
                    stored_bytes += result.nbytes
            bar.update(len(batch))
    return bad, stored_bytes


def _skipped(problem: Problem, source: str) -> SkippedPair:
    return SkippedPair(
        input=join_uri(source, problem.input) if problem.input else None,
        target=join_uri(source, problem.target) if problem.target else None,
        reason=problem.reason,
    )
