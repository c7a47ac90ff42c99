"""Relaying an OpenAI SSE stream event by event, noting usage and the text that passed."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.protocol import texts_of_choices, usage_from
from metering.pricing import TokenUsage

_DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class StreamRelay:
    """Splits upstream bytes into SSE events and decides what the client sees.

    Complete events are forwarded at once; only a partial event waits for its end. The usage
    chunk the gateway asked for is dropped unless the client asked for it too (as OpenAI does).
    The final `[DONE]` is held back: the gateway sends it once the call is in the ledger, so a
    client that has seen the end of a stream can read its usage.
    Content events are kept (as raw bytes, parsed only if needed) so that the tokenizer can
    count what passed when the upstream reports no usage."""

    def __init__(self, *, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: TokenUsage | None = None
        self.done = False
        self.events = 0
        self._buffer = b""
        self._payloads: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward to the client for this piece of upstream body."""
        self._buffer += data
        if b"\n\n" not in self._buffer and b"\r\n\r\n" not in self._buffer:
            return b""
        buffer = self._buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        out = [ev + b"\n\n" for ev in events if self._keep(ev)]
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever remains after the upstream closed (a final event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        if rest.strip() and self._keep(rest):
            return rest + b"\n\n"
        return b""

    def _keep(self, event: bytes) -> bool:
        payload = _data_of(event)
        if payload is None:
            return True  # comments, retry: lines and the like pass through untouched
        if payload == _DONE:
            self.done = True
            return False
        self.events += 1
        if b'"usage"' in payload:
            doc = _loads(payload)
            usage = usage_from(doc)
            if usage is not None:
                self.usage = usage
                choices = doc.get("choices") if isinstance(doc, dict) else None
                if not choices:
                    return self.client_wants_usage
        self._payloads.append(payload)
        return True

    def texts(self) -> list[str]:
        """The generated text of every event seen (parsed lazily: only needed for counting)."""
        out: list[str] = []
        for payload in self._payloads:
            out.extend(texts_of_choices(_loads(payload)))
        return out


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines).strip()


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def sse_error(message: str, *, type_: str, code: str) -> bytes:
    """An error event as OpenAI sends one mid-stream."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"
