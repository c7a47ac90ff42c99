"""A small keep-alive HTTP/1.1 client for the upstreams: POST only, no retries, no redirects.

urllib3 was the largest CPU item of a gateway call in-process (264 of 716 us, issue 20): its
pool, timeout and retry objects, http.client's request building and its header parsing (the
email package) for every call. This is what the gateway needs of it and no more: one pool of
idle connections per upstream (TCP_NODELAY; TLS through an ssl context), the request written
in one send, the answer's head parsed from the socket's first read, its body read by
Content-Length, chunked or to the close. Sockets are the standard library's, so gevent's
patched ones keep it cooperative.

A request is never sent twice once any byte of it may have reached the server (a model call
may be paid twice). A pooled connection the server has closed since is found before it is
used (readable while idle: its end of file, or bytes nobody asked for) and dropped; if it
closes in the instant between that check and the request, and the first write fails with
nothing written, the request goes on a new connection.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from core.logs import note

log = logging.getLogger(__name__)
MAX_HEAD = 64 * 1024  # an answer's status line and headers
READ_SIZE = 64 * 1024


def _original_poll() -> Callable[[], Any] | None:
    """The real poll(): gevent's (patched in) could not answer at once for an idle socket."""
    try:
        from gevent.monkey import get_original
    except ImportError:  # pragma: no cover - gevent is a dependency
        return getattr(select, "poll", None)
    try:
        return get_original("select", "poll")  # type: ignore[no-any-return]
    except AttributeError:  # pragma: no cover - a platform without poll
        return None


_poll = _original_poll()


class TransportError(Exception):
    """The upstream could not be reached, or its answer could not be read."""


class ConnectFailedError(TransportError):
    """No connection could be opened (refused, unreachable, a name that does not resolve)."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class ConnectTimeoutError(TransportError):
    """Opening the connection (or its TLS handshake) took longer than the connect timeout."""


class ReadTimeoutError(TransportError):
    """The upstream said nothing for longer than the read timeout."""


class ProtocolError(TransportError):
    """The connection broke, or what came back was not HTTP/1.x."""


class Headers:
    """An answer's headers, looked up by any case (repeated ones joined by ', ')."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items  # lower-cased names

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._items.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self._items.items())

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class _Conn:
    """A socket and what was read from it beyond the answer's parts handed out so far."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def recv(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE)
        except TimeoutError as exc:
            raise ReadTimeoutError("read timed out") from exc
        except OSError as exc:
            raise ProtocolError(f"{exc.__class__.__name__}: {exc}") from exc

    def fill(self) -> None:
        data = self.recv()
        if not data:
            raise ProtocolError("the connection closed before the answer ended")
        self.buf += data

    def readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1:]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError("a line of the answer is too long")
            self.fill()

    def take(self, size: int) -> bytes:
        """Exactly `size` bytes."""
        buf = self.buf
        if len(buf) < size:  # joined once (a large body read by += would be copied each time)
            parts, have = [buf], len(buf)
            while have < size:
                data = self.recv()
                if not data:
                    raise ProtocolError("the connection closed before the answer ended")
                parts.append(data)
                have += len(data)
            buf = b"".join(parts)
        self.buf = buf[size:]
        return buf[:size]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - closing never matters to the call
            pass

    def dropped(self) -> bool:
        """Whether an idle connection is no use: the server closed it or sent what nobody
        asked for (urllib3's is_connection_dropped)."""
        sock = self.sock
        pending = getattr(sock, "pending", None)  # TLS: bytes decrypted, not yet read
        if self.buf or (pending is not None and pending()):
            return True
        try:
            if _poll is None:  # pragma: no cover - no poll(): select() does for fds < 1024
                return bool(select.select([sock], [], [], 0)[0])
            poller = _poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class Response:
    """An upstream's answer: status, headers, and its body (read all at once by `data` or
    `read`, or as it arrives by `chunks`). Its connection goes back to the pool once the body
    is read to its end; `release` drops it otherwise (and `close` always): a body left unread
    would come out of the next call's answer."""

    __slots__ = ("status", "reason", "headers", "_conn", "_pool", "_left", "_chunked",
                 "_keep", "_done", "_data", "_decoder", "_pending", "_it")

    def __init__(self, status: int, reason: str, headers: Headers, conn: _Conn | None,
                 pool: HTTPPool | None, left: int, chunked: bool, keep: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._left = left  # body bytes still to read by Content-Length; -1: to the close
        self._chunked = chunked
        self._keep = keep
        self._done = not chunked and left == 0
        self._data: bytes | None = None
        self._pending = b""  # decoded bytes read past what read(amt) returned
        self._it: Iterator[bytes] | None = None
        coding = (headers.get("content-encoding") or "").strip().lower()
        self._decoder: Any = None
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)
        if self._done:
            self.release()

    @property
    def data(self) -> bytes:
        """The whole body (what is left of it, after `read`s)."""
        if self._data is None:
            conn = self._conn
            if (conn is not None and not self._chunked and self._left > 0
                    and self._decoder is None and not self._pending and self._it is None):
                data = conn.take(self._left)  # the common case: one slice of what was read
                self._left = 0
                self._done = True
                self.release()
            else:
                data = self._pending + b"".join(self._body())
                self._pending = b""
            self._data = data
        return self._data

    def read(self, amt: int | None = None) -> bytes:
        """Up to `amt` bytes of the body (all of it when None)."""
        if amt is None:
            return self.data
        parts, have = [self._pending], len(self._pending)
        body = self._body()
        while have < amt:
            part = next(body, None)
            if part is None:
                break
            parts.append(part)
            have += len(part)
        joined = b"".join(parts)
        self._pending = joined[amt:]
        return joined[:amt]

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives: one item per HTTP chunk, or per read of the socket."""
        if self._pending:
            pending, self._pending = self._pending, b""
            yield pending
        yield from self._body()

    def _body(self) -> Iterator[bytes]:
        if self._it is None:
            self._it = self._decoded() if self._decoder is not None else self._raw()
        return self._it

    def _decoded(self) -> Iterator[bytes]:
        decoder = self._decoder
        try:
            for part in self._raw():
                out = decoder.decompress(part)
                if out:
                    yield out
            tail = decoder.flush()
        except zlib.error as exc:
            self.close()
            raise ProtocolError(f"the body could not be decoded: {exc}") from exc
        if tail:
            yield tail

    def _raw(self) -> Iterator[bytes]:
        conn = self._conn
        if self._done or conn is None:
            return
        if self._chunked:
            while True:
                line = conn.readline()
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"a bad chunk size line: {line[:40]!r}") from None
                if size < 0:
                    raise ProtocolError(f"a bad chunk size line: {line[:40]!r}")
                if size == 0:
                    while conn.readline():  # the trailer, to its empty line
                        pass
                    break
                data = conn.take(size)
                if conn.readline():
                    raise ProtocolError("a chunk did not end with CRLF")
                yield data
        elif self._left >= 0:
            while self._left:
                if not conn.buf:
                    conn.fill()
                data = conn.buf[:self._left]
                conn.buf = conn.buf[len(data):]
                self._left -= len(data)
                yield data
        else:  # no length: the body ends with the connection
            if conn.buf:
                data, conn.buf = conn.buf, b""
                yield data
            while True:
                data = conn.recv()
                if not data:
                    break
                yield data
        self._done = True
        self.release()

    def release(self) -> None:
        """Give the connection back to the pool if the body was read to its end; else close
        it (the upstream stops sending). Once: later calls do nothing."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep and not conn.buf and self._pool is not None:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection (a stream left early: the upstream stops generating)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class HTTPPool:
    """Keep-alive connections to one origin (http or https), idle ones reused last in first
    out; none are held back (a call finding none idle opens one), at most `maxsize` kept."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 maxsize: int = 64, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/").encode("ascii")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.maxsize = maxsize
        self._ssl = ssl_context
        if self.tls and ssl_context is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        netloc = parts.netloc.rpartition("@")[2]
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = netloc if parts.port is None or not default else netloc.rpartition(":")[0]
        self.host_line = f"Host: {host}\r\n".encode("idna" if not host.isascii() else "ascii")
        self._idle: list[_Conn] = []

    def connect(self) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        except TimeoutError as exc:
            raise ConnectTimeoutError(f"connecting timed out: {exc}") from exc
        except OSError as exc:
            raise ConnectFailedError(f"{exc.__class__.__name__}: {exc}",
                                refused=isinstance(exc, ConnectionRefusedError)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(f"the TLS handshake timed out: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise ConnectFailedError(f"{exc.__class__.__name__}: {exc}", refused=False) from exc
        return _Conn(sock)

    def get(self) -> tuple[_Conn, bool]:
        """A connection, and whether it was idle in the pool (else new)."""
        idle = self._idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # pragma: no cover - another thread took the last one
                break
            if not conn.dropped():
                return conn, True
            conn.close()
        return self.connect(), False

    def put(self, conn: _Conn) -> None:
        if len(self._idle) < self.maxsize:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def post(self, path: str, headers: bytes, body: bytes, *, preload: bool,
             meanwhile: Callable[[], object] | None = None) -> Response:
        """POST `body` to prefix + `path` with `headers` (whole 'Name: value\\r\\n' lines).
        preload: the body is read (and the connection released) before this returns.
        meanwhile: work for while the upstream works, called once the request is sent (not
        when it could not be); what it raises is logged and left: the answer comes first."""
        head = (b"POST " + self.prefix + path.encode("ascii") + b" HTTP/1.1\r\n"
                + self.host_line + headers + b"Content-Length: %d\r\n\r\n" % len(body))
        message = head + body if len(body) <= READ_SIZE else None
        conn, reused = self.get()
        while True:
            try:
                sent = conn.sock.send(message if message is not None else head)
            except TimeoutError as exc:
                conn.close()
                raise ReadTimeoutError("sending the request timed out") from exc
            except OSError as exc:
                conn.close()
                if not reused:  # a new connection that fails at once: nothing to retry
                    raise ProtocolError(f"{exc.__class__.__name__}: {exc}") from exc
                # A pooled connection the server closed just now: the write failed, nothing
                # of the request left. A new connection is safe (the server never saw it).
                conn, reused = self.get()
                continue
            break
        try:
            if message is not None:
                if sent < len(message):
                    conn.sock.sendall(memoryview(message)[sent:])
            else:
                if sent < len(head):
                    conn.sock.sendall(memoryview(head)[sent:])
                conn.sock.sendall(body)
            if meanwhile is not None:
                _run_meanwhile(meanwhile)
            resp = self._answer(conn)
            if preload:
                resp.data  # noqa: B018 - read now: the connection goes back to the pool
        except TimeoutError as exc:
            conn.close()
            raise ReadTimeoutError("sending the request timed out") from exc
        except OSError as exc:
            conn.close()
            raise ProtocolError(f"{exc.__class__.__name__}: {exc}") from exc
        except TransportError:
            conn.close()
            raise
        return resp

    def _answer(self, conn: _Conn) -> Response:
        while True:
            status, reason, version, headers = _read_head(conn)
            if status >= 200 or status == 101:
                break  # 1xx (100 Continue, 103 Early Hints) come before the answer
        items = headers._items
        connection = items.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep = "close" not in connection
        else:
            keep = "keep-alive" in connection
        coding = items.get("transfer-encoding")
        chunked = False
        if status in (204, 304) or 100 <= status < 200:
            left = 0
            keep = keep and status != 101
        elif coding is not None:
            chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
            left = -1
        elif "content-length" in items:
            lengths = {v.strip() for v in items["content-length"].split(",")}
            if len(lengths) != 1:
                raise ProtocolError(f"conflicting Content-Length: {items['content-length']}")
            try:
                left = int(lengths.pop())
            except ValueError:
                raise ProtocolError("a bad Content-Length") from None
            if left < 0:
                raise ProtocolError("a bad Content-Length")
        else:
            left = -1
        if left < 0 and not chunked:
            keep = False  # the body ends with the connection
        return Response(status, reason, headers, conn, self, left, chunked, keep)


def _read_head(conn: _Conn) -> tuple[int, str, str, Headers]:
    """The status line and headers (the bytes after them stay in conn.buf)."""
    buf = conn.buf
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            head, conn.buf = buf[:end], buf[end + 4:]
            break
        end = buf.find(b"\n\n", start)
        if end >= 0:
            head, conn.buf = buf[:end], buf[end + 2:]
            break
        if len(buf) > MAX_HEAD:
            raise ProtocolError("the answer's headers are too long")
        start = max(0, len(buf) - 3)
        data = conn.recv()
        if not data:
            if buf:
                raise ProtocolError("the connection closed in the answer's headers")
            raise ProtocolError("the server closed the connection without answering")
        buf += data
    lines = head.decode("latin-1").split("\n")
    status_line = lines[0].rstrip("\r")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    items: dict[str, str] = {}
    name = ""
    for line in lines[1:]:  # (each ends in its CR: strip() takes it off)
        if line[:1] in (" ", "\t") and name:  # an obsolete folded line continues the last
            items[name] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        name = key.strip().lower()
        value = value.strip()
        items[name] = f"{items[name]}, {value}" if name in items else value
    return int(code), reason.strip(), version, Headers(items)


def _run_meanwhile(work: Callable[[], object]) -> None:
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the answer matters more; its caller tries again
        note(log, logging.WARNING, "work done while the upstream answers failed: %r", exc)
