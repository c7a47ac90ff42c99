"""A worker's short cache of database reads on the hot path, each entry read by one caller at
a time (single flight) and refreshed before it lapses."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core.background import background_runner

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Flight(Generic[V]):
    """One read under way; whoever asks for its key meanwhile waits for it (an Event: a
    greenlet's under gevent, which patches threading)."""

    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None
    dropped: bool = False  # forgotten while under way: its answer is handed out, never kept


class ReadCache(Generic[K, V]):
    """Values read from the database, each used for at most `ttl` seconds after its read
    began, then read again; never two reads of one key at once in this process.

    - No value, or one past `ttl`: the first caller reads; every caller arriving meanwhile
      waits for that read and gets its answer, or its exception (the database away: each
      fails as it would have failed with a read of its own, and no value past `ttl` is
      ever handed out: what depends on the bound, such as how soon a revoked key is
      refused in every worker, keeps it).
    - A value past half its `ttl`: it is still handed out (it is within its bound), and one
      read runs beside the calls (a greenlet under gevent, else inline) so that under load
      the value is renewed before it lapses and no call waits. If that read fails, it is
      logged and the value serves out its `ttl` (no second try before then: the
      database is away), as it would have without the refresh; after it, calls read and
      fail as they did before there was a cache.

    Stale values are never served past `ttl` while a refresh runs (README promises that a
    revoked key is refused by every worker within MLANE_KEY_CACHE_SECONDS): refreshing from
    half the `ttl` keeps calls from waiting just as well, for at most two reads of a busy
    key per `ttl` and worker. A caller that joins a read under way gets what that read
    saw: a change committed during the read (milliseconds) may be missed, as it would be
    by a read of its own.

    A read answering None is handed to its waiters but never kept (a key unknown or
    revoked: only what exists is cached, and a lookup that finds nothing drops the entry).
    `ttl` <= 0 caches nothing and shares nothing: every call reads (tests, and servers
    that must see every change at once). Each worker process has its own cache."""

    def __init__(self, name: str, ttl: float, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic,
                 background: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.name = name  # what it holds, for the log (never a key: some are secrets)
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._background = background or background_runner()
        # key -> (when its read began, value, may it be refreshed before it lapses)
        self._entries: dict[K, tuple[float, V, bool]] = {}
        self._flights: dict[K, _Flight[V]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # reads begun (metrics, tests)
        self.joined = 0  # calls answered by another call's read

    def get(self, key: K, read: Callable[[], V]) -> V:
        """The key's value: cached, or read once for every caller asking meanwhile."""
        if self.ttl <= 0:
            return read()
        now = self.clock()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            if hit[2] and now - hit[0] >= self.ttl / 2 and key not in self._flights:
                beside = self._refresh_beside(key, hit, read)
                if beside is not None and beside.done.is_set() and beside.error is None:
                    return beside.value  # type: ignore[return-value]  # (read inline)
            return hit[1]
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                self.joined += 1
        if leader:
            return self._fly(key, flight, read)
        flight.done.wait()
        if isinstance(flight.error, Exception):
            raise flight.error  # the leader's (as concurrent.futures hands one to each waiter)
        if flight.error is not None:  # the leader was stopped (GreenletExit): not our error
            return self.get(key, read)
        return flight.value  # type: ignore[return-value]

    def _fly(self, key: K, flight: _Flight[V], read: Callable[[], V]) -> V:
        began = self.clock()  # the bound counts from before the read: never longer
        with self._lock:
            self.reads += 1
        try:
            value = read()
        except BaseException as exc:  # handed to the waiters, then raised here as well
            flight.error = exc
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()
            raise
        flight.value = value
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.dropped:
                if value is None:
                    self._entries.pop(key, None)
                else:
                    if len(self._entries) >= self.max_entries:
                        self._entries.clear()
                    self._entries[key] = (began, value, True)
        flight.done.set()
        return value

    def _refresh_beside(self, key: K, hit: tuple[float, V, bool],
                        read: Callable[[], V]) -> _Flight[V] | None:
        with self._lock:
            if key in self._flights:
                return None
            flight: _Flight[V] = _Flight()
            self._flights[key] = flight

        def refresh() -> None:
            try:
                self._fly(key, flight, read)
            except Exception:  # noqa: BLE001 - the value read before holds until its ttl
                log.warning("could not refresh one of the cached %s; the value read before "
                            "serves until it lapses", self.name, exc_info=True)
                with self._lock:  # not again before it lapses (the database is away)
                    if self._entries.get(key) is hit:
                        self._entries[key] = (hit[0], hit[1], False)

        self._background(refresh)
        return flight

    def peek(self, key: K) -> V | None:
        """The key's value if cached and within its ttl (no read)."""
        hit = self._entries.get(key)
        if hit is None or self.clock() - hit[0] >= self.ttl:
            return None
        return hit[1]

    def put(self, key: K, value: V, began: float) -> None:
        """Keep a value read elsewhere (a batch read that began at `began`)."""
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (began, value, True)

    def drop(self, key: K) -> None:
        """Forget one key (see forget)."""
        with self._lock:
            self._entries.pop(key, None)
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.dropped = True

    def forget(self, match: Callable[[K], bool] | None = None) -> None:
        """Drop the entries whose key matches (all with no `match`), and make the reads
        under way for them hand their answer to their waiters without keeping it: a change
        this process made is seen by its very next call."""
        with self._lock:
            for key in [k for k in self._entries if match is None or match(k)]:
                del self._entries[key]
            for key in [k for k in self._flights if match is None or match(k)]:
                self._flights.pop(key).dropped = True
