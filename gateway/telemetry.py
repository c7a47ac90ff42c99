"""One gateway call's telemetry: its spans under the request's (reserve, the upstream call with
OpenTelemetry's GenAI attributes, settle), the upstream's own request id, the fields of its log
line, and the metrics only a settled call knows (cost, time to first token, refusals).

Everything here reads values the call computed anyway; nothing parses a body again. With
tracing off there is no tracer and no span is made."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer

from core.config import ModelConfig
from core.errors import DomainError
from core.metrics import Metrics
from core.text import redacted
from core.tracing import child_context, trace_headers
from metering.records import CallRecord
from metering.service import (
    ENDPOINT_CHAT,
    ENDPOINT_COMPLETIONS,
    ENDPOINT_EMBEDDINGS,
    ENDPOINT_RESPONSES,
    CallOutcome,
)

OPERATIONS = {ENDPOINT_CHAT: "chat", ENDPOINT_COMPLETIONS: "text_completion",
              ENDPOINT_EMBEDDINGS: "embeddings", ENDPOINT_RESPONSES: "chat"}
# Where upstreams put their own request id (OpenAI's, then Anthropic's and others'), and the
# name it reaches the client under (x-request-id is the gateway's own).
UPSTREAM_ID_HEADERS = ("x-request-id", "request-id")
UPSTREAM_ID_OUT = "x-upstream-request-id"
MAX_UPSTREAM_ID = 128
REFUSALS = {402: "quota_exceeded", 429: "rate_limited"}
_OK_STATUSES = frozenset({"ok"})


class CallTrace:
    """The telemetry of one call; the gateway's RequestDetail (core/observe.py)."""

    def __init__(self, metrics: Metrics, *, app: str | None = None,
                 tracer: Tracer | None = None, parent: Span | None = None) -> None:
        self.metrics, self.app, self.tracer = metrics, app, tracer
        self._parent = child_context(parent) if tracer is not None else None
        self.outcome: CallOutcome | None = None
        self.limit: dict[str, Any] = {"outcome": "off"}  # no limits configured
        self.upstream_request_id: str | None = None
        self._upstream_span: Span | None = None

    def attach(self, outcome: CallOutcome) -> None:
        self.outcome = outcome
        outcome.trace = self

    def _span(self, name: str) -> Span | None:
        if self.tracer is None:
            return None
        return self.tracer.start_span(name, context=self._parent)

    @contextmanager
    def reserving(self) -> Iterator[None]:
        """Around the limits' reservation: what the limits said, and its span."""
        span = self._span("meterlane.reserve")
        self.limit = {"outcome": "allowed"}
        try:
            yield
        except Exception as exc:
            # a refusal (402, 429), or the limits could not answer (the call fails then)
            kind = REFUSALS.get(exc.status) if isinstance(exc, DomainError) else None
            info = exc.extra.get("limit") if isinstance(exc, DomainError) else None
            self.limit = {"outcome": "refused", "kind": kind} if kind else \
                {"outcome": "unavailable"}
            if kind and isinstance(info, dict):
                self.limit.update(id=info.get("id"), metric=info.get("metric"))
            if span is not None:
                span.set_attribute("meterlane.limit.outcome", kind or "unavailable")
                span.set_status(StatusCode.ERROR, kind or "limits unavailable")
            raise
        finally:
            if span is not None:
                span.end()

    def upstream_call(self, model: ModelConfig, endpoint: str,
                      body: Mapping[str, Any]) -> dict[str, str] | None:
        """The upstream call starts (a candidate of a routed call may follow another): its
        CLIENT span, and the headers that carry its trace context (None when not tracing)."""
        self.upstream_request_id = None
        if self.tracer is None:
            return None
        self._end_upstream(None, "failed: the next candidate was tried", "fallback")
        operation = OPERATIONS.get(endpoint, endpoint)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation, "gen_ai.provider.name": model.upstream,
            "gen_ai.request.model": model.upstream_model, "meterlane.model": model.name}
        cap = body.get("max_completion_tokens") or body.get("max_tokens") \
            or body.get("max_output_tokens")
        if isinstance(cap, int) and not isinstance(cap, bool):
            attributes["gen_ai.request.max_tokens"] = cap
        if body.get("stream") is True:
            attributes["meterlane.stream"] = True
        span = self.tracer.start_span(f"{operation} {model.upstream_model}",
                                      context=self._parent, kind=SpanKind.CLIENT,
                                      attributes=attributes)
        self._upstream_span = span
        return trace_headers(span)

    def answered(self, status: int, headers: Any) -> None:
        """The upstream's answer began: its status, and its own request id when it is one
        line of printable text (it reaches our client and our log)."""
        if headers is not None:
            for name in UPSTREAM_ID_HEADERS:
                value = headers.get(name)
                if isinstance(value, str) and 0 < len(value) <= MAX_UPSTREAM_ID \
                        and value.isprintable():
                    self.upstream_request_id = value
                    break
        span = self._upstream_span
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if self.upstream_request_id:
                span.set_attribute("meterlane.upstream_request_id", self.upstream_request_id)

    @contextmanager
    def settling(self) -> Iterator[None]:
        """Around the ledger write: its span; then, the record written, the upstream span's
        usage (the span ends as the answer ended, before the write) and the metrics of the
        settled call."""
        answered = time.time_ns() if self._upstream_span is not None else None
        span = self._span("meterlane.settle")
        try:
            yield
        finally:
            record = self.outcome.record if self.outcome is not None else None
            if record is not None:
                self._observe(record)
                self._end_upstream(record, record.error, end_time=answered)
            if span is not None:
                if record is not None:
                    span.set_attribute("meterlane.outcome", record.status)
                else:
                    span.set_status(StatusCode.ERROR, "the record was not written")
                span.end()

    def _observe(self, record: CallRecord) -> None:
        model = record.requested_model
        if record.cost_pico_usd:
            self.metrics.labelled(self.metrics.cost, self.app or "", model).inc(
                record.cost_pico_usd)
        if record.ttft_ms is not None:
            self.metrics.labelled(self.metrics.ttft, model).observe(record.ttft_ms / 1000)
        if record.status in REFUSALS.values():
            self.metrics.refusals.labels(record.status,
                                         str(self.limit.get("metric") or "unknown")).inc()

    def _end_upstream(self, record: CallRecord | None, error: str | None,
                      kind: str = "unsettled", end_time: int | None = None) -> None:
        span, self._upstream_span = self._upstream_span, None
        if span is None:
            return
        if record is not None:
            span.set_attributes({
                "gen_ai.usage.input_tokens": record.input_tokens,
                "gen_ai.usage.output_tokens": record.output_tokens,
                "gen_ai.usage.cache_read.input_tokens": record.cached_input_tokens,
                "meterlane.usage.reasoning_tokens": record.reasoning_tokens,
                "meterlane.usage_source": record.usage_source,
                "meterlane.outcome": record.status})
        if record is None or record.status not in _OK_STATUSES:
            span.set_status(StatusCode.ERROR, error or "the call failed")
            span.set_attribute("error.type", record.status if record else kind)
        span.end(end_time=end_time)

    # -- RequestDetail -------------------------------------------------------------------

    def response_headers(self) -> dict[str, str]:
        rid = self.upstream_request_id
        return {UPSTREAM_ID_OUT: rid} if rid else {}

    def finish(self, fields: dict[str, Any], span: Span | None) -> None:
        """The line's call fields, from the ledger record (what the ledger holds, the log
        says); the request span's GenAI summary."""
        # The outcome and this trace refer to each other: let go of it, so that the call's
        # objects (its record, lease, request and answer) are freed now, by reference
        # counting, not by a later full collection (a worker's RSS grew 20 MB under load).
        outcome, self.outcome = self.outcome, None
        self._end_upstream(None, "the call ended before it was settled")
        if outcome is None:
            return
        record = outcome.record
        fields.update(end_user_id=outcome.end_user_id, endpoint=outcome.endpoint,
                      model=outcome.model.name, stream=outcome.stream,
                      limit=self._limit_outcome(outcome),
                      upstream_request_id=self.upstream_request_id)
        if record is not None:
            fields.update(_record_fields(record))
        if span is not None:
            span.set_attributes({"meterlane.app": self.app or "",
                                 "meterlane.end_user_id": outcome.end_user_id,
                                 "gen_ai.request.model": outcome.model.name})
            if record is not None:
                span.set_attribute("meterlane.outcome", record.status)

    def _limit_outcome(self, outcome: CallOutcome) -> dict[str, Any]:
        if self.limit.get("outcome") == "allowed" and outcome.limits_pending:
            return {"outcome": "fail_open"}  # let through while the limit store was down
        return self.limit


def _record_fields(record: CallRecord) -> dict[str, Any]:
    return {
        "model": record.requested_model, "upstream": record.upstream,
        "upstream_model": record.upstream_model, "outcome": record.status,
        "tokens": {"input": record.input_tokens, "cached_input": record.cached_input_tokens,
                   "output": record.output_tokens, "reasoning": record.reasoning_tokens},
        "usage_source": record.usage_source, "cost_pico_usd": record.cost_pico_usd,
        "latency_ms": record.latency_ms, "ttft_ms": record.ttft_ms,
        "alias": record.route_alias, "plan": record.plan_id,
        "error": redacted(record.error) if record.error else None,
    }
