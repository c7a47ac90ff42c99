"""The fake upstream's OpenAI Responses API (POST /v1/responses): a Response, or its event
stream ending with response.completed and its usage (pure functions, no I/O).

`fake.web_searches = N` puts N web_search_call items (the built-in web search tool, each with
its own id) before the message, as OpenAI's output does; a stream adds each with its
output_item.added, web_search_call progress events and output_item.done."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson

from tests.support import fake_openai as fo

_ids = itertools.count(1)


def input_tokens(body: dict[str, Any]) -> int:
    """Reported input_tokens: words of the instructions and of every input item's content or
    output, plus 3 per item (a string input is one item)."""
    items = body.get("input")
    items = [{"content": items}] if isinstance(items, str) else items or []
    total = fo.count_words(body.get("instructions"))
    for item in items:
        if isinstance(item, dict):
            total += 3 + fo.count_words(item.get("content")) + fo.count_words(item.get("output"))
    return total


def _usage(body: dict[str, Any], fake: dict[str, Any], words: int) -> dict[str, Any]:
    inp, reasoning = input_tokens(body), int(fake.get("reasoning_tokens") or 0)
    out = words + reasoning
    return {"input_tokens": inp,
            "input_tokens_details": {"cached_tokens": int(fake.get("cached_tokens") or 0)},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out}


def _event(doc: dict[str, Any]) -> bytes:
    payload = b"event: " + doc["type"].encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def responses_reply(body: dict[str, Any], fake: dict[str, Any], close: bool) -> fo.Reply:
    n = fake.get("words")
    if n is None:
        n = body.get("max_output_tokens") or fo.DEFAULT_WORDS
    words = fo.completion_words(max(0, min(int(n), fo.MAX_WORDS)))
    serial = next(_ids)
    message = {"id": f"msg_fake{serial}", "type": "message", "role": "assistant",
               "status": "completed", "content": [{"type": "output_text", "annotations": [],
                                                    "text": "".join(words)}]}
    searches = [{"id": f"ws_fake{serial}_{n}", "type": "web_search_call", "status": "completed",
                 "action": {"type": "search", "query": f"query {n}"}}
                for n in range(int(fake.get("web_searches") or 0))]
    response: dict[str, Any] = {
        "id": f"resp_fake{serial}", "object": "response", "created_at": int(time.time()),
        "status": "completed", "error": None, "incomplete_details": None,
        "model": body.get("model") or "fake-model", "output": [*searches, message],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "previous_response_id": body.get("previous_response_id"),
        "usage": _usage(body, fake, len(words))}
    if not body.get("stream"):
        return fo.json_reply(200, orjson.dumps(response), close, fake)
    seq = itertools.count()
    opening = {**response, "status": "in_progress", "output": [], "usage": None}
    item = {**message, "status": "in_progress", "content": []}
    part = {"type": "output_text", "annotations": [], "text": ""}
    at = {"item_id": message["id"], "output_index": len(searches)}
    parts = [_event({"type": t, "sequence_number": next(seq), "response": opening})
             for t in ("response.created", "response.in_progress")]
    for i, search in enumerate(searches):
        parts += [_event({"type": "response.output_item.added", "sequence_number": next(seq),
                          "output_index": i, "item": {**search, "status": "in_progress"}})]
        parts += [_event({"type": f"response.web_search_call.{step}", "output_index": i,
                          "item_id": search["id"], "sequence_number": next(seq)})
                  for step in ("in_progress", "searching", "completed")]
        parts += [_event({"type": "response.output_item.done", "sequence_number": next(seq),
                          "output_index": i, "item": search})]
    opened = len(parts)
    parts += [_event({"type": "response.output_item.added", "sequence_number": next(seq),
                      "output_index": len(searches), "item": item}),
              _event({"type": "response.content_part.added", "sequence_number": next(seq),
                      **at, "content_index": 0, "part": part})]
    parts += [_event({"type": "response.output_text.delta", "sequence_number": next(seq), **at,
                      "content_index": 0, "delta": w, "logprobs": []}) for w in words]
    fail = fake.get("fail_after_chunks")
    if fail is not None:
        parts = parts[: opened + 2 + max(0, int(fail))]
        if isinstance(fake.get("error_event"), str):
            parts.append(_event({"type": "error", "sequence_number": next(seq),
                                 "code": "server_error", "message": fake["error_event"],
                                 "param": None}))
    else:
        text = message["content"][0]
        parts += [
            _event({"type": "response.output_text.done", "sequence_number": next(seq), **at,
                    "content_index": 0, "text": text["text"], "logprobs": []}),
            _event({"type": "response.content_part.done", "sequence_number": next(seq), **at,
                    "content_index": 0, "part": text}),
            _event({"type": "response.output_item.done", "sequence_number": next(seq),
                    "output_index": len(searches), "item": message}),
            _event({"type": "response.completed", "sequence_number": next(seq),
                    "response": response}),
            b"0\r\n\r\n"]
    head = fo.http_head(200, "text/event-stream", None, close, "cache-control: no-cache\r\n")
    return fo.Reply(head, parts, close or fail is not None, fake)
