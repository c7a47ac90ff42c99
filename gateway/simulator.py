"""A simulated OpenAI-compatible model server for the demo (`meterlane demo`): it is not a
model. It answers /v1/chat/completions (streamed or not) and /v1/models on loopback with
made-up text whose token counts are real (tiktoken's o200k_base, as OpenAI counts), after a
latency shaped like a real server's (time to first token, then tokens per second), and
reports usage as OpenAI does (`stream_options.include_usage` included)."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from metering.tokens import TiktokenTokenizer, count_chat_prompt, load_encoding

WORDS = ("the meter counts every token that passes while the gateway forwards each call to "
         "a model and prices it at the list price or at the real cost of a local GPU so that "
         "finance sees the margin of every plan and each user sees what is left of the quota "
         "before it resets at midnight in their own time zone").split()
SIMULATOR = "meterlane-simulator"


class Simulator:
    """Serve on 127.0.0.1 in a thread: `with Simulator() as sim: sim.base_url`."""

    def __init__(self, *, port: int = 0, ttft_ms: tuple[int, int] = (60, 220),
                 tokens_per_second: int = 400, seed: int = 7) -> None:
        self.ttft_ms, self.tokens_per_second = ttft_ms, tokens_per_second
        self.tokenizer = TiktokenTokenizer(load_encoding("o200k_base"))
        self.calls = 0
        self._lock = threading.Lock()
        self._seed = seed
        handler = type("Handler", (_Handler,), {"sim": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="simulator")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Simulator:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict[str, Any]) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens) for a chat request: the length follows
        the prompt (the same prompt, the same answer) and stops at max_tokens."""
        messages = body.get("messages") or []
        prompt = count_chat_prompt(self.tokenizer, messages if isinstance(messages, list)
                                   else [])
        digest = hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).digest()
        rnd = random.Random(int.from_bytes(digest[:8], "big") ^ self._seed)  # noqa: S311
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        want = rnd.randint(30, 260)
        if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
            want = min(want, cap)
        words: list[str] = []
        while True:  # whole words, as many as fit in `want` tokens
            word = rnd.choice(WORDS)
            text = " ".join([*words, word])
            if self.tokenizer.count(text) > want:
                break
            words.append(word)
        text = " ".join(words)
        return text, prompt, self.tokenizer.count(text)

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # the simulated model's own latency


class _Handler(BaseHTTPRequestHandler):
    sim: Simulator
    protocol_version = "HTTP/1.1"
    server_version = SIMULATOR

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        return  # quiet: the demo prints its own report

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": SIMULATOR, "object": "model", "created": 0, "owned_by": SIMULATOR}]})
        else:
            self._error(404, f"No route {self.path} on the simulator.")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = orjson.loads(self.rfile.read(length))
        except orjson.JSONDecodeError:
            self._error(400, "The body is not JSON.")
            return
        if self.path != "/v1/chat/completions" or not isinstance(body, dict):
            self._error(404, f"The simulator answers /v1/chat/completions, not {self.path}.")
            return
        sim = self.sim
        with sim._lock:
            sim.calls += 1
        text, prompt, completion = sim.answer(body)
        model = str(body.get("model") or "model")
        created, cid = int(time.time()), f"chatcmpl-sim{sim.calls:08d}"
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        sim.pause(random.uniform(*sim.ttft_ms) / 1000)  # noqa: S311 - simulated latency
        if body.get("stream") is True:
            self._stream(body, text, model, created, cid, usage)
            return
        sim.pause(completion / sim.tokens_per_second)
        self._json(200, {"id": cid, "object": "chat.completion", "created": created,
                         "model": model, "system_fingerprint": SIMULATOR,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": usage})

    def _stream(self, body: dict[str, Any], text: str, model: str, created: int, cid: str,
                usage: dict[str, int]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": SIMULATOR}
        words = text.split(" ")
        pieces = [" ".join(words[i:i + 4]) + ("" if i + 4 >= len(words) else " ")
                  for i in range(0, len(words), 4)] if text else []
        self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                          "finish_reason": None}]})
        per_piece = usage["completion_tokens"] / max(1, len(pieces)) / self.sim.tokens_per_second
        for piece in pieces:
            self.sim.pause(per_piece)
            self._event({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": None}]})
        self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            self._event({**base, "choices": [], "usage": usage})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, obj: dict[str, Any]) -> None:
        self._chunk(b"data: " + orjson.dumps(obj) + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, obj: Any) -> None:
        data = orjson.dumps(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error",
                                      "param": None, "code": None}})
