"""The gateway against real Postgres and a real HTTP upstream on loopback (in-process app)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import Keys, bearer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello to the world"}],
            **extra}


def ledger(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


def sse_events(body: bytes) -> list[Any]:
    out = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def test_chat_is_forwarded_and_recorded_with_reported_usage(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="alice", seed=7, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        headers=bearer(keys.app))
    assert resp.status_code == 200, resp.data
    body = resp.get_json()
    sent = upstream.requests[-1]
    assert sent["body"]["seed"] == 7 and sent["body"]["tools"][0]["function"]["name"] == "f"
    assert sent["headers"].get("authorization") == "Bearer sk-upstream-secret"
    assert resp.headers["X-Meterlane-Request-Id"].startswith("req_")
    [row] = ledger(clean_db)
    assert row.input_tokens == body["usage"]["prompt_tokens"]
    assert row.output_tokens == body["usage"]["completion_tokens"]
    assert row.usage_source == "reported" and row.status == "ok" and row.priced
    expected = row.input_tokens * 150_000 + row.output_tokens * 600_000  # pico-USD per token
    assert row.cost_pico_usd == expected
    assert row.request_id == resp.headers["X-Meterlane-Request-Id"]


def test_cached_and_reasoning_tokens_are_recorded_and_priced_once(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat("o3-mini", fake={"cached_tokens": 3,
                                                        "reasoning_tokens": 5}),
                       headers=bearer(keys.app, **{"X-Meterlane-User": "bob"}))
    assert resp.status_code == 200, resp.data
    usage = resp.get_json()["usage"]
    [row] = ledger(clean_db)
    assert (row.cached_input_tokens, row.reasoning_tokens) == (3, 5)
    assert row.output_tokens == usage["completion_tokens"]
    uncached = row.input_tokens - 3
    assert row.cost_pico_usd == (uncached * 1_100_000 + 3 * 550_000
                                 + row.output_tokens * 4_400_000)


def test_stream_relays_events_and_hides_usage_chunk_not_asked_for(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="carol", stream=True, max_tokens=5),
                       headers=bearer(keys.app))
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse_events(resp.get_data())
    assert events[-1] == "[DONE]"
    assert all(ev == "[DONE]" or ev.get("choices") for ev in events), "usage chunk leaked"
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    [row] = ledger(clean_db)
    assert row.usage_source == "reported" and row.output_tokens == 5 and row.stream


def test_stream_shows_usage_chunk_when_client_asked(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="carol", stream=True, max_tokens=4,
                                       stream_options={"include_usage": True}),
                       headers=bearer(keys.app))
    events = sse_events(resp.get_data())
    usage_events = [e for e in events if e != "[DONE]" and e.get("usage")]
    assert len(usage_events) == 1 and usage_events[0]["choices"] == []
    [row] = ledger(clean_db)
    assert row.output_tokens == usage_events[0]["usage"]["completion_tokens"] == 4


def test_stream_without_usage_is_counted_with_the_tokenizer(
        app: Any, client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat("llama-local", user="dave", stream=True, max_tokens=6,
                                       fake={"usage": False}), headers=bearer(keys.app))
    events = sse_events(resp.get_data())
    text = "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if e != "[DONE]" and e.get("choices"))
    tokenizers = app.extensions["wiring"].metering.tokenizers
    tok = tokenizers.for_model("meta-llama/Llama-3.1-8B-Instruct", "cl100k_base")
    [row] = ledger(clean_db)
    assert row.usage_source == "counted"
    assert row.output_tokens == tok.count(text) > 0
    assert row.input_tokens > 0
    assert row.cost_pico_usd is None and not row.priced


def test_upstream_failing_mid_stream_is_counted_not_zero(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="erin", stream=True, max_tokens=50,
                                       fake={"fail_after_chunks": 3}), headers=bearer(keys.app))
    assert resp.status_code == 200
    events = sse_events(resp.get_data())
    assert "error" in events[-1]
    [row] = ledger(clean_db)
    assert row.status == "stream_error" and row.usage_source == "counted"
    assert row.output_tokens > 0 and row.input_tokens > 0


def test_non_stream_without_usage_is_counted(client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post("/v1/completions", json={"model": "gpt-4o-mini", "prompt": "Once upon",
                                                "user": "fay", "fake": {"usage": False}},
                       headers=bearer(keys.app))
    assert resp.status_code == 200, resp.data
    [row] = ledger(clean_db)
    assert row.endpoint == "completions" and row.usage_source == "counted"
    assert row.input_tokens == 2 and row.output_tokens > 0


def test_embeddings_are_metered(client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post("/v1/embeddings", json={"model": "text-embedding-3-small",
                                               "input": ["a b c", "d e"], "user": "gus"},
                       headers=bearer(keys.app))
    assert resp.status_code == 200, resp.data
    [row] = ledger(clean_db)
    assert row.input_tokens == resp.get_json()["usage"]["prompt_tokens"] and row.output_tokens == 0


@pytest.mark.parametrize(("fake", "status", "code"), [
    ({"status": 500}, 502, "upstream_error"),
    ({"status": 401}, 502, "upstream_error"),
    ({"status": 400, "message": "bad temperature"}, 400, "invalid_request"),
    ({"status": 429}, 429, "rate_limited"),
])
def test_upstream_errors_use_openai_envelope(client: Any, keys: Keys, clean_db: Engine,
                                             fake: dict[str, Any], status: int,
                                             code: str) -> None:
    resp = client.post(CHAT, json=chat(user="hal", fake=fake), headers=bearer(keys.app))
    assert resp.status_code == status
    err = resp.get_json()["error"]
    assert err["code"] == code and "cloud" in err["message"]
    if status == 429:
        assert resp.headers.get("Retry-After")
    [row] = ledger(clean_db)
    assert row.status == "upstream_error" and row.input_tokens == 0


def test_refused_connection_is_502_naming_the_upstream(client: Any, keys: Keys,
                                                        clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat("ghost", user="ivy"), headers=bearer(keys.app))
    assert resp.status_code == 502
    assert "'down'" in resp.get_json()["error"]["message"]
    [row] = ledger(clean_db)
    assert row.status == "upstream_unavailable"


def test_slow_upstream_is_504(client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="jo", fake={"hang": True}), headers=bearer(keys.app))
    assert resp.status_code == 504
    assert resp.get_json()["error"]["code"] == "upstream_timeout"
    [row] = ledger(clean_db)
    assert row.status == "timeout"


def test_idempotency_key_is_used_once(client: Any, keys: Keys, clean_db: Engine) -> None:
    headers = bearer(keys.app, **{"Idempotency-Key": "call-1"})
    first = client.post(CHAT, json=chat(user="kim"), headers=headers)
    assert first.status_code == 200
    again = client.post(CHAT, json=chat(user="kim"), headers=headers)  # the first answer again
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    [row] = ledger(clean_db)
    assert row.idempotency_key == "call-1"
