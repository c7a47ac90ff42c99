"""A fast fake OpenAI-compatible upstream (raw asyncio HTTP/1.1 server) for tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from types import TracebackType
from typing import Any

import orjson

from tests.support.fake_openai import (
    DEFAULT_WORDS,
    MAX_WORDS,
    WORDS,
    Reply,
    completion_text,
    completion_tokens,
    completion_words,
    count_words,
    error_body,
    fake_options,
    http_head,
    json_reply,
    prompt_tokens,
    route,
)

__all__ = [
    "DEFAULT_WORDS",
    "MAX_WORDS",
    "WORDS",
    "FakeUpstream",
    "completion_text",
    "completion_tokens",
    "completion_words",
    "count_words",
    "main",
    "prompt_tokens",
]
_MAX_HEAD = 64 * 1024


class _HttpProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are served one at a time."""

    def __init__(self, owner: FakeUpstream) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._conns.discard(self)
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._process()

    def _fail(self, status: int, message: str) -> None:
        assert self.transport is not None
        body = error_body(status, message)
        self.transport.write(http_head(status, "application/json", len(body), True) + body)
        self.transport.close()

    def _process(self) -> None:
        while self.task is None and self.transport is not None and not self.transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._fail(431, "Request header fields too large")
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
            except ValueError:
                self._fail(400, "Malformed HTTP request")
                return
            if "transfer-encoding" in headers:
                self._fail(411, "Chunked request bodies are not supported; send Content-Length")
                return
            total = end + 4 + length
            if len(self.buf) < total:
                if headers.get("expect", "").lower() == "100-continue" and not self.continued:
                    self.continued = True
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            raw = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            self.continued = False
            close = version != "HTTP/1.1" or headers.get("connection", "").lower() == "close"
            self._serve(method, target.split("?", 1)[0], headers, raw, close)

    def _serve(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, close: bool
    ) -> None:
        assert self.transport is not None
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            self.owner._record(method, path, headers, None)
            self._send(json_reply(400, error_body(400, "Invalid JSON body"), close, {}))
            return
        self.owner._record(method, path, headers, body)
        if self.owner.behaviour and isinstance(body, dict):
            body = {**body, "fake": {**self.owner.behaviour, **fake_options(body)}}
        try:
            reply = route(method, path, body, close)
        except (TypeError, ValueError, AttributeError) as exc:
            reply = json_reply(400, error_body(400, f"Bad request: {exc}"), close, {})
        if fake_options(body).get("drop"):
            self.transport.close()
        elif reply.delay or reply.chunk_delay or reply.hang:
            self.task = asyncio.get_running_loop().create_task(self._send_slowly(reply))
        else:
            self._send(reply)

    def _send(self, reply: Reply) -> None:
        assert self.transport is not None
        self.transport.write(reply.head + b"".join(reply.parts))
        if reply.close:
            self.transport.close()

    async def _send_slowly(self, reply: Reply) -> None:
        if reply.hang:
            await asyncio.Event().wait()  # cancelled by connection_lost / stop()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply.head)
        for i, part in enumerate(reply.parts):
            if i and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            if transport.is_closing():
                return
            transport.write(part)
        if reply.close:
            transport.close()
            return
        self.task = None
        self._process()


class FakeUpstream:
    """Fake OpenAI-compatible provider served on loopback from an event loop in a daemon thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", record: bool = True) -> None:
        self.host, self.port, self.record = host, port, record
        # `fake` options applied to every request (a request's own override them): make the
        # whole server fail, slow down or recover, e.g. {"status": 503} or {"delay_ms": 200}.
        self.behaviour: dict[str, Any] = {}
        self._requests: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._count = 0
        self._conns: set[_HttpProtocol] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Snapshot of recorded requests: {method, path, headers, body, authorization}."""
        with self._cond:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """Number of requests received (counted even when record=False)."""
        return self._count

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until >= n requests are recorded and return them; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(f"fake upstream got {len(self._requests)} requests, wanted {n}")
            return list(self._requests)

    def _record(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        self._count += 1
        if not self.record:
            return
        entry = {
            "method": method,
            "path": path,
            "headers": headers,
            "body": body,
            "authorization": headers.get("authorization"),
        }
        with self._cond:
            self._requests.append(entry)
            self._cond.notify_all()

    async def serve(self) -> asyncio.Server:
        """Bind and start serving on the running loop (used by start() and the CLI)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _HttpProtocol(self), self.host, self.port, backlog=1024, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self._server

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """CLI: serve until killed; prints 'listening on <base_url>' once bound."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--record", action="store_true", help="keep request bodies in memory")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(port=args.port, host=args.host, record=args.record)

    async def run() -> None:
        server = await upstream.serve()
        print(f"listening on {upstream.base_url}", flush=True)
        await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
