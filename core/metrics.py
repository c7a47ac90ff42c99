"""Prometheus metrics (multi-process aware): calls, tokens, cost, time to first token, limit
refusals, upstream latency, circuit state and calls in flight, the ledger writer's queue, errors
by kind. Labels are bounded: apps, models and upstreams are the operator's; never an end user."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 60)
CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}
TOKEN_KINDS = tuple((kind, f"{kind}_tokens")
                    for kind in ("input", "cached_input", "output", "reasoning"))


class LedgerDepth(Protocol):
    """What the metrics read of the ledger writer (metering.ledger.LedgerWriter)."""

    on_depth: Callable[[int], None] | None

    def report_depth(self) -> None: ...


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
        self.cost = Counter("meterlane_cost_picousd", "Cost of the calls served through the "
                            "gateway, in pico-USD (10^-12 USD), by app and model",
                            ["app", "model"],
                            registry=self.registry)
        self.ttft = Histogram("meterlane_time_to_first_token_seconds",
                              "Time from a streamed call's arrival to its first token, by model",
                              ["model"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.refusals = Counter("meterlane_limit_refusals", "Calls refused by a limit, by kind "
                                "(quota_exceeded, rate_limited) and the limit's metric",
                                ["kind", "metric"], registry=self.registry)
        # Gauges: each worker writes its own; /metrics sums (in flight, queue) or takes the
        # worst (circuit) over the live workers.
        self.circuit = Gauge("meterlane_upstream_circuit_state", "An upstream's circuit breaker "
                             "as the workers last saw it: 0 closed, 1 half-open, 2 open",
                             ["upstream"], multiprocess_mode="livemax", registry=self.registry)
        self.in_flight = Gauge("meterlane_upstream_in_flight", "Calls in flight to an upstream",
                               ["upstream"], multiprocess_mode="livesum", registry=self.registry)
        self.ledger_queue = Gauge("meterlane_ledger_queue_depth", "Usage records waiting for "
                                  "the ledger writer", multiprocess_mode="livesum",
                                  registry=self.registry)
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._before_scrape: list[Callable[[], None]] = []
        self._circuit_shown: dict[str, int] = {}

    def labelled(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), kept: prometheus_client checks, converts and locks on every
        labels() (a few us; a call took nine). The labels are bounded (see above), and
        prometheus_client keeps every child anyway."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_call(self, record: Any, seconds: float) -> None:
        model = record.requested_model
        self.labelled(self.calls, record.endpoint, model, record.status).inc()
        for kind, attribute in TOKEN_KINDS:
            count = getattr(record, attribute)
            if count:
                self.labelled(self.tokens, model, kind).inc(count)
        self.labelled(self.upstream_latency, record.upstream or "none").observe(seconds)
        if record.status != "ok":
            self.labelled(self.errors, record.status).inc()

    def upstream_state(self, upstream: str, circuit: str, in_flight: int) -> None:
        """Each call's start and end (under the router's lock): the circuit's gauge is
        written when it changes, the calls in flight every time."""
        state = CIRCUIT_STATES[circuit]
        if self._circuit_shown.get(upstream) != state:
            self.labelled(self.circuit, upstream).set(state)
            self._circuit_shown[upstream] = state
        self.labelled(self.in_flight, upstream).set(in_flight)

    def watch_ledger(self, writer: LedgerDepth) -> None:
        """The ledger writer's queue gauge: the writer tells it as it moves (and while a
        write hangs, as records queue behind it); each scrape reads it afresh."""
        writer.on_depth = self.ledger_queue.set
        self._before_scrape.append(writer.report_depth)

    def render(self) -> bytes:
        for refresh in self._before_scrape:  # this process's own gauges, read now
            try:
                refresh()
            except Exception:  # noqa: BLE001, S110 - a scrape shows the last value then
                pass
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def scrape_allowed(key: str | None, authorization: str | None) -> bool:
    """Whether a scrape may read /metrics: always when no key is configured
    (MLANE_METRICS_KEY), else only with `Authorization: Bearer <that key>` (compared in
    constant time)."""
    if not key:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              key.encode())


def mark_process_dead(pid: int) -> None:
    """A worker is gone: its live gauges leave the sums (gunicorn's child_exit hook)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
