"""Prometheus metrics: calls, tokens, upstream latency, errors by kind (multi-process aware)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One set of metric objects per app; under gunicorn each worker writes its own files and
    /metrics merges them (prometheus_client's multiprocess mode)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("meterlane_calls", "Model calls by endpoint, model and status",
                             ["endpoint", "model", "status"], registry=self.registry)
        self.tokens = Counter("meterlane_tokens", "Tokens metered by model and kind",
                              ["model", "kind"], registry=self.registry)
        self.upstream_latency = Histogram(
            "meterlane_upstream_latency_seconds", "Call latency through the gateway by upstream",
            ["upstream"], buckets=_BUCKETS, registry=self.registry)
        self.errors = Counter("meterlane_errors", "Errors by kind", ["kind"],
                              registry=self.registry)

    def observe_call(self, record: Any, seconds: float) -> None:
        self.calls.labels(record.endpoint, record.requested_model, record.status).inc()
        for kind in ("input", "cached_input", "output", "reasoning"):
            count = getattr(record, f"{kind}_tokens")
            if count:
                self.tokens.labels(record.requested_model, kind).inc(count)
        self.upstream_latency.labels(record.upstream or "none").observe(seconds)
        if record.status != "ok":
            self.errors.labels(record.status).inc()

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
