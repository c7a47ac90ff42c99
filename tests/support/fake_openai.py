"""Deterministic OpenAI-compatible replies of the fake upstream (pure functions, no I/O)."""

from __future__ import annotations

import base64
import http
import itertools
import struct
import time
from typing import Any

import orjson

__all__ = [
    "DEFAULT_WORDS",
    "MAX_WORDS",
    "WORDS",
    "Reply",
    "completion_text",
    "completion_tokens",
    "completion_words",
    "count_words",
    "error_body",
    "fake_options",
    "http_head",
    "json_reply",
    "prompt_tokens",
    "route",
]

# Each word is exactly one token in both cl100k_base and o200k_base, so a tokenizer-based estimate
# of a reply of N words is exactly N tokens.
WORDS = (
    " the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    " hello",
    " world",
    " alpha",
    " beta",
    " red",
    " blue",
    " green",
    " one",
)
DEFAULT_WORDS = 16
MAX_WORDS = 4096
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "requests",
}
_ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}
_ids = itertools.count(1)
_request_ids = itertools.count(1)


def completion_words(n: int) -> list[str]:
    """The n content deltas of a reply: word i is WORDS[i % 16]."""
    return [WORDS[i % len(WORDS)] for i in range(n)]


def completion_text(n: int) -> str:
    """The full reply text of n words, e.g. ' the quick brown'."""
    return "".join(completion_words(n))


def count_words(value: Any) -> int:
    """Whitespace words of a string; ids in a token list; summed over lists and text parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return count_words(value.get("text"))
    return 0


def prompt_tokens(path: str, body: dict[str, Any]) -> int:
    """Reported prompt_tokens: chat = words of all message contents + 3 per message."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages") or []
        return sum(count_words(m.get("content")) + 3 for m in messages if isinstance(m, dict))
    if path.endswith("/embeddings"):
        return count_words(body.get("input"))
    return count_words(body.get("prompt"))


def fake_options(body: Any) -> dict[str, Any]:
    """The request's `fake` behaviour-control object ({} if absent or not an object)."""
    fake = body.get("fake") if isinstance(body, dict) else None
    return fake if isinstance(fake, dict) else {}


def _word_count(body: dict[str, Any], fake: dict[str, Any]) -> int:
    n = fake.get("words")
    if n is None:
        n = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_WORDS
    return max(0, min(int(n), MAX_WORDS))


def completion_tokens(body: dict[str, Any]) -> int:
    """Reported completion_tokens: visible words + fake.reasoning_tokens."""
    fake = fake_options(body)
    return _word_count(body, fake) + int(fake.get("reasoning_tokens") or 0)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_body(status: int, message: str | None = None) -> bytes:
    """OpenAI error envelope {"error": {message, type, param, code}} as JSON bytes."""
    err = {
        "message": message or f"fake upstream error {status}",
        "type": _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        ),
        "param": None,
        "code": _ERROR_CODES.get(status),
    }
    return orjson.dumps({"error": err})


def http_head(status: int, ctype: str, length: int | None, close: bool, extra: str = "") -> bytes:
    """HTTP/1.1 status line + headers; length None means a chunked body."""
    size = (
        f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n"
    )
    conn = "connection: close\r\n" if close else ""
    # the provider's own request id, as OpenAI sends it on every answer
    rid = f"x-request-id: req_fake{next(_request_ids)}\r\n"
    return (
        f"HTTP/1.1 {status} {_phrase(status)}\r\ncontent-type: {ctype}\r\n{size}{conn}{rid}"
        f"{extra}\r\n"
    ).encode("latin-1")


def _sse(obj: Any) -> bytes:
    payload = b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class Reply:
    """A planned response: head + body parts, plus timing/failure behaviour."""

    __slots__ = ("head", "parts", "close", "delay", "chunk_delay", "hang")

    def __init__(self, head: bytes, parts: list[bytes], close: bool, fake: dict[str, Any]) -> None:
        self.head, self.parts, self.close = head, parts, close
        self.delay = float(fake.get("delay_ms") or 0) / 1000
        self.chunk_delay = float(fake.get("chunk_delay_ms") or 0) / 1000
        self.hang = bool(fake.get("hang"))


def json_reply(
    status: int, body: bytes, close: bool, fake: dict[str, Any], extra: str = ""
) -> Reply:
    """A Content-Length JSON reply."""
    return Reply(
        http_head(status, "application/json", len(body), close, extra), [body], close, fake
    )


def _usage(
    body: dict[str, Any], fake: dict[str, Any], path: str, completion: bool
) -> Any:
    if "usage_override" in fake:  # a misbehaving upstream: this usage, verbatim
        return fake["usage_override"]
    p = prompt_tokens(path, body)
    usage: dict[str, Any] = {"prompt_tokens": p}
    if completion:
        c = completion_tokens(body)
        usage.update(completion_tokens=c, total_tokens=p + c)
    else:
        usage["total_tokens"] = p
    if fake.get("cached_tokens") is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": int(fake["cached_tokens"])}
    if fake.get("reasoning_tokens") is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": int(fake["reasoning_tokens"])}
    return usage


def _completion_reply(path: str, body: dict[str, Any], fake: dict[str, Any], close: bool) -> Reply:
    chat = path.endswith("/chat/completions")
    words = completion_words(_word_count(body, fake))
    with_usage = fake.get("usage", True) is not False
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{next(_ids)}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or "fake-model",
        "system_fingerprint": "fp_fake",
    }
    tool = fake.get("tool_call") if chat else None  # {"name", "arguments"}: a tool call too
    answered = any(isinstance(m, dict) and m.get("role") == "tool"
                   for m in body.get("messages") or [])
    if chat and not answered and fake.get("tool_call_first"):  # a call until its result is in
        tool = fake["tool_call_first"]
    finish = "tool_calls" if tool else "stop"
    if not body.get("stream"):
        if chat:
            message = {"role": "assistant", "content": "".join(words), "refusal": None}
            if tool:
                message["tool_calls"] = [{"id": "call_fake1", "type": "function",
                                          "function": dict(tool)}]
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": "".join(words)}
        choice.update(logprobs=None, finish_reason=finish)
        obj = {**base, "choices": [choice]}
        if with_usage:
            obj["usage"] = _usage(body, fake, path, True)
        return json_reply(200, orjson.dumps(obj), close, fake)
    if chat:
        base["object"] = "chat.completion.chunk"
    opts = body.get("stream_options")
    include_usage = with_usage and isinstance(opts, dict) and bool(opts.get("include_usage"))
    if include_usage:
        base["usage"] = None

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                d["content"] = delta
            c: dict[str, Any] = {"index": 0, "delta": d}
        else:
            c = {"index": 0, "text": delta or ""}
        c.update(logprobs=None, finish_reason=finish)
        return _sse({**base, "choices": [c]})

    def tool_chunk(delta: dict[str, Any]) -> bytes:
        c = {"index": 0, "delta": {"tool_calls": [{"index": 0, **delta}]},
             "logprobs": None, "finish_reason": None}
        return _sse({**base, "choices": [c]})

    prefix = [chunk(None, None, role=True)] if chat else []
    parts = prefix + [chunk(w, None) for w in words]
    if tool:  # the arguments arrive in two pieces, as OpenAI streams them
        args = str(tool.get("arguments") or "")
        half = len(args) // 2
        parts.append(tool_chunk({"id": "call_fake1", "type": "function",
                                 "function": {"name": tool.get("name"), "arguments": args[:half]}}))
        parts.append(tool_chunk({"function": {"arguments": args[half:]}}))
    fail = fake.get("fail_after_chunks")
    if fail is not None:
        parts = parts[: len(prefix) + max(0, int(fail))]
        if isinstance(fake.get("error_event"), str):  # an error event, then the end
            parts.append(_sse({"error": {"message": fake["error_event"], "type": "server_error",
                                         "param": None, "code": None}}))
    else:
        parts.append(chunk(None, finish))
        if include_usage:
            parts.append(_sse({**base, "choices": [], "usage": _usage(body, fake, path, True)}))
        parts += [_sse(b"[DONE]"), b"0\r\n\r\n"]
    head = http_head(200, "text/event-stream", None, close, "cache-control: no-cache\r\n")
    return Reply(head, parts, close or fail is not None, fake)


def _embedding_reply(body: dict[str, Any], fake: dict[str, Any], close: bool) -> Reply:
    raw = body.get("input")
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
    ):
        items: list[Any] = [raw]
    else:
        items = list(raw) if isinstance(raw, list) else [raw]
    data = []
    for i, item in enumerate(items):
        w = count_words(item)
        vec = [round(((i + 1) * (j + 1) + w) % 10 / 10, 1) for j in range(8)]
        emb: Any = vec
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack("<8f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    obj: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": body.get("model") or "fake-model",
    }
    if fake.get("usage", True) is not False:
        obj["usage"] = _usage(body, fake, "/v1/embeddings", False)
    return json_reply(200, orjson.dumps(obj), close, fake)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fake-upstream"}


_POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def route(method: str, path: str, body: Any, close: bool) -> Reply:
    """Build the reply for one request (pure; no I/O)."""
    if method == "GET" and path in ("/v1/models", "/health"):
        obj: Any = (
            {"status": "ok"}
            if path == "/health"
            else {"object": "list", "data": [_model("fake-model"), _model("fake-embedding")]}
        )
        return json_reply(200, orjson.dumps(obj), close, {})
    if method == "GET" and path.startswith("/v1/models/"):
        return json_reply(200, orjson.dumps(_model(path[len("/v1/models/") :])), close, {})
    if path not in _POST_ROUTES:
        return json_reply(404, error_body(404, f"Unknown route {method} {path}"), close, {})
    if method != "POST":
        return json_reply(405, error_body(405, f"Method {method} not allowed"), close, {})
    if not isinstance(body, dict):
        return json_reply(400, error_body(400, "Request body must be a JSON object"), close, {})
    fake = fake_options(body)
    status = int(fake.get("status") or 200)
    if status != 200:
        extra = "retry-after: 1\r\n" if status == 429 else ""
        return json_reply(status, error_body(status, fake.get("message")), close, fake, extra)
    if isinstance(fake.get("body_text"), str):  # a 200 whose body is not what was asked for
        text = fake["body_text"].encode()
        ctype = str(fake.get("content_type") or "text/html")
        return Reply(http_head(200, ctype, len(text), close), [text], close, fake)
    if path == "/v1/embeddings":
        return _embedding_reply(body, fake, close)
    if path == "/v1/responses":
        from tests.support.fake_responses import responses_reply  # (it builds on this module)

        return responses_reply(body, fake, close)
    return _completion_reply(path, body, fake, close)
