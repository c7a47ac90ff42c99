"""The Responses API's event stream: made from a chat stream (a translated call), or relayed
from an upstream that speaks it (its usage read from `response.completed`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway import responses
from gateway.protocol import UsageReading, metered_item, metered_items, read_usage
from gateway.streaming import StreamRelay
from gateway.upstream import error_summary
from metering.records import CallRecord

# The events that end a Responses stream well (with the usage), and the one that fails it.
_ENDS = (b"response.completed", b"response.incomplete")
_DELTAS = {"response.output_text.delta", "response.refusal.delta",
           "response.function_call_arguments.delta", "response.reasoning_text.delta",
           "response.reasoning_summary_text.delta"}


def sse(doc: dict[str, Any]) -> bytes:
    kind: str = doc["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def error_event(sequence: int, message: str, code: str) -> bytes:
    return sse({"type": "error", "code": code or None, "message": message, "param": None,
                "sequence_number": sequence})


class ResponsesStream:
    """Turns the chat stream's events (as the relay forwards them) into the Responses stream.

    Text deltas go to a message item's output_text part; each tool call to its own
    function_call item, its arguments as argument deltas. Items are numbered in the order they
    open and one is done before the next is added, as OpenAI's stream does. The final
    response.completed carries every item and the ledger's usage."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.response = responses.shell(request, responses.new_id("resp"), int(time.time()))
        self.started = False
        self.finish: Any = None
        self.sequence = 0
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._key: Any = None  # ("text",) or ("tool", index or id)
        self._buffer = b""

    def _event(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(doc)

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return (self._event("response.created", response=self.response)
                + self._event("response.in_progress", response=self.response))

    def feed(self, data: bytes) -> bytes:
        """Responses events for whole chat events the relay forwarded."""
        self._buffer += data
        *events, self._buffer = self._buffer.split(b"\n\n")
        out = [self.start()]
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(self._chunk(_loads(line[5:].strip())))
        return b"".join(out)

    def _chunk(self, doc: Any) -> bytes:
        choice = responses.first_choice(doc)
        delta = responses.as_dict(choice.get("delta"))
        out: list[bytes] = []
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._open_item(("text",), lambda: responses.message_item(
                responses.new_id("msg"), "", "in_progress")))
            assert self._open is not None
            self._open["content"][0]["text"] += text
            out.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                   output_index=self._index, content_index=0, delta=text,
                                   logprobs=[]))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            out.append(self._open_item(("refusal",), lambda: {
                "id": responses.new_id("msg"), "type": "message", "role": "assistant",
                "status": "in_progress", "content": [{"type": "refusal", "refusal": ""}]}))
            assert self._open is not None
            self._open["content"][0]["refusal"] += refusal
            out.append(self._event("response.refusal.delta", item_id=self._open["id"],
                                   output_index=self._index, content_index=0, delta=refusal))
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                out.append(self._tool_delta(call))
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
        return b"".join(out)

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        # A call is named by its index; a server that sends none names each by its id (a
        # chunk without either continues the open call).
        n: Any = call.get("index") if isinstance(call.get("index"), int) else call.get("id")
        if n is None:
            n = self._key[1] if self._key and self._key[0] == "tool" else 0
        fn = responses.as_dict(call.get("function"))
        out = self._open_item(("tool", n), lambda: responses.call_item(
            responses.new_id("fc"), str(call.get("id") or responses.new_id("call")),
            str(fn.get("name") or ""), "", "in_progress"))
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            assert self._open is not None
            self._open["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta",
                               item_id=self._open["id"], output_index=self._index,
                               delta=arguments)
        return out

    @property
    def _index(self) -> int:
        return len(self.response["output"]) - 1

    def _open_item(self, key: Any, make: Any) -> bytes:
        if self._key == key:
            return b""
        out = self._close_item()
        item = make()
        self._key, self._open = key, item
        self.response["output"].append(item)
        out += self._event("response.output_item.added", output_index=self._index,
                           item=_copy(item))
        if item["type"] == "message":
            out += self._event("response.content_part.added", item_id=item["id"],
                               output_index=self._index, content_index=0,
                               part=_copy(item["content"][0]))
        return out

    def _close_item(self) -> bytes:
        item, self._open, self._key = self._open, None, None
        if item is None:
            return b""
        item["status"] = "completed"
        at, out = self._index, b""
        if item["type"] == "message":
            part = item["content"][0]
            if part["type"] == "refusal":
                out += self._event("response.refusal.done", item_id=item["id"],
                                   output_index=at, content_index=0, refusal=part["refusal"])
            else:
                out += self._event("response.output_text.done", item_id=item["id"],
                                   output_index=at, content_index=0, text=part["text"],
                                   logprobs=[])
            out += self._event("response.content_part.done", item_id=item["id"],
                               output_index=at, content_index=0, part=_copy(part))
        else:
            out += self._event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=at, name=item["name"],
                               arguments=item["arguments"])
        return out + self._event("response.output_item.done", output_index=at,
                                 item=_copy(item))

    def end(self, record: CallRecord) -> bytes:
        """The close of a stream that ended well, with the usage the ledger recorded."""
        out = self.start() + self._close_item()
        response = responses.finished(self.response, self.finish, record)
        kind = "response.completed" if response["status"] == "completed" \
            else "response.incomplete"
        return out + self._event(kind, response=response)

    def error(self, status: int, message: str, code: str) -> bytes:
        """An error event, then response.failed, as OpenAI ends a stream that failed."""
        out = self.start() + self._event("error", code=code or None, message=message,
                                         param=None)
        self.response["status"] = "failed"
        self.response["error"] = {"code": code or "server_error", "message": message}
        return out + self._event("response.failed", response=self.response)


class ResponsesRelay(StreamRelay):
    """An upstream's own Responses stream, relayed event by event. Its usage is in the final
    response.completed (or response.incomplete) event, which is held back until the call is
    in the ledger; an error event or response.failed ends it with the gateway's own error."""

    def __init__(self) -> None:
        super().__init__(client_wants_usage=True)
        self.final = b""
        self.sequence = 0  # the next sequence number (for the gateway's own error event)
        self._texts: dict[tuple[Any, ...], list[str]] = {}
        # Metered items (web searches) seen done, or in the final response: each once.
        self._items: dict[tuple[str, str], None] = {}

    def _forward(self, event: bytes) -> bytes:
        payload = next((line[5:].strip() for line in event.split(b"\n")
                        if line.startswith(b"data:")), None)
        if payload is None:
            return event + b"\n\n"
        doc = _loads(payload)
        if not isinstance(doc, dict):
            return event + b"\n\n"
        self.events += 1
        kind = doc.get("type")
        if isinstance(doc.get("sequence_number"), int):
            self.sequence = doc["sequence_number"] + 1
        if kind in _DELTAS and isinstance(doc.get("delta"), str):
            key = (doc.get("output_index"), doc.get("content_index"), kind)
            self._texts.setdefault(key, []).append(doc["delta"])
        if kind == "response.output_item.done":
            found = metered_item(doc.get("item"), doc.get("output_index"))
            if found is not None:
                self._items[found] = None
        if kind in ("error", "response.failed"):
            response = responses.as_dict(doc.get("response"))
            self._take_usage(response)
            error = doc if kind == "error" else response.get("error")
            self.upstream_error = f"{kind}: {error_summary(error)}"  # never its message
            return b""
        if isinstance(kind, str) and kind.encode() in _ENDS:
            self._take_usage(doc.get("response"))
            self.done = True
            self.final = event + b"\n\n"
            return b""
        return event + b"\n\n"

    def _take_usage(self, response: Any) -> None:
        self._items.update(dict.fromkeys(metered_items(response)))
        reading = read_usage(response)
        if reading != UsageReading():
            self.reading = reading

    def texts(self) -> list[str]:
        return ["".join(parts) for parts in self._texts.values()]

    def metered_items(self) -> list[tuple[str, str]]:
        return list(self._items)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(item))  # type: ignore[no-any-return]


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
