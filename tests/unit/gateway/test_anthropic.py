"""Translating Anthropic's Messages requests to chat calls and chat streams back (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from core.errors import InvalidRequestError
from gateway.anthropic import MessagesStream, to_chat
from metering.records import CallRecord


def _messages(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}], **extra}


def test_blocks_become_chat_parts_and_tool_messages() -> None:
    chat = to_chat(_messages(system=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                             messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": "QUJD"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1",
             "content": [{"type": "text", "text": "42"}]},
            {"type": "text", "text": "and?"}]}]))
    assert chat["messages"] == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {"role": "user", "content": "and?"}]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})])
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    assert to_chat(_messages(tool_choice=choice))["tool_choice"] == expected


@pytest.mark.parametrize(("body", "field"), [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"model": 3}, "model"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"), ({"tools": [{}]}, "tools"),
    ({"output_config": {"effort": "extreme"}}, "output_config"),
    ({"stop_sequences": "x"}, "stop_sequences"), ({"metadata": []}, "metadata"),
    ({"output_config": {"effort": []}}, "output_config"),
    ({"metadata": {"user_id": ["a"]}}, "metadata")])
def test_bad_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        to_chat({**_messages(), **body})
    assert err.value.param == field


def _record(**usage: int) -> CallRecord:
    values = {"input_tokens": 9, "cached_input_tokens": 4, "output_tokens": 6,
              "reasoning_tokens": 0, **usage}
    return CallRecord(app_id=1, end_user_id=1, request_id="r", idempotency_key="k",
                      endpoint="messages", requested_model="m", upstream="u",
                      upstream_model="m", stream=True, usage_source="reported",
                      cost_pico_usd=None, priced=False, status="ok", http_status=200,
                      error=None, latency_ms=1, ttft_ms=1, created_at=datetime.now(UTC),
                      **values)


def _events(data: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in data.strip().split(b"\n\n"):
        name, payload = block.split(b"\n")
        out.append((name.removeprefix(b"event: ").decode(),
                    orjson.loads(payload.removeprefix(b"data: "))))
    return out


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    doc = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def test_a_chat_stream_becomes_blocks_in_order_with_the_ledgers_usage() -> None:
    stream = MessagesStream("m")
    # an event split across two reads is translated once whole
    first = _chunk({"role": "assistant", "content": "Hel"})
    out = stream.feed(first[:10]) + stream.feed(first[10:] + _chunk({"content": "lo"}))
    out += stream.feed(_chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {
        "name": "f", "arguments": '{"a"'}}]}))
    out += stream.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                              "tool_calls"))
    out += stream.end(_record(reasoning_tokens=2))
    events = _events(out)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert [e["index"] for n, e in events if n.startswith("content_block")] == [0] * 4 + [1] * 4
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f",
                                             "input": {}}
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 5, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 4, "output_tokens": 6,
                              "output_tokens_details": {"thinking_tokens": 2}}


def test_tool_calls_without_an_index_open_a_block_each() -> None:
    stream = MessagesStream("m")
    out = stream.feed(_chunk({"tool_calls": [{"id": "a", "function": {"name": "f",
                                                                      "arguments": '{"x":'}}]}))
    out += stream.feed(_chunk({"tool_calls": [{"function": {"arguments": "1}"}}]}))
    out += stream.feed(_chunk({"tool_calls": [{"id": "b", "function": {"name": "g",
                                                                      "arguments": "{}"}}]}))
    out += stream.end(_record())
    starts = [e["content_block"] for n, e in _events(out) if n == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("a", "f"), ("b", "g")]
    deltas = [(e["index"], e["delta"]["partial_json"]) for n, e in _events(out)
              if n == "content_block_delta"]
    assert deltas == [(0, '{"x":'), (0, "1}"), (1, "{}")]
