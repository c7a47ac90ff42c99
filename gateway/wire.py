"""Wire formats at the gateway's two edges: the client's (OpenAI's, relayed as it is, or
Anthropic's Messages, translated back) and what is read from a request body or an upstream's
answer before it is trusted."""

from __future__ import annotations

import json
from typing import Any

import orjson

from core.config import Config, ModelConfig
from core.errors import InvalidRequestError
from gateway import anthropic, responses
from gateway.responses_stream import ResponsesRelay, ResponsesStream, error_event
from gateway.streaming import DONE_EVENT, StreamRelay, sse_error
from gateway.upstream_http import Response
from metering.records import CallRecord
from metering.service import ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_RESPONSES

MAX_CHOICES = 128
MAX_OUTPUT_CAP = 10**9  # tokens per call (DESIGN.md §9)


class Wire:
    """The client's side of a call: OpenAI's wire format, relayed as it is."""

    api: str | None = None  # the ledger's endpoint name when it differs from the call's

    def __init__(self, body: dict[str, Any] | None = None) -> None:
        options = (body or {}).get("stream_options")
        self.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True

    def relay(self) -> StreamRelay:
        return StreamRelay(client_wants_usage=self.client_wants_usage)

    def response(self, data: bytes, doc: Any, record: CallRecord) -> bytes:
        return data  # forwarded byte for byte

    def part(self, events: bytes) -> bytes:
        return events

    def end(self, record: CallRecord) -> bytes:
        return DONE_EVENT

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return sse_error(message, type_=type_, code=code)


class MessagesWire(Wire):
    """Anthropic's Messages API: the chat answer translated back, as a Message or its stream."""

    api = anthropic.MESSAGES_ENDPOINT

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.stream = anthropic.MessagesStream(model)

    def response(self, data: bytes, doc: Any, record: CallRecord) -> bytes:
        return orjson.dumps(anthropic.message_from_chat(doc, self.model, record))

    def part(self, events: bytes) -> bytes:
        return self.stream.feed(events)

    def end(self, record: CallRecord) -> bytes:
        return self.stream.end(record)

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return self.stream.error(status, message)


class ResponsesWire(Wire):
    """OpenAI's Responses API served by a chat call: the answer translated back, as a
    Response or its event stream."""

    api = responses.RESPONSES_ENDPOINT

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self.request = request
        self.stream = ResponsesStream(request)

    def response(self, data: bytes, doc: Any, record: CallRecord) -> bytes:
        return orjson.dumps(responses.response_from_chat(doc, self.request, record))

    def part(self, events: bytes) -> bytes:
        return self.stream.feed(events)

    def end(self, record: CallRecord) -> bytes:
        return self.stream.end(record)

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return self.stream.error(status, message, code)


class NativeResponsesWire(Wire):
    """OpenAI's Responses API forwarded to an upstream that speaks it: its answer relayed as
    it is, the stream's final event held back until the call is in the ledger."""

    def __init__(self) -> None:
        super().__init__()
        self._relay = ResponsesRelay()

    def relay(self) -> StreamRelay:
        return self._relay

    def end(self, record: CallRecord) -> bytes:
        return self._relay.final

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return error_event(self._relay.sequence, message, code)


def responses_call(config: Config, body: dict[str, Any], raw: bytes
                   ) -> tuple[str, dict[str, Any], bytes | None, Wire]:
    """A Responses API call as the gateway makes it: (endpoint, body, client bytes, wire):
    as it is to an upstream that speaks it, else as the chat call it translates to."""
    if body.get("background") not in (None, False):
        raise InvalidRequestError(
            "background is not supported: the gateway meters a call from its answer, and a "
            "background response answers later.", param="background")
    if responses.speaks_responses(config, body.get("model")):
        return ENDPOINT_RESPONSES, body, raw, NativeResponsesWire()
    return ENDPOINT_CHAT, responses.to_chat(body), None, ResponsesWire(body)


# Every field an upstream may take as the output cap (OpenAI's old and new names, the
# Responses API's): the largest is what the call may generate, and a clip rewrites them all.
CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens",
              "n_predict", "max_new_tokens")  # the last two: llama.cpp's and TGI's own names


def requested_output(endpoint: str, body: dict[str, Any],
                      default_field: str) -> tuple[str, int | None]:
    """The output-token cap the client asked for (the largest of the cap fields it set, as
    an upstream may honour any of them), and the field that carries it."""
    found: list[tuple[int, str]] = []
    for name in CAP_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 1 <= value <= MAX_OUTPUT_CAP:
            raise InvalidRequestError(f"{name} must be an integer from 1 to {MAX_OUTPUT_CAP}.",
                                      param=name)
        found.append((value, name))
    if found:
        value, name = max(found)
        return name, value
    if endpoint == ENDPOINT_RESPONSES:
        return "max_output_tokens", None
    return (default_field if endpoint == ENDPOINT_CHAT else "max_tokens"), None


# OpenAI refuses a Responses call whose max_output_tokens is below 16: a grant smaller than
# that is a refusal (402), not a call the upstream answers with a 400.
RESPONSES_MIN_OUTPUT = 16


def least_output(endpoint: str, requested: int | None) -> int:
    """The smallest output-token grant that lets the call go ahead."""
    if endpoint != ENDPOINT_RESPONSES:
        return 1
    return min(RESPONSES_MIN_OUTPUT, requested or RESPONSES_MIN_OUTPUT)


def choices_of(endpoint: str, body: dict[str, Any]) -> int:
    """How many completions the call generates (each may use the output cap): the largest of
    `n` and `best_of`, which some upstreams (vLLM) take on chat calls too."""
    if endpoint == ENDPOINT_EMBEDDINGS:
        return 1
    count = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHOICES:
            raise InvalidRequestError(f"{name} must be an integer from 1 to {MAX_CHOICES}.",
                                      param=name)
        count = max(count, value)
    return count


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return body


def is_answer(endpoint: str, doc: Any) -> bool:
    """Whether a 2xx body is what the endpoint answers: a completion's choices, or
    embeddings' data."""
    if not isinstance(doc, dict):
        return False
    if endpoint == ENDPOINT_RESPONSES:
        return isinstance(doc.get("output"), list)
    return isinstance(doc.get("data" if endpoint == ENDPOINT_EMBEDDINGS else "choices"), list)


def is_event_stream(resp: Response) -> bool:
    """False for a body that is plainly no event stream (JSON, HTML); an upstream that labels
    its events otherwise (text/plain, none) is read as one."""
    kind = (resp.headers.get("Content-Type") if resp.headers is not None else None) or ""
    return not any(word in kind.lower() for word in ("json", "html"))


def loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # a lone surrogate escape, which orjson refuses and Python's parser keeps
            return json.loads(data)
        except ValueError:
            return None


def upstream_payload(raw: bytes | None, body: dict[str, Any], model: ModelConfig,
                     stream: bool, clip: tuple[str, int] | None = None,
                     endpoint: str = ENDPOINT_CHAT) -> bytes:
    """The body sent upstream: the client's bytes untouched when nothing changes, else the
    body with the upstream's model name, clipped caps, and usage asked for on streams."""
    # A routed call named an alias; a translated one (raw None) was built by the gateway.
    routed = body.get("model") != model.name or raw is None
    # A Responses stream always ends with its usage (and takes no stream_options for it).
    ask_usage = stream and endpoint != ENDPOINT_RESPONSES
    if raw is not None and not ask_usage and not routed and clip is None \
            and model.upstream_model == model.name:
        return raw  # nothing to change: forward the client's bytes untouched
    out = dict(body)
    out["model"] = model.upstream_model
    if clip is not None:  # every cap field the client set, and the one clipped, lowered
        for name in (*CAP_FIELDS, clip[0]):
            if name in out or name == clip[0]:
                out[name] = clip[1]
    if endpoint == ENDPOINT_CHAT and routed:
        # The client named the cap for some model; this one may take only the other field.
        other = "max_tokens" if model.max_tokens_param == "max_completion_tokens" \
            else "max_completion_tokens"
        if other in out and model.max_tokens_param not in out:
            out[model.max_tokens_param] = out.pop(other)
    if ask_usage:
        options = out.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}
    return orjson.dumps(out)
