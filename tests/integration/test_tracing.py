"""Spans of real calls: the app served over real HTTP (werkzeug's server, in a thread of this
process, so that the SDK's in-memory exporter sees its spans), against the fake upstream over
HTTP, with real Postgres. The spans' numbers are checked against the ledger and what the
upstream received (the traceparent)."""

from __future__ import annotations

import functools
import http.client
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import select
from sqlalchemy.engine import Engine
from werkzeug.serving import make_server

from metering.models import UsageEvent
from tests.conftest import config_from_toml, gateway_toml, make_keys
from tests.support.upstream import FakeUpstream, prompt_tokens

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
# an alias whose first candidate (unpriced, so tried first) is on an upstream that is down
ROUTED = """
[[models]]
name = "ghost-free"
upstream = "down"

[[aliases]]
name = "auto"
models = ["ghost-free", "gpt-4o-mini"]
"""
PLANS = """
[[plans]]
id = "traced"
default = true
[[plans.limits]]
metric = "requests"
window = "bucket:1/1h"
amount = 2
"""


@functools.cache
def exporter() -> InMemorySpanExporter:
    """The process's tracer provider (set once: OpenTelemetry allows one), into memory."""
    found = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(found))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another tracer provider was set first"
    return found


@dataclass
class Served:
    base: str
    key: str
    engine: Engine

    def post(self, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.base, timeout=30)
        conn.request("POST", CHAT, body=orjson.dumps(body), headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
            **headers})
        resp = conn.getresponse()
        data = resp.read()  # a stream: to its end
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def row(self, request_id: str) -> UsageEvent:
        with self.engine.connect() as conn:
            return conn.execute(select(UsageEvent).where(
                UsageEvent.request_id == request_id)).one()  # type: ignore[return-value]


@pytest.fixture()
def served(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
           tmp_path: Path) -> Iterator[Served]:
    from app import create_app

    exporter().clear()
    config = config_from_toml(gateway_toml(upstream.base_url) + ROUTED + PLANS, tmp_path,
                              database_url=pg_url, tracing=True)
    app = create_app(config)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(f"127.0.0.1:{server.server_port}", make_keys(app).app, clean_db)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        app.extensions["wiring"].engine.dispose()
        exporter().clear()


def spans_of(request_id: str, timeout: float = 10.0) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request's SERVER span and its children, once it has ended (the server ends it
    after the response is sent: polled with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = exporter().get_finished_spans()
        server = [s for s in spans if s.kind == SpanKind.SERVER
                  and (s.attributes or {}).get("meterlane.request_id") == request_id]
        if server:
            parent = server[0].context
            assert parent is not None
            children = [s for s in spans if s.parent is not None
                        and s.parent.span_id == parent.span_id]
            return server[0], children
        if time.monotonic() > deadline:
            raise AssertionError(f"no span of request {request_id}")
        time.sleep(0.02)


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def test_a_call_is_one_trace_continued_from_the_client_and_passed_to_the_upstream(
        served: Served, upstream: FakeUpstream) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": "gpt-4o-mini", "user": "traced-1", "max_tokens": 7,
            "messages": [{"role": "user", "content": "three little words"}],
            "fake": {"cached_tokens": 2}}
    upstream.clear()
    status, headers, _ = served.post(body, traceparent=f"00-{trace_id}-{client_span}-01")
    assert status == 200
    rid = headers["x-request-id"]
    server, children = spans_of(rid)
    assert f"{server.context.trace_id:032x}" == trace_id  # the client's trace goes on
    assert server.parent is not None and f"{server.parent.span_id:016x}" == client_span
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["http.route"] == CHAT
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    named = by_name(children)
    assert set(named) == {"meterlane.reserve", "chat gpt-4o-mini", "meterlane.settle"}
    call = named["chat gpt-4o-mini"]
    row = served.row(rid)
    sent = upstream.requests[-1]
    assert call.kind == SpanKind.CLIENT
    assert call.status.status_code == StatusCode.UNSET
    attrs = call.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "cloud"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.request.max_tokens"] == 7
    assert attrs["gen_ai.usage.input_tokens"] == row.input_tokens \
        == prompt_tokens(CHAT, sent["body"])
    assert attrs["gen_ai.usage.output_tokens"] == row.output_tokens == 7
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == row.cached_input_tokens == 2
    assert attrs["http.response.status_code"] == 200
    assert attrs["meterlane.upstream_request_id"] == headers["x-upstream-request-id"]
    # the upstream was told the trace: the client span's id as its parent
    assert sent["headers"]["traceparent"] == \
        f"00-{trace_id}-{call.context.span_id:016x}-01"
    reserve, settle = named["meterlane.reserve"], named["meterlane.settle"]
    assert reserve.end_time <= call.start_time  # reserve, then call, then settle
    assert call.start_time <= call.end_time <= settle.start_time  # no overlap with settle
    assert settle.attributes["meterlane.outcome"] == row.status == "ok"


def test_a_stream_span_ends_with_its_usage_when_the_stream_ends(
        served: Served, upstream: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "user": "traced-2", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "stream me"}]}
    upstream.clear()
    status, headers, data = served.post(body)
    assert status == 200 and data.rstrip().endswith(b"data: [DONE]")
    rid = headers["x-request-id"]
    server, children = spans_of(rid)
    assert server.parent is None  # no traceparent came: a trace of its own
    call = by_name(children)["chat gpt-4o-mini"]
    settle = by_name(children)["meterlane.settle"]
    row = served.row(rid)
    attrs = call.attributes or {}
    assert attrs["meterlane.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == row.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == row.output_tokens == 5
    # the call's span lasts the stream, and ends with it: before the ledger write begins
    # (its usage is set on it once the record is known, at the end time the stream ended)
    assert call.end_time <= settle.start_time
    assert call.end_time - call.start_time > 0
    assert server.end_time >= call.end_time
    traceparent = upstream.requests[-1]["headers"]["traceparent"]
    assert traceparent.split("-")[1:3] == [f"{call.context.trace_id:032x}",
                                           f"{call.context.span_id:016x}"]


def test_a_routed_call_has_a_span_for_each_candidate_tried(served: Served) -> None:
    status, headers, _ = served.post({"model": "auto", "user": "traced-4", "max_tokens": 3,
                                      "messages": [{"role": "user", "content": "route me"}]})
    assert status == 200
    _, children = spans_of(headers["x-request-id"])
    calls = sorted((s for s in children if s.kind == SpanKind.CLIENT),
                   key=lambda s: s.start_time or 0)
    assert [s.name for s in calls] == ["chat ghost-free", "chat gpt-4o-mini"]
    failed, served_by = calls
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "fallback"
    assert served_by.status.status_code == StatusCode.UNSET
    assert served_by.attributes["gen_ai.usage.output_tokens"] == \
        served.row(headers["x-request-id"]).output_tokens == 3
    assert [s.name for s in children].count("meterlane.reserve") == 2  # one per candidate


def test_a_refused_call_has_a_failed_reserve_and_no_upstream_span(
        served: Served, upstream: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "user": "traced-3", "max_tokens": 3,
            "messages": [{"role": "user", "content": "again"}]}
    assert [served.post(body)[0] for _ in range(2)] == [200, 200]
    before = upstream.request_count
    status, headers, _ = served.post(body)
    assert status == 429 and upstream.request_count == before
    rid = headers["x-request-id"]
    server, children = spans_of(rid)
    named = by_name(children)
    assert set(named) == {"meterlane.reserve", "meterlane.settle"}
    reserve = named["meterlane.reserve"]
    assert reserve.status.status_code == StatusCode.ERROR
    assert reserve.attributes["meterlane.limit.outcome"] == "rate_limited"
    assert named["meterlane.settle"].attributes["meterlane.outcome"] == \
        served.row(rid).status == "rate_limited"
    assert server.attributes["http.response.status_code"] == 429


def test_no_span_is_made_when_tracing_is_off(clean_db: Engine, pg_url: str,
                                             upstream: FakeUpstream, tmp_path: Path) -> None:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url), tmp_path, database_url=pg_url)
    app = create_app(replace(config, tracing=False))
    exporter().clear()
    key = make_keys(app).app
    upstream.clear()
    with app.test_client() as client:
        resp = client.post(CHAT, json={"model": "gpt-4o-mini", "user": "untraced",
                                       "messages": [{"role": "user", "content": "hi"}]},
                           headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200
        assert client.get("/healthz").status_code == 200
    app.extensions["wiring"].engine.dispose()
    assert exporter().get_finished_spans() == ()
    assert "traceparent" not in upstream.requests[-1]["headers"]
