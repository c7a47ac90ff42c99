"""Relaying an OpenAI SSE stream event by event, noting usage and the text that passed."""

from __future__ import annotations

import json
from typing import Any

import orjson

from gateway.protocol import UsageReading, joined_texts, read_usage
from gateway.upstream import error_summary
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
        # An upstream's error event, as its type and code (never its words: they may quote the
        # prompt), held back: the gateway ends the stream with an error event of its own.
        self.upstream_error: str | None = None
        self.reading = UsageReading()
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
        return b"".join(self._forward(ev) for ev in events)

    def flush(self) -> bytes:
        """Whatever remains after the upstream closed (a final event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        return self._forward(rest) if rest.strip() else b""

    def _forward(self, event: bytes) -> bytes:
        """What the client gets for one upstream event."""
        if b'"error"' in event:
            doc = _loads(_data_of(event) or b"")
            if isinstance(doc, dict) and doc.get("error") is not None:
                # its type and code only: its message may quote the prompt or the answer
                self.upstream_error = error_summary(doc["error"])
                self._keep(event)  # what it carries besides (text, usage) still counts
                return b""
        return event + b"\n\n" if self._keep(event) else b""

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
            reading = read_usage(doc)
            if reading != UsageReading():  # `"usage": null` on every chunk says nothing
                self.reading = reading
                choices = doc.get("choices") if isinstance(doc, dict) else None
                if not choices:
                    return self.client_wants_usage
        self._payloads.append(payload)
        return True

    @property
    def usage(self) -> TokenUsage | None:
        return self.reading.usage

    def metered_items(self) -> list[tuple[str, str]]:
        """(meter id, item id) of what the stream shows the upstream did that a meter counts
        (a chat stream shows none)."""
        return []

    def texts(self) -> list[str]:
        """The generated text of the stream, joined per choice (parsed lazily: only needed
        for counting)."""
        return joined_texts(_loads(payload) for payload in self._payloads)


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines).strip()


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        # An emoji cut between two chunks arrives as two lone surrogate escapes, which orjson
        # refuses: Python's parser keeps them, and the joined text puts them back together.
        try:
            return json.loads(payload)
        except ValueError:
            return None


def sse_error(message: str, *, type_: str, code: str) -> bytes:
    """An error event as OpenAI sends one mid-stream."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"
