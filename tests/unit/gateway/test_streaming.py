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


TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again, until it is tired. " * 6,
    "Grüße aus Köln: Fußgängerübergänge sind schön. Ünïcödé, naïve café, jalapeño. " * 6,
    "模型调用按用户计量。トークンを数える。토큰을 센다。 😀🚀🎉 emoji 👩‍👩‍👧 too. " * 6,
]


def _stream(texts: list[str], *, surrogate_split: bool = False) -> bytes:
    """Every choice's text one character per chunk, the choices interleaved; with
    `surrogate_split`, characters outside the BMP sent as two lone UTF-16 halves."""
    out = []
    for pos in range(max(len(t) for t in texts)):
        for index, text in enumerate(texts):
            if pos >= len(text):
                continue
            ch = text[pos]
            if surrogate_split and ord(ch) > 0xFFFF:
                code = ord(ch) - 0x10000
                for half in (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)):
                    out.append(('data: {"choices": [{"index": ' + str(index)
                                + ', "delta": {"content": "\\u' + f"{half:04x}"
                                + '"}}]}\n\n').encode())
                continue
            out.append(event({"choices": [{"index": index, "delta": {"content": ch}}]}))
    return b"".join(out) + DONE


def _counted(stream: bytes, piece: int) -> tuple[StreamRelay, int]:
    from metering.tokens import TokenizerRegistry, count_text

    tok = TokenizerRegistry.load().for_model("gpt-4o-mini")
    relay = StreamRelay(client_wants_usage=False)
    for at in range(0, len(stream), piece):  # upstream bytes cut anywhere, mid-character too
        relay.feed(stream[at:at + piece])
    return relay, sum(count_text(tok, t) for t in relay.texts())


def test_a_stream_of_one_character_chunks_counts_as_its_whole_texts() -> None:
    from metering.tokens import TokenizerRegistry, count_text

    tok = TokenizerRegistry.load().for_model("gpt-4o-mini")
    whole = sum(count_text(tok, t) for t in TEXTS)
    for surrogate_split in (False, True):
        relay, counted = _counted(_stream(TEXTS, surrogate_split=surrogate_split), piece=7)
        assert relay.done
        assert sorted(relay.texts()) == sorted(TEXTS)
        assert abs(counted - whole) <= 0.02 * whole, (counted, whole)


def test_sixteen_one_word_chunks_count_as_the_sentence() -> None:
    from metering.tokens import TokenizerRegistry, count_text

    tok = TokenizerRegistry.load().for_model("gpt-4o-mini")
    words = ["word "] * 16
    stream = b"".join(event({"choices": [{"index": 0, "delta": {"content": w}}]})
                      for w in words) + DONE
    relay, counted = _counted(stream, piece=len(stream))
    assert counted == count_text(tok, "".join(words))  # on main: one count per chunk, 32


def test_an_error_null_on_a_usage_chunk_is_no_error() -> None:
    relay = StreamRelay(client_wants_usage=False)
    chunk = event({"choices": [], "error": None, "usage": {
        "prompt_tokens": 7, "completion_tokens": 777, "total_tokens": 784}})
    relay.feed(CONTENT + chunk + DONE)
    assert relay.upstream_error is None and relay.done
    assert relay.usage is not None and relay.usage.output_tokens == 777


def test_an_error_riding_on_a_choice_is_held_back_and_its_text_still_counts() -> None:
    relay = StreamRelay(client_wants_usage=False)
    chunk = event({"error": {"message": "key sk-proj-secret12345 revoked at http://10.0.0.5"},
                   "choices": [{"index": 0, "delta": {"content": " world"},
                                "finish_reason": "error"}]})
    out = relay.feed(CONTENT + chunk)
    assert out == CONTENT and b"sk-proj" not in out
    assert relay.upstream_error is not None and relay.texts() == ["Hello world"]
