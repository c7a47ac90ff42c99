"""A deadline for a whole HTTP exchange (urllib3), connect to answer: a server trickling its
answer a byte at a time never trips a per-read timeout, so a timer shuts the socket down
when the time is up (a webhook receiver must not hold the webhooks job for minutes)."""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection


class DeadlineError(urllib3.exceptions.TimeoutError):
    """The exchange did not end within its deadline."""


class Cutoff:
    """Shuts down the socket it watches once `seconds` have passed since it was entered (a
    `with` block): shutdown(2) on a duplicate of the descriptor ends the connection itself,
    TLS or not, and whatever read or handshake waits on it ends at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._watched: tuple[int, int, int] | None = None  # fd, family, type
        self._done = False
        self._mutex = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Cutoff:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._mutex:  # the socket is closed after this: its descriptor is never reused
            self._done = True
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._mutex:
            self._watched = (sock.fileno(), sock.family, sock.type)
            if self.expired:
                self._shut()

    def _expire(self) -> None:
        with self._mutex:
            if self._done:
                return
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._watched is None:
            return
        fd, family, kind = self._watched
        try:
            with socket.fromfd(fd, family, kind) as dup:
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the other side: nothing to end
            pass


class CutoffHTTPConnection(HTTPConnection):
    """An HTTP connection its pool's `cutoff` (a connection keyword) watches."""

    def __init__(self, *args: Any, cutoff: Cutoff, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cutoff = cutoff

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.cutoff.watch(sock)  # before a TLS handshake, which could trickle too
        return sock


class CutoffHTTPSConnection(HTTPSConnection):
    """As CutoffHTTPConnection, over TLS."""

    def __init__(self, *args: Any, cutoff: Cutoff, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cutoff = cutoff

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.cutoff.watch(sock)
        return sock
