"""A webhook receiver on loopback: records each delivery and answers with the statuses it is
told to (then 200), as an app's endpoint would."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.statuses: deque[int] = deque()
        self.arrived = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.arrived:
                    owner.deliveries.append(Delivery(self.path, {k.lower(): v for k, v in
                                                                 self.headers.items()}, body))
                    owner.arrived.notify_all()
                status = owner.statuses.popleft() if owner.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/meterlane"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, done: Callable[[list[Delivery]], bool], timeout: float = 30) -> None:
        """Block until `done(deliveries)` holds (woken by each delivery), or fail."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: done(self.deliveries), timeout):
                raise AssertionError(f"not delivered in {timeout} s: got "
                                     f"{[d.body[:80] for d in self.deliveries]}")
