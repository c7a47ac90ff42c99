"""An upstream's own words never reach the log: its error message (which quotes the request:
vLLM's and FastAPI's validation errors echo the input), a 2xx body that is not an answer (it
may be the start of a completion), an error it sends mid-stream. The log keeps the status,
the error's type and code, and the body's size. Through the app with real Postgres and an
upstream of the test's own that puts a marker in each of those."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import Engine

from core.auth import Role
from core.logs import JsonFormatter
from tests.conftest import bearer, config_from_toml, gateway_toml

pytestmark = pytest.mark.integration
MARKER = "ZQX-upstream-words-7731"
_CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,' \
         b'"delta":{"content":"hello"}}]}\n\n'


class _Echoing(BaseHTTPRequestHandler):
    """Answers each call as its prompt asks, with the marker in its words."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = body["messages"][0]["content"]
        if mode == "error":
            self._send(400, orjson.dumps({"error": {
                "message": f"{MARKER}: your input 'the prompt' is invalid",
                "type": "invalid_request_error", "code": "bad_input"}}))
        elif mode == "detail":  # FastAPI's validation error
            self._send(422, orjson.dumps({"detail": [{"msg": MARKER, "input": MARKER}]}))
        elif mode == "plain":
            self._send(500, f"Internal error near {MARKER}".encode(), "text/plain")
        elif mode == "junk":
            self._send(200, f"{MARKER} Once upon a time".encode(), "text/plain")
        else:  # a stream that fails part way
            error = orjson.dumps({"error": {"message": f"{MARKER} mid-stream",
                                            "type": "server_error"}})
            self._send(200, _CHUNK + b"data: " + error + b"\n\n", "text/event-stream")


@pytest.fixture()
def echoing() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echoing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_no_upstream_words_in_the_log(clean_db: Engine, pg_url: str, echoing: str,
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from app import create_app

    app = create_app(config_from_toml(gateway_toml(echoing), tmp_path, database_url=pg_url))
    try:
        key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
        client = app.test_client()
        statuses = {}
        with caplog.at_level(logging.DEBUG):
            for mode in ("error", "detail", "plain", "junk", "stream"):
                resp = client.post("/v1/chat/completions", headers=bearer(key), json={
                    "model": "gpt-4o-mini", "user": "u", "stream": mode == "stream",
                    "messages": [{"role": "user", "content": mode}]}, buffered=True)
                statuses[mode] = resp.status_code
                assert MARKER not in resp.get_data(as_text=True)  # nor to the client
        assert statuses == {"error": 400, "detail": 422, "plain": 502, "junk": 502,
                            "stream": 200}
        written = "\n".join(JsonFormatter().format(r) for r in caplog.records)
        assert MARKER not in written
        upstream = [r.getMessage() for r in caplog.records if r.name == "gateway.upstream"]
        # what the operator still learns: the status, the error's type and code, the size
        assert any("HTTP 400: type=invalid_request_error code=bad_input" in m
                   for m in upstream), upstream
        assert any("HTTP 200 with a body that is not an answer (40 bytes" in m
                   for m in upstream), upstream
        assert any("mid-stream: type=server_error" in r.getMessage() for r in caplog.records)
    finally:
        app.extensions["wiring"].engine.dispose()
