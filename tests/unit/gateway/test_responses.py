"""Translating OpenAI Responses requests to chat calls, chat answers and streams back, and
relaying a native Responses stream (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response

from core.config import AliasConfig, Config, ModelConfig, UpstreamConfig
from core.errors import DomainError, InvalidRequestError
from gateway.protocol import metered_items, read_usage, texts_of_choices
from gateway.responses import response_from_chat, speaks_responses, to_chat
from gateway.responses_stream import ResponsesRelay, ResponsesStream
from gateway.wire import responses_call
from metering.records import CallRecord


def _record(**kw: Any) -> CallRecord:
    fields: dict[str, Any] = dict(
        app_id=1, end_user_id=1, request_id="r", idempotency_key="r", endpoint="responses",
        requested_model="m", upstream="u", upstream_model="m", stream=False, input_tokens=12,
        cached_input_tokens=4, output_tokens=9, reasoning_tokens=2, usage_source="reported",
        cost_pico_usd=None, priced=False, status="ok", http_status=200, error=None,
        latency_ms=1, ttft_ms=None, created_at=datetime.now(UTC))
    fields.update(kw)
    return CallRecord(**fields)


def test_items_become_chat_messages() -> None:
    chat = to_chat({"model": "m", "instructions": "Be brief.", "max_output_tokens": 30,
                    "user": "ada", "reasoning": {"effort": "low"}, "input": [
        {"role": "developer", "content": "Use metric units."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
         "arguments": "{\"x\":1}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "ok"}]}]})
    assert chat["max_tokens"] == 30 and chat["user"] == "ada"
    assert chat["reasoning_effort"] == "low" and "stream" not in chat
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"}]


def test_function_tools_are_flattened_and_the_choice_mapped() -> None:
    chat = to_chat({"model": "m", "input": "hi", "stream": True, "parallel_tool_calls": False,
                    "tool_choice": {"type": "function", "name": "f"},
                    "text": {"format": {"type": "json_schema", "name": "out",
                                        "schema": {"type": "object"}, "strict": True}},
                    "tools": [{"type": "function", "name": "f", "parameters": {
                        "type": "object"}, "strict": True}]})
    assert chat["stream"] is True and chat["parallel_tool_calls"] is False
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object"}, "strict": True}}


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "does not keep state"),
    ({"conversation": "conv_1"}, "conversation", "conversations"),
    ({"tools": [{"type": "web_search"}]}, "tools", "built-in tools"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools", "built-in"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input", "file_id"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"input": []}, "input", "non-empty"),
    ({"instructions": 3}, "instructions", "string"),
    ({"tool_choice": "sometimes"}, "tool_choice", "auto, none, required"),
    ({"reasoning": {"effort": "lots"}}, "reasoning", "effort"),
    ({"model": ""}, "model", "model"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"max_output_tokens": "9"}, "max_output_tokens", "positive integer"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input", "input_file"),
    ({"input": [{"type": "function_call", "call_id": 3, "name": "f"}]}, "input", "call_id"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "call_id"),
    ({"input": ["hi"]}, "input", "object"),
])
def test_what_a_chat_upstream_cannot_serve_is_a_clear_400(extra: dict[str, Any], param: str,
                                                          words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words) as bad:
        to_chat({"model": "m", "input": "hi", **extra})
    assert bad.value.param == param


def test_a_chat_answer_is_a_response_the_sdk_parses() -> None:
    doc = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]}
    request = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]}
    body = response_from_chat(doc, request, _record())
    parsed = Response.model_validate(body)
    assert parsed.status == "completed" and parsed.output_text == "Let me see."
    assert [item.type for item in parsed.output] == ["message", "function_call"]
    call = parsed.output[1]
    assert call.type == "function_call" and call.call_id == "call_1"
    assert call.arguments == "{\"a\":1}" and call.name == "f"
    assert parsed.usage is not None
    assert (parsed.usage.input_tokens, parsed.usage.input_tokens_details.cached_tokens,
            parsed.usage.output_tokens, parsed.usage.output_tokens_details.reasoning_tokens,
            parsed.usage.total_tokens) == (12, 4, 9, 2, 21)
    cut = response_from_chat({"choices": [{"finish_reason": "length", "message": {
        "content": "abc"}}]}, request, _record())
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}


def _chat_events(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps({"choices": [c]}) + b"\n\n" for c in chunks)


def _events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]


def test_a_chat_stream_becomes_the_responses_stream() -> None:
    stream = ResponsesStream({"model": "m", "input": "hi"})
    data = stream.feed(_chat_events(
        {"index": 0, "delta": {"role": "assistant", "content": ""}},
        {"index": 0, "delta": {"content": "Hel"}})[:-5])  # an event cut in two
    data += stream.feed(_chat_events({"index": 0, "delta": {"content": "Hel"}})[-5:]
                        + _chat_events(
        {"index": 0, "delta": {"content": "lo"}},
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                               "function": {"name": "f", "arguments": "{\"a\""}}
                                              ]}},
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}},
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    data += stream.end(_record(stream=True))
    events = _events(data)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[6]["text"] == "Hello" and events[12]["arguments"] == "{\"a\":1}"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello" and final.status == "completed"
    assert final.output[1].type == "function_call" and final.output[1].call_id == "call_9"
    assert final.usage is not None and final.usage.total_tokens == 21
    assert events[0]["response"]["id"] == final.id and events[0]["response"]["output"] == []


def test_a_streamed_refusal_is_a_refusal_part() -> None:
    stream = ResponsesStream({"model": "m", "input": "hi"})
    data = stream.feed(_chat_events({"index": 0, "delta": {"refusal": "I can"}},
                                    {"index": 0, "delta": {"refusal": "not."}},
                                    {"index": 0, "delta": {}, "finish_reason": "stop"}))
    events = _events(data + stream.end(_record(stream=True)))
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added", "response.content_part.added", "response.refusal.delta",
        "response.refusal.delta", "response.refusal.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    final = Response.model_validate(events[-1]["response"])
    assert final.output[0].type == "message"
    assert final.output[0].content[0].type == "refusal"
    assert final.output[0].content[0].refusal == "I cannot."


def test_a_failed_stream_ends_with_an_error_and_response_failed() -> None:
    stream = ResponsesStream({"model": "m", "input": "hi"})
    stream.feed(_chat_events({"index": 0, "delta": {"content": "a"}}))
    events = _events(stream.error(502, "upstream failed", "upstream_stream_error"))
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert events[0]["message"] == "upstream failed"
    assert events[1]["response"]["error"]["code"] == "upstream_stream_error"


def _native(*docs: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + d["type"].encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n"
                    for d in docs)


def test_a_native_stream_is_relayed_and_its_usage_read_from_response_completed() -> None:
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3},
             "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 2},
             "total_tokens": 16}
    relay = ResponsesRelay()
    head = _native({"type": "response.created", "sequence_number": 0,
                    "response": {"id": "r", "error": None, "usage": None}},
                   {"type": "response.output_text.delta", "sequence_number": 1,
                    "output_index": 0, "content_index": 0, "delta": "Hi"},
                   {"type": "response.output_text.delta", "sequence_number": 2,
                    "output_index": 0, "content_index": 0, "delta": " there"})
    completed = _native({"type": "response.completed", "sequence_number": 3,
                         "response": {"id": "r", "usage": usage}})
    out = relay.feed(head + completed)
    assert out == head  # forwarded as it came; the end is held back until the ledger has it
    assert relay.done and relay.final == completed and relay.upstream_error is None
    assert relay.usage is not None
    assert (relay.usage.input_tokens, relay.usage.cached_input_tokens, relay.usage.output_tokens,
            relay.usage.reasoning_tokens) == (10, 3, 6, 2)
    assert relay.texts() == ["Hi there"] and relay.sequence == 4


def test_a_native_streams_web_searches_are_each_seen_once() -> None:
    search = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    nameless = {"type": "web_search_call", "id": "x" * 201, "status": "completed"}
    relay = ResponsesRelay()
    relay.feed(_native({"type": "response.output_item.done", "sequence_number": 0,
                        "output_index": 0, "item": search},
                       {"type": "response.output_item.done", "sequence_number": 1,
                        "output_index": 2, "item": {"type": "message", "id": "m"}},
                       {"type": "response.completed", "sequence_number": 2,
                        "response": {"output": [search, nameless, {"type": "message"}]}}))
    # the one in both places once; one with an unusable id by its place in the output
    assert relay.metered_items() == [("web_search_calls", "ws_1"),
                                     ("web_search_calls", "output-1")]
    assert metered_items({"output": [search, search]}) == [("web_search_calls", "ws_1")] * 2
    assert metered_items({"choices": []}) == [] and metered_items(None) == []


def test_a_native_error_event_is_held_back() -> None:
    relay = ResponsesRelay()
    out = relay.feed(_native({"type": "error", "sequence_number": 5, "code": "server_error",
                              "message": "secret upstream words"}))
    assert out == b"" and not relay.done
    # what the log gets: its type and code, never its words (they may quote the prompt)
    assert relay.upstream_error == "error: type=error code=server_error"


def test_responses_usage_and_texts_are_read() -> None:
    doc = {"output": [
        {"type": "message", "content": [{"type": "output_text", "text": "abc"},
                                        {"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "name": "f", "arguments": "{}"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hmm"}]}],
        "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                  "input_tokens_details": {"cached_tokens": 9},
                  "output_tokens_details": {"reasoning_tokens": 1}}}
    assert texts_of_choices(doc) == ["abc", "no", "f", "{}", "hmm"]
    reading = read_usage(doc)
    assert reading.usage is not None and reading.usage.cached_input_tokens == 5  # capped
    assert reading.note is not None and "cached_tokens 9 above" in reading.note
    assert reading.usage.reasoning_tokens == 1


def test_background_responses_are_refused_on_every_upstream() -> None:
    config = Config(upstreams=(UpstreamConfig("oa", "http://x", api="responses"),),
                    models=(ModelConfig("a", "oa", "a"),))
    assert responses_call(config, {"model": "a", "input": "hi"}, b"{}")[0] == "responses"
    for model in ("a", "b"):
        with pytest.raises(InvalidRequestError, match="background") as bad:
            responses_call(config, {"model": model, "input": "hi", "background": True}, b"{}")
        assert bad.value.param == "background"


def test_a_model_is_native_when_its_upstreams_speak_responses() -> None:
    config = Config(
        upstreams=(UpstreamConfig("oa", "http://x", api="responses"),
                   UpstreamConfig("gpu", "http://y")),
        models=(ModelConfig("a", "oa", "a"), ModelConfig("b", "oa", "b"),
                ModelConfig("c", "gpu", "c")),
        aliases=(AliasConfig("both-native", ("a", "b")), AliasConfig("mixed", ("a", "c"))))
    assert speaks_responses(config, "a") and speaks_responses(config, "both-native")
    assert not speaks_responses(config, "c") and not speaks_responses(config, "mixed")
    assert not speaks_responses(config, "unknown") and not speaks_responses(config, None)


# -- any JSON in: a chat body or a clear 400; any chat chunk: events, never an exception ----

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                    st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=16)
KINDS = st.sampled_from(["message", "function_call", "function_call_output", "reasoning",
                         "input_text", "input_image", "output_text", "refusal", "function"])
ITEM = st.fixed_dictionaries({}, optional={
    "type": KINDS, "role": st.sampled_from(["user", "assistant", "system", "tool"]),
    "content": st.one_of(JSON, st.lists(st.fixed_dictionaries({}, optional={
        "type": KINDS, "text": JSON, "image_url": JSON, "refusal": JSON}), max_size=3)),
    "call_id": JSON, "name": JSON, "arguments": JSON, "output": JSON})


@settings(max_examples=300, deadline=None)
@given(body=st.fixed_dictionaries({"model": JSON}, optional={
    "input": st.one_of(JSON, st.lists(ITEM, max_size=4)), "instructions": JSON,
    "tools": st.one_of(JSON, st.lists(st.fixed_dictionaries({"type": KINDS}, optional={
        "name": JSON, "parameters": JSON}), max_size=2)),
    "tool_choice": JSON, "reasoning": JSON, "text": JSON, "stream": JSON,
    "max_output_tokens": JSON, "previous_response_id": JSON}))
def test_responses_bodies_translate_or_are_a_clear_error(body: dict[str, Any]) -> None:
    try:
        chat = to_chat(body)
    except DomainError as exc:
        assert 400 <= exc.status < 500
        return
    assert isinstance(chat["messages"], list) and isinstance(chat["model"], str)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.one_of(JSON, st.fixed_dictionaries({"choices": st.lists(
    st.fixed_dictionaries({}, optional={"delta": JSON, "finish_reason": JSON}), max_size=2)})),
    max_size=5))
def test_any_chat_stream_becomes_events_ending_in_a_response(chunks: list[Any]) -> None:
    stream = ResponsesStream({"model": "m", "input": "hi"})
    data = b"".join(stream.feed(b"data: " + json.dumps(c).encode() + b"\n\n") for c in chunks)
    events = _events(data + stream.end(_record(stream=True)))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    Response.model_validate(events[-1]["response"])
