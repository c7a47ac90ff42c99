"""One tokenizer process per `meterlane serve`: it holds the tiktoken encodings (o200k_base is
about 46 MB) and counts for every worker over a Unix socket, so that the workers do not each
build their own. A worker that cannot reach it builds the encoding itself: a count is never
lost, and it is the same count (the same TiktokenTokenizer counts on both sides)."""

from __future__ import annotations

import _socket  # the C socket: blocking even where gevent patched the `socket` module
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from metering.tokens import SUPPORTED_ENCODINGS, Tokenizer, TokenizerRegistry

log = logging.getLogger(__name__)

SOCKET_ENV: Final = "MLANE_TOKENIZER_SOCKET"  # serve sets it for its workers
# A frame: 4-byte big-endian length, then that many bytes: the encoding's index in
# SUPPORTED_ENCODINGS with _EACH set (1 byte), then each text: its length (4 bytes) and its
# UTF-8 (lone surrogates kept: surrogatepass). The answer: each text's count, 4 bytes
# big-endian, in order. _EACH marks this form of the answer: a process of an earlier version
# (it answered the sum), still running beside workers reloaded with this one, closes the
# connection at once on such a frame, and the worker counts itself.
_LENGTH: Final = 4
_EACH: Final = 0x80
_CONNECT_SECONDS: Final = 1.0
# A count's wait: the first of an encoding waits for its build (0.2-0.5 s); 1 s more per MB
# of text (tiktoken counts > 1 MB/s). A process that stopped answering holds one call of
# each worker this long, once.
_COUNT_SECONDS: Final = 10.0
_BLOCKING_SECONDS: Final = 0.0002  # how long a count may hold the whole worker


class TokenClient:
    """A worker's connections to the tokenizer process, one per count in progress (a few:
    a count holds the worker while its answer comes quickly, see _await_answer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failed = False  # once the process did not answer, this worker counts itself
        self._idle: list[_socket.socket] = []  # list.pop/append: atomic, no lock needed

    def counts(self, encoding: str, texts: Sequence[str]) -> list[int] | None:
        """Each text's count, or None if the process could not answer (then never asked
        again)."""
        if self.failed:
            return None
        if not texts:
            return []
        parts = [bytes((SUPPORTED_ENCODINGS.index(encoding) | _EACH,))]
        for text in texts:
            data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b""
            parts += (len(data).to_bytes(_LENGTH, "big"), data)
        body = b"".join(parts)
        sock: _socket.socket | None = None
        try:
            sock = self._take()
            timeout = _COUNT_SECONDS + len(body) / 1e6
            sock.settimeout(timeout)
            sock.sendall(len(body).to_bytes(_LENGTH, "big") + body)
            size = _LENGTH * len(texts)
            first = _first_bytes(sock, timeout, size)
            answer = first + _recv_exact(sock, size - len(first))
        except (OSError, EOFError) as exc:  # refused, reset, timed out, closed
            self._fail(sock, exc)
            return None
        self._idle.append(sock)
        return [int.from_bytes(answer[at:at + _LENGTH], "big")
                for at in range(0, size, _LENGTH)]

    def _take(self) -> _socket.socket:
        try:
            return self._idle.pop()
        except IndexError:  # none idle (or another thread took the last): a new one
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(_CONNECT_SECONDS)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def _fail(self, sock: _socket.socket | None, exc: BaseException) -> None:
        if not self.failed:
            log.warning("the tokenizer process at %s did not answer (%s): this worker "
                        "builds its own encodings", self.path, exc)
        self.failed = True
        for s in [*self._idle, *([sock] if sock is not None else [])]:
            s.close()
        self._idle.clear()


def _first_bytes(sock: _socket.socket, timeout: float, size: int) -> bytes:
    """The answer's first bytes, waited for blocking at first (they come in tens of us: no
    greenlet switch), then, if the process is slow to answer (a busy machine), in
    select.select, which gevent makes cooperative in a worker: its other calls run meanwhile.
    """
    sock.settimeout(_BLOCKING_SECONDS)
    try:
        first: bytes | None = sock.recv(size)
    except TimeoutError:
        first = None
    finally:
        sock.settimeout(timeout)
    if first is None:
        select.select([sock.fileno()], [], [], timeout)
        return b""
    if not first:
        raise EOFError("the tokenizer process closed the connection")
    return first


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the tokenizer process closed the connection")
        buf += chunk
    return bytes(buf)


class RemoteTokenizer:
    """A Tokenizer that counts in the tokenizer process, or, once that did not answer, with
    the worker's own encoding (built then, once)."""

    def __init__(self, client: TokenClient, encoding: str,
                 local: Callable[[], Tokenizer]) -> None:
        self.client, self.encoding, self._local = client, encoding, local

    def count(self, text: str) -> int:
        return self.count_all([text]) if isinstance(text, str) else 0

    def count_all(self, texts: Sequence[str]) -> int:
        return sum(self.counts(texts))

    def counts(self, texts: Sequence[str]) -> list[int]:
        counted = self.client.counts(self.encoding, texts)
        return counted if counted is not None else self._local().counts(texts)


def count_in_process(registry: TokenizerRegistry, path: str) -> None:
    """Have `registry` count in the tokenizer process listening at `path`."""
    client = TokenClient(path)
    registry.count_elsewhere(lambda name, local: RemoteTokenizer(client, name, local))


# -- the process ---------------------------------------------------------------------------

class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        while True:
            try:
                header = _recv_exact(sock, _LENGTH)
                body = _recv_exact(sock, int.from_bytes(header, "big"))
            except (OSError, EOFError):
                return
            if not body or not body[0] & _EACH or body[0] - _EACH >= len(SUPPORTED_ENCODINGS):
                return  # not a frame of ours: the client sees the connection close
            tokenizer = self.server.registry.for_model("", SUPPORTED_ENCODINGS[body[0] - _EACH])
            try:
                counted = tokenizer.counts(list(_texts(body)))
            except ValueError:
                return  # a malformed frame
            try:
                sock.sendall(b"".join(n.to_bytes(_LENGTH, "big") for n in counted))
            except OSError:
                return


def _texts(body: bytes) -> Iterator[str]:
    at = 1
    while at < len(body):
        end = at + _LENGTH + int.from_bytes(body[at:at + _LENGTH], "big")
        if end > len(body):
            raise ValueError("a text runs past its frame")
        yield body[at + _LENGTH:end].decode("utf-8", "surrogatepass")
        at = end


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, listener: socket.socket, registry: TokenizerRegistry) -> None:
        self.registry = registry
        super().__init__(listener.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener


def run(fd: int, parent: int | None) -> None:
    """Answer counts on the listening socket `fd` until killed or `parent` (serve) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: serve stops it
    server = _Server(socket.socket(fileno=fd), TokenizerRegistry.load())  # built on first use
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while parent is None or os.getppid() == parent:
        time.sleep(1)


@contextlib.contextmanager
def tokenizer_beside() -> Iterator[int]:
    """The tokenizer process, a child of serve while the block runs (its pid); its socket's
    path is in the environment (MLANE_TOKENIZER_SOCKET) that the workers inherit."""
    folder = tempfile.mkdtemp(prefix="meterlane-tokenizer-")  # 0700; short: a socket's
    path = os.path.join(folder, "count.sock")  # path is at most 107 bytes
    # Bound and listening before the child starts: a worker's first connection waits in the
    # backlog rather than finding no socket yet.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(64)
        fd = listener.fileno()
        proc = subprocess.Popen([sys.executable, "-P", "-m", "metering.tokenserver",  # noqa: S603
                                 str(fd), str(os.getpid())], pass_fds=(fd,))
    os.environ[SOCKET_ENV] = path
    owner = os.getpid()
    try:
        yield proc.pid
    finally:
        # only in serve itself: a gunicorn worker forked inside the block leaves it too, as it
        # exits, and must not stop the process every other worker counts in
        if os.getpid() == owner:
            os.environ.pop(SOCKET_ENV, None)
            proc.terminate()
            proc.wait()
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - started by tokenizer_beside
    run(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
