"""A limit store in the calling process's own memory (bench only, never the product's).

What the limits cost when no call leaves the worker: the counters are a dict, each step runs
the SQL store's own algorithm (metering.limitstore.reserve_in and _Counters) under a lock. It
is the ceiling of any design that keeps calls off Redis, such as a worker that reserves a
slice of a user's allowance ahead and grants calls from it in memory: such a worker does this
bookkeeping and more. It is right for one process only (the counters are nobody else's), keeps
no expiry, no remembered answers and no lease metadata, so it answers only what the gateway
asks on its hot path (the rest raises NotImplementedError). Its settles remember nothing:
the gateway settles each of its leases once (remember_ms=0). `bench/call_cpu.py --setup
postgres+memory` puts it in its app; `bench/hotpath.py --setups postgres-memlimits` runs
`meterlane serve` through bench/_memlimits_serve.py, which gives every worker its own."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from metering.limitstore import (
    Actual,
    Check,
    CheckState,
    Reservation,
    Settlement,
    _Counters,
    reserve_in,
)


class MemoryLimitStore:
    batches = True  # settle_soon queues and settles many at once, as with Redis

    def __init__(self) -> None:
        self.rows: dict[str, dict[tuple[str, int], list[int]]] = {}
        self.leases: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _counters(self, tag: str, now_ms: int) -> _Counters:
        return _Counters(self.rows.setdefault(tag, {}), now_ms)

    def ping(self) -> None:
        return None

    def reserve(self, tag: str, lease_id: str, checks: list[Check], *, now_ms: int,
                expires_ms: int, want_out: int, min_out: int, clip: bool,
                meta: dict[str, Any]) -> Reservation:
        with self._lock:
            result, charges = reserve_in(self._counters(tag, now_ms),
                                         [c.wire() for c in checks], want_out, min_out, clip)
            if result.granted:
                self.leases[(tag, lease_id)] = charges
        return result

    def settle(self, tag: str, lease_id: str, actual: Actual | None, *, now_ms: int,
               remember_ms: int = 0) -> Settlement:
        with self._lock:
            charges = self.leases.pop((tag, lease_id), None)
            if charges is None:
                return Settlement("unknown")
            counters = self._counters(tag, now_ms)
            for ch in charges:
                real = actual.charge(ch, ch["charged"]) if actual is not None else 0
                counters.apply(ch, ch["slot"], real - ch["charged"])
        return Settlement("settled" if actual is not None else "released")

    def settle_many(self, items: Iterable[tuple[str, str, Actual | None]], *, now_ms: int,
                    remember_ms: int = 0) -> list[Settlement]:
        return [self.settle(tag, lease_id, actual, now_ms=now_ms)
                for tag, lease_id, actual in items]

    def renew(self, tag: str, lease_id: str, *, now_ms: int, expires_ms: int) -> bool:
        return (tag, lease_id) in self.leases

    def peek(self, tag: str, checks: list[Check], *, now_ms: int) -> tuple[CheckState, ...]:
        with self._lock:
            counters = self._counters(tag, now_ms)
            return tuple(counters.state(c.wire()) for c in checks)

    def peek_many(self, items: list[tuple[str, list[Check]]], *, now_ms: int
                  ) -> list[tuple[CheckState, ...]]:
        return [self.peek(tag, checks, now_ms=now_ms) for tag, checks in items]

    def counted(self, metric: str) -> int:
        """What the counters of `metric` ("requests", "tokens") hold, every tag together."""
        return sum(row[0] for rows in self.rows.values() for (key, _), row in rows.items()
                   if key.startswith(f"{metric}|"))


    # Off the hot path: what the metering API, meter events and a rebuild ask. A bench that
    # reaches one of them measures something else, so each says so at once.
    def lease_meta(self, tag: str, lease_id: str) -> dict[str, Any] | None:
        raise NotImplementedError("bench/_memlimits.py keeps no lease metadata")

    def commit(self, *args: Any, **kwargs: Any) -> bool:
        raise NotImplementedError("bench/_memlimits.py counts reservations only")

    def commit_many(self, *args: Any, **kwargs: Any) -> list[bool]:
        raise NotImplementedError("bench/_memlimits.py counts reservations only")

    def overwrite(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("bench/_memlimits.py is never rebuilt")
