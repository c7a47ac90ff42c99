"""Anthropic's Messages API on top of an OpenAI chat call.

An app built on the Anthropic SDK posts to /v1/messages. The gateway translates the request
into the chat completion it meters, limits and forwards like any other (to a cloud model, or to
vLLM / Ollama / llama.cpp), and translates the answer back: a Message, or the Messages stream
(message_start, content blocks, message_delta with the usage, message_stop).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from core.errors import InvalidRequestError
from metering.records import CallRecord

MESSAGES_ENDPOINT = "messages"  # the ledger's name for calls that came in this way
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
# Anthropic's effort levels as OpenAI's reasoning_effort.
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# Anthropic's error type for each status the gateway answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Anthropic's error envelope; extra fields (the limit, the paywall offer) ride along."""
    error: dict[str, Any] = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    error.update(extra)
    return {"type": "error", "error": error}


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request for a Messages request; bad input raises a 400 naming the
    field (Anthropic's own rules: max_tokens required, roles user/assistant only)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model: Field required", param="model")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequestError("max_tokens: a positive integer is required",
                                  param="max_tokens")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequestError("messages: a non-empty list is required", param="messages")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(raw_messages):
        messages.extend(_chat_messages(message, f"messages.{i}"))
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if body.get("stream") is True:
        chat["stream"] = True
    for name in ("temperature", "top_p"):  # (top_k is not OpenAI's: a cloud upstream refuses it)
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidRequestError("stop_sequences: a list of strings is required",
                                      param="stop_sequences")
        chat["stop"] = stops
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequestError("metadata: an object is required", param="metadata")
        user_id = metadata.get("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                raise InvalidRequestError("metadata.user_id: a string is required",
                                          param="metadata")
            chat["user"] = user_id  # the end user, unless the key or a header names one
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _chat_tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _chat_tool_choice(choice)
    output = body.get("output_config")
    if output is not None and not isinstance(output, dict):
        raise InvalidRequestError("output_config: an object is required", param="output_config")
    output = output or {}
    effort = output.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in _EFFORTS:
            raise InvalidRequestError(f"output_config.effort: one of {', '.join(_EFFORTS)}",
                                      param="output_config")
        chat["reasoning_effort"] = _EFFORTS[effort]
    else:
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            chat["reasoning_effort"] = "high"
    fmt = output.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.get("schema") or {}, "strict": True}}
    return chat


def _text_of(value: Any, where: str) -> str:
    """A string, or the joined text of a list of text blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" \
                    or not isinstance(block.get("text"), str):
                raise InvalidRequestError(f"{where}.{j}: a text block is required", param=where)
            parts.append(block["text"])
        return "\n".join(parts)
    raise InvalidRequestError(f"{where}: a string or a list of text blocks is required",
                              param=where)


def _chat_messages(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where}: an object is required", param="messages")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequestError(f"{where}.role: must be 'user' or 'assistant'",
                                  param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content: a string or a list of blocks is required",
                                  param="messages")
    out: list[dict[str, Any]] = []  # tool results become tool messages, ahead of the rest
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_use" and role == "assistant":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise InvalidRequestError(f"{at}: tool_use needs an id and a name",
                                          param="messages")
            calls.append({"id": call_id, "type": "function", "function": {
                "name": name, "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise InvalidRequestError(f"{at}: tool_result needs a tool_use_id",
                                          param="messages")
            result = block.get("content", "")
            text = result if isinstance(result, str) else _text_of(
                [b for b in result if isinstance(b, dict) and b.get("type") == "text"]
                if isinstance(result, list) else result, f"{at}.content")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # a model's earlier reasoning is not sent back to a chat model
        else:
            raise InvalidRequestError(f"{at}: unsupported content block {kind!r} for {role}",
                                      param="messages")
    if parts or calls:
        chat: dict[str, Any] = {"role": role}
        if all(p["type"] == "text" for p in parts):
            chat["content"] = "".join(p["text"] for p in parts) if parts else None
        else:
            chat["content"] = parts
        if calls:
            chat["tool_calls"] = calls
        out.append(chat)
    return out


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise InvalidRequestError(f"{where}.source: a base64 or url image source is required",
                              param="messages")


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools: a list is required", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequestError(f"tools.{i}: a tool needs a name", param="tools")
        fn: dict[str, Any] = {"name": tool["name"],
                              "parameters": tool.get("input_schema") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError("tool_choice: type must be auto, any, tool (with a name) or none",
                              param="tool_choice")


def usage_of(record: CallRecord) -> dict[str, Any]:
    """The ledger's usage as Anthropic reports it (input excludes the cached part)."""
    usage: dict[str, Any] = {
        "input_tokens": max(0, record.input_tokens - record.cached_input_tokens),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": record.cached_input_tokens,
        "output_tokens": record.output_tokens,
    }
    if record.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": record.reasoning_tokens}
    return usage


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def message_from_chat(doc: Any, model: str, record: CallRecord) -> dict[str, Any]:
    """A Message for a chat completion response."""
    choice = _first_choice(doc)
    message = _dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            content.append({"type": "tool_use", "id": str(call.get("id") or _tool_id()),
                            "name": fn.get("name") or "", "input": _json_object(
                                fn.get("arguments"))})
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason(choice.get("finish_reason")),
            "stop_sequence": None, "usage": usage_of(record)}


def stop_reason(finish: Any) -> str:
    return _STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def _first_choice(doc: Any) -> dict[str, Any]:
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json_object(arguments: Any) -> Any:
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw": arguments}  # a model that wrote broken JSON: keep what it said
    return value


def _tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessagesStream:
    """Turns the chat stream's events (as the relay forwards them) into the Messages stream.

    Text deltas go to a text block; each tool call to its own tool_use block, its arguments as
    input_json_delta. Blocks are numbered in the order they open, and one closes before the
    next opens, as Anthropic's stream does."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_message_id()
        self.started = False
        self.finish: Any = None
        self._index = -1
        self._open: tuple[str, Any] | None = None  # ("text", None) or ("tool", index or id)
        self._buffer = b""

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sse("message_start", {"type": "message_start", "message": message})

    def feed(self, data: bytes) -> bytes:
        """Messages events for whole chat events the relay forwarded."""
        self._buffer += data
        *events, self._buffer = self._buffer.split(b"\n\n")
        out = [self.start()]
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(self._chunk(_loads(line[5:].strip())))
        return b"".join(out)

    def _chunk(self, doc: Any) -> bytes:
        choice = _first_choice(doc)
        delta = _dict(choice.get("delta"))
        out: list[bytes] = []
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._open_block(("text", None), {"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            # A call is named by its index; a server that sends none names each by its id
            # (a chunk without either continues the open call).
            n: Any = call.get("index") if isinstance(call.get("index"), int) else call.get("id")
            if n is None:
                n = self._open[1] if self._open and self._open[0] == "tool" else 0
            fn = _dict(call.get("function"))
            out.append(self._open_block(("tool", n), {
                "type": "tool_use", "id": str(call.get("id") or _tool_id()),
                "name": fn.get("name") or "", "input": {}}))
            arguments = fn.get("arguments")
            if isinstance(arguments, str) and arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
        return b"".join(out)

    def _open_block(self, key: tuple[str, Any], block: dict[str, Any]) -> bytes:
        if self._open == key:
            return b""
        out = self._close_block()
        self._index += 1
        self._open = key
        return out + sse("content_block_start", {"type": "content_block_start",
                                                 "index": self._index, "content_block": block})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                           "delta": delta})

    def end(self, record: CallRecord) -> bytes:
        """The close of a stream that ended well, with the usage the ledger recorded."""
        return b"".join([
            self.start(), self._close_block(),
            sse("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": stop_reason(self.finish),
                                            "stop_sequence": None},
                                  "usage": usage_of(record)}),
            sse("message_stop", {"type": "message_stop"})])

    def error(self, status: int, message: str) -> bytes:
        """An error event, as Anthropic sends one mid-stream."""
        return self.start() + sse("error", error_body(status, message))


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
