"""The SSE relay forwards whole events at once and drops only the usage chunk it added."""

import orjson

from gateway.streaming import DONE_EVENT, StreamRelay


def event(doc: object) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


CONTENT = event({"choices": [{"index": 0, "delta": {"content": "Hello"}}], "usage": None})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                         "total_tokens": 10,
                                         "prompt_tokens_details": {"cached_tokens": 2}}})
DONE = DONE_EVENT


def test_usage_chunk_is_hidden_unless_client_asked() -> None:
    relay = StreamRelay(client_wants_usage=False)
    out = relay.feed(CONTENT + USAGE + DONE)
    assert out == CONTENT  # [DONE] is held back until the call is settled
    assert relay.usage is not None and relay.usage.input_tokens == 7
    assert relay.usage.cached_input_tokens == 2 and relay.done


def test_usage_chunk_is_shown_when_client_asked() -> None:
    relay = StreamRelay(client_wants_usage=True)
    assert relay.feed(CONTENT + USAGE + DONE) == CONTENT + USAGE and relay.done


def test_partial_event_waits_for_its_end_and_nothing_else_waits() -> None:
    relay = StreamRelay(client_wants_usage=False)
    first, second = CONTENT[:10], CONTENT[10:]
    assert relay.feed(first) == b""
    assert relay.feed(second + DONE[:4]) == CONTENT
    assert relay.feed(DONE[4:]) == b"" and relay.done


def test_crlf_framing_is_understood() -> None:
    relay = StreamRelay(client_wants_usage=False)
    out = relay.feed(CONTENT.replace(b"\n", b"\r\n"))
    assert out == CONTENT


def test_texts_collects_content_and_tool_call_arguments() -> None:
    relay = StreamRelay(client_wants_usage=False)
    tool = event({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "get_weather", "arguments": '{"city":'}}]}}]})
    relay.feed(CONTENT + tool)
    assert relay.texts() == ["Hello", "get_weather", '{"city":']
    assert relay.usage is None and not relay.done


def test_unterminated_tail_is_flushed() -> None:
    relay = StreamRelay(client_wants_usage=False)
    relay.feed(CONTENT[:-2])
    assert relay.flush() == CONTENT
