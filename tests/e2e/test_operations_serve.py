"""What an operator gets from a real `meterlane serve` (2 gunicorn workers, Postgres, the fake
upstream over HTTP): one JSON log line per request holding what the ledger holds, spans
exported over OTLP/HTTP to a receiver, and metrics that add up to the ledger after a burst
of calls, some refused by a limit. Nothing secret reaches the log."""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, served_engine, start_server, stop
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream, completion_text, completion_tokens, prompt_tokens

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
PROMPT = "zebrafish-7f3c tell me a secret"
# Per end user: 8 requests at once, then one an hour (429); 600 tokens a day (402).
PLANS = """
[[plans]]
id = "ops"
default = true
[[plans.limits]]
metric = "requests"
window = "bucket:1/1h"
amount = 8
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 600
"""


@dataclass
class Ops:
    base: str
    key: str
    metrics_key: str
    engine: Engine
    log: Path
    receiver: OtlpReceiver

    def request(self, method: str, path: str, body: Any = None,
                **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=30)
        conn.request(method, path, body=orjson.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def call(self, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", CHAT, body, Authorization=f"Bearer {self.key}", **headers)

    def lines(self) -> list[dict[str, Any]]:
        """Every line the server wrote: each must be one JSON object."""
        out = []
        for raw in self.log.read_bytes().splitlines():
            if raw.strip():
                doc = orjson.loads(raw)  # a line that is not JSON fails here
                assert isinstance(doc, dict), raw
                out.append(doc)
        return out

    def line_of(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in self.lines() if d.get("request_id") == request_id]
            if found:
                assert len(found) == 1, found  # one line per request
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line for {request_id}")
            time.sleep(0.05)  # the line is written when the response closes: polled

    def row(self, request_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(UsageEvent).where(
                UsageEvent.request_id == request_id)).one()

    def ledger(self, column: Any, *where: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(column, 0)).where(*where))
                       .scalar_one())


@pytest.fixture(scope="module")
def ops(pg_server: str, upstream: FakeUpstream,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("ops")
    url = create_database(pg_server, f"mlane_e2e_ops_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + PLANS)
    metrics_key = "mk-" + secrets.token_hex(12)
    with OtlpReceiver() as receiver:
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp / "meterlane.toml"), "MLANE_DATA_DIR": str(tmp / "var"),
               "MLANE_KEY_CACHE_SECONDS": "0", "MLANE_LOG_FORMAT": "json",
               "MLANE_METRICS_KEY": metrics_key,
               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        assert cli(env, "db", "upgrade").returncode == 0
        created = cli(env, "keys", "create", "--role", "app", "--app", "ops")
        assert created.returncode == 0, created.stderr
        proc, base = start_server(env, tmp)
        engine = served_engine(env)
        port = base.rsplit(":", 1)[1]
        try:
            yield Ops(base=base, key=created.stdout.strip().splitlines()[-1],
                      metrics_key=metrics_key, engine=engine, log=tmp / f"serve-{port}.log",
                      receiver=receiver)
        finally:
            stop(proc)
            engine.dispose()


def _check_line(line: dict[str, Any], row: Any, headers: dict[str, str]) -> None:
    """The line of a served call says what its ledger row holds."""
    assert line["logger"] == "meterlane.request" and line["msg"] == "request"
    assert line["level"] == "info" and isinstance(line["pid"], int)
    assert datetime.fromisoformat(line["ts"]).tzinfo is not None
    assert line["request_id"] == row.request_id == headers["x-request-id"] \
        == headers["x-meterlane-request-id"]
    assert (line["method"], line["route"], line["status"]) == ("POST", CHAT, row.http_status)
    assert line["app"] == "ops" and line["role"] == "app"
    assert line["end_user_id"] == row.end_user_id
    assert line["model"] == row.requested_model == "gpt-4o-mini"
    assert (line["upstream"], line["upstream_model"]) == (row.upstream, row.upstream_model)
    assert line["outcome"] == row.status == "ok"
    assert line["tokens"] == {"input": row.input_tokens, "cached_input": row.cached_input_tokens,
                              "output": row.output_tokens, "reasoning": row.reasoning_tokens}
    assert type(line["cost_pico_usd"]) is int and line["cost_pico_usd"] == row.cost_pico_usd > 0
    assert line["latency_ms"] == row.latency_ms and line["ttft_ms"] == row.ttft_ms
    assert line["duration_ms"] >= line["latency_ms"]
    assert line["limit"] == {"outcome": "allowed"}
    assert line["upstream_request_id"] == headers["x-upstream-request-id"]
    assert line["upstream_request_id"].startswith("req_fake")
    assert line["stream"] is row.stream


def test_each_call_has_one_json_line_with_what_the_ledger_holds_and_no_secret(
        ops: Ops, upstream: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "user": "log-user", "max_tokens": 6,
            "messages": [{"role": "user", "content": PROMPT}],
            "fake": {"cached_tokens": 2, "reasoning_tokens": 3}}
    upstream.clear()
    status, headers, _ = ops.call(body)
    assert status == 200
    sent = upstream.requests[-1]["body"]
    row = ops.row(headers["x-request-id"])
    # the ledger has what the upstream reported; the line has what the ledger has
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens,
            row.reasoning_tokens) == (prompt_tokens(CHAT, sent), completion_tokens(sent), 2, 3)
    line = ops.line_of(row.request_id)
    _check_line(line, row, headers)
    assert line["ttft_ms"] is None

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, data = ops.call(streamed)
    assert status == 200 and data.rstrip().endswith(b"data: [DONE]")
    row = ops.row(headers["x-request-id"])
    line = ops.line_of(row.request_id)
    _check_line(line, row, headers)
    assert isinstance(line["ttft_ms"], int) and line["ttft_ms"] <= line["latency_ms"]



def test_a_stream_the_client_leaves_gets_its_line_when_the_server_notices(ops: Ops) -> None:
    conn = http.client.HTTPConnection(ops.base.split("//")[1], timeout=10)
    conn.request("POST", CHAT, body=orjson.dumps({
        "model": "gpt-4o-mini", "user": "leaver", "stream": True, "max_tokens": 200,
        "messages": [{"role": "user", "content": PROMPT}], "fake": {"chunk_delay_ms": 20}}),
        headers={"Authorization": f"Bearer {ops.key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    rid = resp.getheader("x-request-id")
    assert rid is not None
    received = b""
    while received.count(b"\n\n") < 5:
        received += resp.read1(4096)
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    line = ops.line_of(rid)
    row = ops.row(rid)
    assert line["outcome"] == row.status == "client_disconnected"
    assert line["tokens"]["output"] == row.output_tokens and 0 < row.output_tokens < 200
    assert line["usage_source"] == row.usage_source == "counted"
    assert line["status"] == 200 and line["ttft_ms"] == row.ttft_ms


def test_spans_are_exported_over_otlp_with_genai_attributes(
        ops: Ops, upstream: FakeUpstream) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    upstream.clear()
    status, headers, _ = ops.call({"model": "gpt-4o-mini", "user": "span-user",
                                   "max_tokens": 4, "messages": [{"role": "user",
                                                                  "content": "hi"}]},
                                  traceparent=f"00-{trace_id}-{parent}-01")
    assert status == 200
    rid = headers["x-request-id"]

    def trace_of(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
        mine = {s.name: s for s in spans if s.trace_id == trace_id}
        return mine if len(mine) == 4 else None

    spans = ops.receiver.wait_for(trace_of)
    assert set(spans) == {"POST /v1/chat/completions", "meterlane.reserve",
                          "chat gpt-4o-mini", "meterlane.settle"}
    server = spans["POST /v1/chat/completions"]
    assert server.kind == 2 and server.parent_span_id == parent
    assert server.attributes["meterlane.request_id"] == rid
    assert server.resource["service.name"] == "meterlane"
    for name in ("meterlane.reserve", "chat gpt-4o-mini", "meterlane.settle"):
        assert spans[name].parent_span_id == server.span_id
    call, row = spans["chat gpt-4o-mini"], ops.row(rid)
    assert call.kind == 3
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert call.attributes["gen_ai.usage.input_tokens"] == row.input_tokens
    assert call.attributes["gen_ai.usage.output_tokens"] == row.output_tokens == 4
    assert upstream.requests[-1]["headers"]["traceparent"] == \
        f"00-{trace_id}-{call.span_id}-01"
    assert call.end <= spans["meterlane.settle"].start  # the call ended before the write

    # a stream: the call's span lasts it, with its usage, and ends before the ledger write
    streamed = secrets.token_hex(16)
    status, headers, data = ops.call({"model": "gpt-4o-mini", "user": "span-user",
                                      "max_tokens": 5, "stream": True, "messages": [
                                          {"role": "user", "content": "hi"}]},
                                     traceparent=f"00-{streamed}-{parent}-01")
    assert status == 200 and data.rstrip().endswith(b"data: [DONE]")
    trace_id = streamed
    spans = ops.receiver.wait_for(trace_of)
    call, row = spans["chat gpt-4o-mini"], ops.row(headers["x-request-id"])
    assert call.attributes["meterlane.stream"] is True
    assert call.attributes["gen_ai.usage.output_tokens"] == row.output_tokens == 5
    assert call.start < call.end <= spans["meterlane.settle"].start
    assert spans["POST /v1/chat/completions"].end >= call.end

    # refused (402: the day's 600 tokens spent by the first call, clipped): a failed
    # reserve, no upstream call, the refusal's row written
    body = {"model": "gpt-4o-mini", "user": "span-refused", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]}
    assert ops.call(body)[0] == 200
    trace_id = secrets.token_hex(16)
    status, headers, _ = ops.call(body, traceparent=f"00-{trace_id}-{parent}-01")
    assert status == 402

    def refused(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
        mine = {s.name: s for s in spans if s.trace_id == trace_id}
        return mine if len(mine) == 3 else None

    spans = ops.receiver.wait_for(refused)
    assert set(spans) == {"POST /v1/chat/completions", "meterlane.reserve",
                          "meterlane.settle"}
    assert spans["meterlane.reserve"].status == 2  # error
    assert spans["meterlane.reserve"].attributes["meterlane.limit.outcome"] == \
        "quota_exceeded"
    assert spans["meterlane.settle"].attributes["meterlane.outcome"] == \
        ops.row(headers["x-request-id"]).status == "quota_exceeded"
    assert spans["POST /v1/chat/completions"].attributes["http.response.status_code"] == 402
    assert set(ops.receiver.paths) == {"/v1/traces"}


def _metrics(ops: Ops) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, data = ops.request("GET", "/metrics",
                                        Authorization=f"Bearer {ops.metrics_key}")
    assert status == 200, data
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(data.decode())
            for s in family.samples}


def _value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_metrics_need_the_key_and_add_up_to_the_ledger_after_a_burst(ops: Ops) -> None:
    status, headers, data = ops.request("GET", "/metrics")
    assert status == 401 and headers["content-type"] == "application/problem+json"
    assert orjson.loads(data)["status"] == 401
    assert ops.request("GET", "/metrics", Authorization="Bearer wrong")[0] == 401

    def small(user: str, **extra: Any) -> dict[str, Any]:
        return {"model": "gpt-4o-mini", "user": user, "max_tokens": 3,
                "messages": [{"role": "user", "content": "count me"}], **extra}

    with ThreadPoolExecutor(10) as pool:  # the burst: 10 at once, 8 fit the bucket
        rate = list(pool.map(lambda _: ops.call(small("burst-rate")), range(10)))
    assert sorted(s for s, _, _ in rate) == [200] * 8 + [429] * 2
    quota = [ops.call(small("burst-quota", max_tokens=200)) for _ in range(6)]
    assert {s for s, _, _ in quota} == {200, 402}
    streams = [ops.call(small("burst-stream", stream=True)) for _ in range(2)]
    assert [s for s, _, _ in streams] == [200, 200]
    ghost = [ops.call({**small("burst-ghost"), "model": "ghost"}) for _ in range(6)]
    assert all(s >= 500 for s, _, _ in ghost)  # its upstream is down: the circuit opens

    for status, headers, _ in rate + quota:  # a refused call's line says which limit
        if status != 200:
            line = ops.line_of(headers["x-request-id"])
            kind = "rate_limited" if status == 429 else "quota_exceeded"
            assert line["outcome"] == kind and line["status"] == status
            assert line["limit"]["outcome"] == "refused" and line["limit"]["kind"] == kind
            assert line["limit"]["metric"] == ("requests" if status == 429 else "tokens")

    found = _metrics(ops)
    cost = sum(v for (name, labels), v in found.items()
               if name == "meterlane_cost_picousd_total" and ("app", "ops") in labels)
    assert cost == ops.ledger(func.sum(UsageEvent.cost_pico_usd)) > 0
    for kind, metric in (("rate_limited", "requests"), ("quota_exceeded", "tokens")):
        made = ops.ledger(func.count(), UsageEvent.status == kind)
        assert made > 0
        assert _value(found, "meterlane_limit_refusals_total", kind=kind, metric=metric) \
            == made
    assert _value(found, "meterlane_time_to_first_token_seconds_count",
                  model="gpt-4o-mini") == ops.ledger(func.count(),
                                                     UsageEvent.ttft_ms.is_not(None))
    assert _value(found, "meterlane_tokens_total", model="gpt-4o-mini", kind="output") \
        == ops.ledger(func.sum(UsageEvent.output_tokens),
                      UsageEvent.requested_model == "gpt-4o-mini")
    assert _value(found, "meterlane_upstream_in_flight", upstream="cloud") == 0
    assert _value(found, "meterlane_upstream_circuit_state", upstream="cloud") == 0
    assert _value(found, "meterlane_upstream_circuit_state", upstream="down") == 2
    assert _value(found, "meterlane_ledger_queue_depth") == 0
    assert _value(found, "meterlane_ledger_spooled") == 0
    assert _value(found, "meterlane_ledger_quarantined") == 0
    # bounded labels: no end user is a label value
    assert not any(value.startswith(("burst-", "log-user", "span-user"))
                   for _, labels in found for _, value in labels)


def test_every_line_is_json_and_nothing_secret_reaches_the_log(ops: Ops) -> None:
    """Over every line the server wrote (with xdist, this module's other tests may have run
    on another server: its own calls come first): prompts with a marker, completions, keys in
    headers, a refused call."""
    body = {"model": "gpt-4o-mini", "user": "secretive", "max_tokens": 6,
            "messages": [{"role": "user", "content": PROMPT}]}
    # the third is clipped to the rest of the day's 600 tokens; the fourth is refused
    sent = [ops.call(body), ops.call({**body, "stream": True}),
            ops.call({**body, "max_tokens": 1000}), ops.call({**body, "max_tokens": 1000})]
    assert [s for s, _, _ in sent] == [200, 200, 200, 402]
    for _, headers, _ in sent:
        ops.line_of(headers["x-request-id"])
    text = ops.log.read_text()
    for secret in (PROMPT, "zebrafish", completion_text(6).strip(), ops.key,
                   "sk-upstream-secret", ops.metrics_key, "Bearer"):
        assert secret not in text
    lines = ops.lines()  # every line is JSON: start-up and gunicorn's own too
    assert any(d.get("event") == "startup" and d["msg"].startswith("serving") for d in lines)
    assert any(d["logger"] == "gunicorn.error" for d in lines)
    requests = [d for d in lines if d["logger"] == "meterlane.request"]
    assert len({d["request_id"] for d in requests}) == len(requests)  # one line each
