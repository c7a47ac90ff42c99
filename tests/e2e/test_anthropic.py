"""The official `anthropic` package against /v1/messages of a real `meterlane serve`: text and
tool use, streamed and not, metered into the ledger and limited exactly like chat completions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import serving
from tests.support.fake_openai import completion_text
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

PLANS = """
[[plans]]
id = "claude-users"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 300
"""
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@dataclass
class Served:
    base: str
    key: str
    engine: Engine
    upstream: FakeUpstream

    def client(self, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base, api_key=kw.pop("api_key", self.key),
                                   max_retries=0, **kw)

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


@pytest.fixture(scope="module")
def served(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("anthropic")
    with FakeUpstream() as upstream, serving(
            pg_server, "anthropic", tmp, gateway_toml(upstream.base_url) + PLANS,
            "claude-app") as (base, key, engine):
        yield Served(base, key, engine, upstream)


@pytest.fixture()
def tool_calls(served: Served) -> Iterator[None]:
    served.upstream.behaviour = {"tool_call": {"name": "get_weather",
                                               "arguments": '{"city": "Paris"}'}}
    try:
        yield
    finally:
        served.upstream.behaviour = {}


def test_a_message_is_translated_forwarded_and_metered(served: Served) -> None:
    reply = served.client().messages.create(
        model="gpt-4o-mini", max_tokens=5, system="Be brief.",
        messages=[{"role": "user", "content": "Say hello to the world"}],
        metadata={"user_id": "ada"}, stop_sequences=["\n\n"], output_config={"effort": "low"})
    assert reply.type == "message" and reply.role == "assistant"
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == completion_text(5)  # type: ignore[union-attr]
    assert reply.stop_reason == "end_turn"
    sent = served.upstream.requests[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 5 and sent["stop"] == ["\n\n"] and sent["user"] == "ada"
    assert sent["reasoning_effort"] == "low"
    row = served.rows()[-1]
    assert row.endpoint == "messages" and row.status == "ok" and row.usage_source == "reported"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (row.input_tokens,
                                                                      row.output_tokens)
    assert row.output_tokens == 5
    assert row.cost_pico_usd == row.input_tokens * 150_000 + row.output_tokens * 600_000


def test_a_stream_is_translated_and_its_usage_is_the_ledgers(served: Served) -> None:
    with served.client().messages.stream(
            model="gpt-4o-mini", max_tokens=7, metadata={"user_id": "bea"},
            messages=[{"role": "user", "content": "Count for me"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == completion_text(7)
    assert final.stop_reason == "end_turn"
    row = served.rows()[-1]
    assert row.endpoint == "messages" and row.stream and row.status == "ok"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (row.input_tokens,
                                                                      row.output_tokens)


@pytest.mark.usefixtures("tool_calls")
def test_tool_use_both_ways(served: Served) -> None:
    client = served.client()
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.messages.create(model="gpt-4o-mini", max_tokens=3, tools=[WEATHER],
                                   tool_choice={"type": "any"}, messages=ask,  # type: ignore
                                   metadata={"user_id": "cal"})
    assert reply.stop_reason == "tool_use"
    [text, use] = reply.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"}
    sent = served.upstream.requests[-1]["body"]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == "required"
    with client.messages.stream(model="gpt-4o-mini", max_tokens=3, tools=[WEATHER],  # type: ignore
                                messages=ask, metadata={"user_id": "cal"}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    # the tool's result goes back as a tool message answering the call
    client.messages.create(model="gpt-4o-mini", max_tokens=3, metadata={"user_id": "cal"},
                           messages=[*ask, {"role": "assistant", "content": reply.content},
                                     {"role": "user", "content": [{
                                         "type": "tool_result", "tool_use_id": use.id,
                                         "content": "18 C and sunny"}]}])  # type: ignore
    sent = served.upstream.requests[-1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                     "arguments": '{"city":"Paris"}'}
    assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "18 C and sunny"}


def test_limits_apply_as_to_chat_and_errors_use_anthropics_envelope(served: Served) -> None:
    client = served.client()
    client.messages.create(model="gpt-4o-mini", max_tokens=400, metadata={"user_id": "dan"},
                           messages=[{"role": "user", "content": "a long answer please"}])
    assert served.upstream.requests[-1]["body"]["max_tokens"] < 300  # clipped to what is left
    with pytest.raises(anthropic.APIStatusError) as spent:
        client.messages.create(model="gpt-4o-mini", max_tokens=50, metadata={"user_id": "dan"},
                               messages=[{"role": "user", "content": "more"}])
    assert spent.value.status_code == 402
    body: Any = spent.value.body
    assert body["type"] == "error" and body["error"]["type"] == "billing_error"
    assert body["error"]["limit"]["id"] == "tokens-day"
    refused = served.rows()[-1]
    assert refused.status == "quota_exceeded" and refused.output_tokens == 0
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="gpt-4o-mini", max_tokens=0, metadata={"user_id": "dan"},
                               messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in bad.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", max_tokens=5, metadata={"user_id": "dan"},
                               messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        served.client(api_key="mlk_wrong").messages.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def test_the_x_api_key_header_authenticates_and_a_stream_error_is_an_error_event(
        served: Served) -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 4, "stream": True,
            "metadata": {"user_id": "eli"}, "messages": [{"role": "user", "content": "hi"}]}
    served.upstream.behaviour = {"fail_after_chunks": 2}
    try:
        resp = httpx.post(served.base + "/v1/messages", json=body, timeout=30,
                          headers={"x-api-key": served.key, "anthropic-version": "2023-06-01"})
    finally:
        served.upstream.behaviour = {}
    assert resp.status_code == 200
    events = [block.split("\n")[0] for block in resp.text.strip().split("\n\n")]
    assert events[0] == "event: message_start" and events[-1] == "event: error"
    assert "event: message_stop" not in events
    row = served.rows()[-1]
    assert row.status == "stream_error" and row.output_tokens == 2  # counted: two words passed
