"""The official `openai` package's Responses API (and an `openai-agents` run) against
/v1/responses of a real `meterlane serve`: translated to chat completions, or forwarded to an
upstream that speaks it, metered into the ledger with the upstream's usage and limited like a
chat call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import serving
from tests.support.fake_openai import completion_text, prompt_tokens
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

EXTRA = """
[[upstreams]]
name = "native"
base_url = "{base}"
api = "responses"

[[models]]
name = "gpt-native"
upstream = "native"
upstream_model = "gpt-5-mini"
price = {{ input = "0.25", cached_input = "0.025", output = "2.00" }}

[[plans]]
id = "responders"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 300
"""
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk"
         "YAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


@dataclass
class Served:
    base: str
    key: str
    engine: Engine
    upstream: FakeUpstream

    def client(self, user: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", self.key),
                             max_retries=0, default_headers={"X-Meterlane-User": user}, **kw)

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


@pytest.fixture(scope="module")
def served(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("responses")
    with FakeUpstream() as upstream, serving(
            pg_server, "responses", tmp, gateway_toml(upstream.base_url)
            + EXTRA.format(base=upstream.base_url), "responses-app") as (base, key, engine):
        yield Served(base, key, engine, upstream)


@pytest.fixture()
def behaviour(served: Served) -> Iterator[dict[str, Any]]:
    """The fake upstream's behaviour for one test (set it in the test)."""
    served.upstream.behaviour = {}
    try:
        yield served.upstream.behaviour
    finally:
        served.upstream.behaviour = {}


def test_a_response_is_translated_forwarded_and_metered(served: Served) -> None:
    reply = served.client("ada").responses.create(
        model="gpt-4o-mini", instructions="Be brief.", input="Say hello to the world",
        max_output_tokens=5, temperature=0.2)
    assert reply.object == "response" and reply.status == "completed"
    assert reply.id.startswith("resp_") and reply.model == "gpt-4o-mini"
    assert reply.output_text == completion_text(5)
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant"
    sent = served.upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Say hello to the world"}]
    assert sent["body"]["max_tokens"] == 5 and sent["body"]["temperature"] == 0.2
    row = served.rows()[-1]
    assert row.endpoint == "responses" and row.status == "ok" and row.usage_source == "reported"
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (row.input_tokens,
                                                                      row.output_tokens)
    assert row.input_tokens == 2 + 3 + 5 + 3 and row.output_tokens == 5  # as the upstream said
    assert row.cost_pico_usd == row.input_tokens * 150_000 + row.output_tokens * 600_000


def test_a_stream_is_translated_and_its_usage_is_the_ledgers(served: Served) -> None:
    client = served.client("bea")
    with client.responses.stream(model="gpt-4o-mini", input="Count for me",
                                 max_output_tokens=7) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == completion_text(7) == final.output_text
    row = served.rows()[-1]
    assert row.endpoint == "responses" and row.stream and row.status == "ok"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens,
            final.usage.total_tokens) == (row.input_tokens, row.output_tokens,
                                          row.input_tokens + row.output_tokens)
    events = list(client.responses.create(model="gpt-4o-mini", input="Again",
                                          max_output_tokens=2, stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_cached_and_reasoning_tokens_reach_the_ledger(served: Served,
                                                      behaviour: dict[str, Any]) -> None:
    behaviour.update(cached_tokens=4, reasoning_tokens=3)
    reply = served.client("cid").responses.create(model="o3-mini", input="Think it over",
                                                  max_output_tokens=4)
    row = served.rows()[-1]
    assert reply.usage is not None
    assert reply.usage.input_tokens_details.cached_tokens == row.cached_input_tokens == 4
    assert reply.usage.output_tokens_details.reasoning_tokens == row.reasoning_tokens == 3
    assert row.output_tokens == 4 + 3


def test_function_tools_round_trip(served: Served, behaviour: dict[str, Any]) -> None:
    behaviour["tool_call"] = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    behaviour["words"] = 0
    client = served.client("cal")
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.responses.create(model="gpt-4o-mini", input=ask,  # type: ignore[arg-type]
                                    tools=[WEATHER], tool_choice="required")  # type: ignore
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id == "call_fake1"
    sent = served.upstream.requests[-1]["body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["parameters"],
        "description": WEATHER["description"], "strict": True}}]
    assert sent["tool_choice"] == "required"
    with client.responses.stream(model="gpt-4o-mini", input=ask,  # type: ignore[arg-type]
                                 tools=[WEATHER]) as stream:  # type: ignore[list-item]
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    [streamed] = final.output
    assert streamed.type == "function_call"
    assert json.loads(streamed.arguments) == {"city": "Paris"}
    behaviour.clear()
    answer = client.responses.create(model="gpt-4o-mini", max_output_tokens=3, input=[
        *ask, call.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert answer.output_text == completion_text(3)
    sent = served.upstream.requests[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_fake1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_fake1", "content": "18 C and sunny"}


def test_an_image_input_part_becomes_an_image_url_part(served: Served) -> None:
    served.client("dee").responses.create(model="gpt-4o-mini", max_output_tokens=2, input=[{
        "role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": PIXEL, "detail": "low"}]}])
    [message] = served.upstream.requests[-1]["body"]["messages"]
    assert message["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}}]
    assert served.rows()[-1].endpoint == "responses"


def test_a_native_upstream_gets_the_call_as_it_is(served: Served,
                                                  behaviour: dict[str, Any]) -> None:
    behaviour.update(cached_tokens=2, reasoning_tokens=5)
    client = served.client("eve")
    reply = client.responses.create(model="gpt-native", input="Hello there",
                                    previous_response_id="resp_earlier", max_output_tokens=20,
                                    store=True)
    sent = served.upstream.requests[-1]
    assert sent["path"] == "/v1/responses"
    assert sent["body"]["model"] == "gpt-5-mini" and sent["body"]["store"] is True
    assert sent["body"]["previous_response_id"] == "resp_earlier"
    assert reply.output_text == completion_text(20) and reply.id.startswith("resp_fake")
    row = served.rows()[-1]
    assert row.endpoint == "responses" and row.upstream == "native"
    assert reply.usage is not None
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens,
            row.reasoning_tokens) == (reply.usage.input_tokens, 2, reply.usage.output_tokens, 5)
    assert row.cost_pico_usd == ((row.input_tokens - 2) * 250_000 + 2 * 25_000
                                 + row.output_tokens * 2_000_000)
    with client.responses.stream(model="gpt-native", input="Stream it",
                                 max_output_tokens=20) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == completion_text(20)
    assert "stream_options" not in served.upstream.requests[-1]["body"]
    row = served.rows()[-1]
    assert row.stream and row.status == "ok" and final.usage is not None
    assert (row.input_tokens, row.output_tokens) == (final.usage.input_tokens,
                                                      final.usage.output_tokens)


def test_a_native_call_is_limited_and_never_capped_below_what_openai_takes(
        served: Served) -> None:
    client = served.client("kim")
    client.responses.create(model="gpt-native", input="hi", max_output_tokens=280)
    assert served.rows()[-1].input_tokens + served.rows()[-1].output_tokens == 284
    count = served.upstream.request_count
    with pytest.raises(openai.APIStatusError) as spent:  # 16 left, 8 for the prompt: 8 to
        client.responses.create(model="gpt-native", input="hi")  # generate, under 16
    assert spent.value.status_code == 402 and served.upstream.request_count == count
    assert served.rows()[-1].status == "quota_exceeded"
    other = served.client("lee")
    other.responses.create(model="gpt-native", input="hi", max_output_tokens=270)  # 274 used
    clipped = other.responses.create(model="gpt-native", input="hi", max_output_tokens=100)
    assert served.upstream.requests[-1]["body"]["max_output_tokens"] == 300 - 274 - 8
    assert clipped.usage is not None and clipped.usage.output_tokens == 18


def test_a_native_stream_cut_short_is_counted_and_ends_with_an_error(
        served: Served, behaviour: dict[str, Any]) -> None:
    behaviour["fail_after_chunks"] = 3
    resp = httpx.post(served.base + "/v1/responses", timeout=30, headers={
        "Authorization": f"Bearer {served.key}", "X-Meterlane-User": "fay"},
        json={"model": "gpt-native", "input": "hi", "stream": True, "max_output_tokens": 20})
    assert resp.status_code == 200
    events = [json.loads(line[5:]) for line in resp.text.splitlines()
              if line.startswith("data:")]
    assert events[-1]["type"] == "error" and "response.completed" not in {
        e["type"] for e in events}
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1
    row = served.rows()[-1]
    assert row.status == "stream_error" and row.output_tokens == 3  # counted: three words


def test_refusals_use_openais_envelope(served: Served) -> None:
    client = served.client("gus")
    client.responses.create(model="gpt-4o-mini", input="a long answer please",
                            max_output_tokens=400)
    assert served.upstream.requests[-1]["body"]["max_tokens"] < 300  # clipped to what is left
    with pytest.raises(openai.APIStatusError) as spent:
        client.responses.create(model="gpt-4o-mini", input="more", max_output_tokens=50)
    assert spent.value.status_code == 402
    body: Any = spent.value.body
    assert body["code"] == "quota_exceeded" and body["limit"]["id"] == "tokens-day"
    assert body["paywall"]["trigger"] == "limit_reached"
    refused = served.rows()[-1]
    assert refused.endpoint == "responses" and refused.status == "quota_exceeded"
    other = served.client("hal")
    with pytest.raises(openai.BadRequestError) as stateful:
        other.responses.create(model="gpt-4o-mini", input="hi", previous_response_id="resp_1")
    assert stateful.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "does not keep state" in stateful.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as builtin:
        other.responses.create(model="gpt-4o-mini", input="hi",
                               tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert builtin.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="gpt-nope", input="hi")


def test_an_agent_with_a_tool_runs_through_the_gateway(served: Served,
                                                       behaviour: dict[str, Any]) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"18 C and sunny in {city}"

    behaviour.update(tool_call_first={"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                     words=4)
    before = len(served.rows())
    client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=served.key,
                                max_retries=0, default_headers={"X-Meterlane-User": "ivy"})
    agent = Agent(name="weather", instructions="Answer about the weather.", tools=[get_weather],
                  model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client))
    result = Runner.run_sync(agent, "What is the weather in Oslo?")
    assert asked == ["Oslo"]
    assert result.final_output == completion_text(4)
    rows = served.rows()[before:]
    assert [r.endpoint for r in rows] == ["responses", "responses"]
    calls = served.upstream.requests[-2:]
    assert calls[1]["body"]["messages"][-1]["role"] == "tool"
    assert "18 C and sunny in Oslo" in calls[1]["body"]["messages"][-1]["content"]
    for row, raw, call in zip(rows, result.raw_responses, calls, strict=True):
        # one row per model call, with the usage the upstream reported for it
        assert row.input_tokens == prompt_tokens(call["path"], call["body"])
        assert row.output_tokens == 4 and row.usage_source == "reported"
        assert (raw.usage.input_tokens, raw.usage.output_tokens) == (row.input_tokens,
                                                                      row.output_tokens)


def test_a_translated_stream_cut_short_ends_with_an_error_and_is_counted(
        served: Served, behaviour: dict[str, Any]) -> None:
    behaviour["fail_after_chunks"] = 2
    resp = httpx.post(served.base + "/v1/responses", timeout=30, headers={
        "Authorization": f"Bearer {served.key}", "X-Meterlane-User": "joe"},
        json={"model": "gpt-4o-mini", "input": "hi", "stream": True, "max_output_tokens": 9})
    assert resp.status_code == 200
    events = [json.loads(line[5:]) for line in resp.text.splitlines()
              if line.startswith("data:")]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    row = served.rows()[-1]
    assert row.endpoint == "responses" and row.status == "stream_error"
    assert row.output_tokens == 2  # counted: two words passed


def test_a_streamed_agent_run_reads_the_translated_event_stream(
        served: Served, behaviour: dict[str, Any]) -> None:
    import asyncio

    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)

    @function_tool
    def add(a: int, b: int) -> str:
        """Add two numbers."""
        return str(a + b)

    behaviour.update(tool_call_first={"name": "add", "arguments": '{"a": 2, "b": 3}'}, words=3)
    before = len(served.rows())

    async def run() -> tuple[str, list[str]]:
        client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=served.key,
                                    max_retries=0, default_headers={"X-Meterlane-User": "max"})
        agent = Agent(name="adder", tools=[add],
                      model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client))
        result = Runner.run_streamed(agent, "What is 2 + 3?")
        kinds = [event.type async for event in result.stream_events()]
        return str(result.final_output), kinds

    final, kinds = asyncio.run(run())
    assert final == completion_text(3) and "run_item_stream_event" in kinds
    rows = served.rows()[before:]
    assert [(r.endpoint, r.stream, r.status) for r in rows] == [("responses", True, "ok")] * 2
    assert served.upstream.requests[-1]["body"]["messages"][-1] == {
        "role": "tool", "tool_call_id": "call_fake1", "content": "5"}
