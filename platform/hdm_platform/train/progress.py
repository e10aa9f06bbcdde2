"""One progress display in the driver: the training workers' epoch lines, passed through a
small named Ray actor instead of Ray's forwarding of every worker's stdout.

Ray's log forwarding (``log_to_driver``) prefixes each line with its process and mixes it
with Ray's own messages, and a line printed by a worker can reach the console twice. The
driver turns forwarding off (``hdm -v`` turns it back on) and prints what rank 0 puts here.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import ray

__all__ = ["ProgressLines", "progress_display", "report_progress"]

#: The longest a driver's call for lines waits before it asks again.
_WAIT_S = 10.0


@ray.remote(num_cpus=0)
class ProgressLines:
    """Lines from the workers, waiting for the driver (no CPU: it must never wait for one).

    An asyncio actor: the driver's :meth:`take` waits here until a line arrives, so the
    display costs one call per line, not a poll every fraction of a second beside the
    training workers.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._arrived = asyncio.Event()
        self._closed = False

    async def put(self, line: str) -> None:
        self._lines.append(line)
        self._arrived.set()

    async def take(self, wait_s: float) -> list[str]:
        """The lines put since the last call, after waiting up to ``wait_s`` for one."""
        if not self._lines and not self._closed:
            try:
                await asyncio.wait_for(self._arrived.wait(), wait_s)
            except TimeoutError:
                pass
        self._arrived.clear()
        lines, self._lines = self._lines, []
        return lines

    async def close(self) -> None:
        """Ends a waiting :meth:`take` now, and any later one at once."""
        self._closed = True
        self._arrived.set()


@contextmanager
def progress_display() -> Iterator[str]:
    """Yields the actor's name for the workers; prints its lines until the block ends."""
    name = f"hdm-progress-{uuid.uuid4().hex[:12]}"
    lines = ProgressLines.options(name=name).remote()
    done = threading.Event()

    def show() -> None:
        while not done.is_set():
            _print(ray.get(lines.take.remote(_WAIT_S)))

    printer = threading.Thread(target=show, name="hdm-progress", daemon=True)
    printer.start()
    try:
        yield name
    finally:
        done.set()
        ray.get(lines.close.remote())
        printer.join()
        _print(ray.get(lines.take.remote(0)))
        ray.kill(lines)


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stdout, flush=True)


def report_progress(channel: str | None, line: str) -> None:
    """From a worker: show ``line`` in the driver's display, or print it without one."""
    if channel is None:
        print(line, flush=True)
        return
    ray.get_actor(channel).put.remote(line)
