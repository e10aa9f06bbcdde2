"""The driver's progress display: workers' lines reach the driver's console through a small actor."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray

from hdm_platform.train import progress
from hdm_platform.train.progress import progress_display, report_progress


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote
def report_lines(channel: str, count: int) -> None:
    for index in range(count):
        report_progress(channel, f"epoch {index + 1}/{count}")
        time.sleep(0.2)


def test_lines_from_a_worker_are_printed_in_order_and_closing_does_not_wait(local_ray, capsys):
    with progress_display() as channel:
        ray.get(report_lines.remote(channel, 3))
        time.sleep(0.5)
        # The driver's waiting call returns as each line arrives, not at the end of its wait.
        assert capsys.readouterr().out.splitlines() == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
        ray.get(report_lines.remote(channel, 1))
        closing = time.perf_counter()
    # Closing ends the waiting call at once, and prints what came in just before.
    assert time.perf_counter() - closing < progress._WAIT_S
    assert capsys.readouterr().out.splitlines() == ["epoch 1/1"]
