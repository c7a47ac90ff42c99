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
    `with` block): shutdown(2) on a duplicate of the socket ends the connection itself, TLS
    or not, and whatever read or handshake waits on it ends at once. The duplicate is held
    until the block ends, so the timer never reaches a descriptor reused by another socket."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._watched: socket.socket | None = None  # a duplicate: the connection's own
        self._done = False
        self._mutex = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Cutoff:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._mutex:
            self._done = True
            watched, self._watched = self._watched, None
        self._timer.cancel()
        if watched is not None:
            watched.close()

    def watch(self, sock: socket.socket) -> None:
        """Watch the connection through a duplicate of its socket: the duplicate's descriptor
        stays this connection's until __exit__ closes it, even once the connection's own is
        closed (and its number reused by another socket)."""
        dup = sock.dup()
        with self._mutex:
            if self._done:
                dup.close()
                return
            old, self._watched = self._watched, dup
            if self.expired:
                self._shut()
        if old is not None:
            old.close()

    def _expire(self) -> None:
        with self._mutex:
            if self._done:
                return
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._watched is None:
            return
        try:
            self._watched.shutdown(socket.SHUT_RDWR)
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
