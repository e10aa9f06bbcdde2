"""Application metrics, exported with Serve's own through Ray's Prometheus endpoint.

Ray prefixes every name with ``ray_`` and adds ``_total`` to counters; Serve adds the
``deployment``, ``replica`` and ``application`` tags. On top of Serve's request metrics
(``ray_serve_num_http_requests_total``, ``ray_serve_http_request_latency_ms``, ...):

* ``hdm_http_requests{endpoint, task, status}``: requests answered by the ingress;
* ``hdm_http_request_latency_s{endpoint, task}``: their latency, upload to last byte;
* ``hdm_http_errors{endpoint, task, kind}``: failed requests by error kind (``errors.py``);
* ``hdm_inference_latency_s{task}`` and ``hdm_batch_size{task}``: per batch, in the model
  replicas.

``task`` is the pipeline's tasks joined by ``+`` for ``/v1/pipeline`` and empty for routes
that name none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ray.serve.metrics import Counter, Histogram

from hdm_platform.serve.errors import APIError

__all__ = ["IngressMetrics", "ModelMetrics"]

_LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32]


class IngressMetrics:
    """Request counts, latencies and errors, recorded by the ingress replica."""

    def __init__(self) -> None:
        self.requests = Counter(
            "hdm_http_requests",
            description="HTTP requests answered, by endpoint, task and status code.",
            tag_keys=("endpoint", "task", "status"),
        )
        self.latency = Histogram(
            "hdm_http_request_latency_s",
            description="HTTP request latency in seconds, by endpoint and task.",
            boundaries=_LATENCY_BOUNDARIES_S,
            tag_keys=("endpoint", "task"),
        )
        self.errors = Counter(
            "hdm_http_errors",
            description="Failed HTTP requests, by endpoint, task and error kind.",
            tag_keys=("endpoint", "task", "kind"),
        )

    def record(
        self, endpoint: str, task: str, status: int, seconds: float, kind: str | None
    ) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "task": task, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint, "task": task})
        if kind is not None:
            self.errors.inc(tags={"endpoint": endpoint, "task": task, "kind": kind})

    @contextmanager
    def track(self, endpoint: str, task: str = "") -> Iterator[None]:
        """Record the request run inside; an escaping ``APIError`` counts as its kind, any
        other exception as ``internal``."""
        started = time.perf_counter()
        try:
            yield
        except APIError as error:
            self.record(endpoint, task, error.status, time.perf_counter() - started, error.kind)
            raise
        except Exception:
            self.record(endpoint, task, 500, time.perf_counter() - started, "internal")
            raise
        self.record(endpoint, task, 200, time.perf_counter() - started, None)


class ModelMetrics:
    """Batch sizes and inference time, recorded by a model replica."""

    def __init__(self, task: str) -> None:
        self.latency = Histogram(
            "hdm_inference_latency_s",
            description="Time to run the network on one batch of same-shape images, in seconds.",
            boundaries=_LATENCY_BOUNDARIES_S,
            tag_keys=("task",),
        )
        self.batch_size = Histogram(
            "hdm_batch_size",
            description="Images per batch run by the network.",
            boundaries=_BATCH_SIZE_BOUNDARIES,
            tag_keys=("task",),
        )
        self.latency.set_default_tags({"task": task})
        self.batch_size.set_default_tags({"task": task})

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size, tags={})
        self.latency.observe(seconds, tags={})
