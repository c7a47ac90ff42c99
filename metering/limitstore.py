"""Limit counters: the store contract, and the SQL store (the embedded default, no Redis).

A store knows nothing of plans or windows: the limits service resolves each limit of a call
into a `Check` (which counter, how much the call charges it, how large it may grow) and the
store applies all of a call's checks at once, all or nothing, under one lock per tag (an end
user, or an app for app-wide limits). The Redis store runs the same steps as Lua scripts;
the contract suite in tests/integration/test_limit_stores.py holds both to one behaviour.

Counter kinds:
- counter: a fixed period (its key names the period, so a new period starts from zero with
  no job); gauge: a counter without period (concurrent requests);
- rolling: one sub-counter per slot; a slot counts until it has wholly left the span;
- bucket: a token bucket kept as (level x interval_ms, last refill time), exact in integers.

A lease records what each check was charged. Settling applies (actual - charged), release
applies -charged, and a lease past its expiry is released by the next operation on its tag
(no job needed). Settle, release and commit are idempotent per lease or event id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

DONE_TTL_MS = 3600 * 1000  # settle / release / commit answers are remembered this long
SWEEP_BATCH = 100


@dataclass(frozen=True)
class Check:
    """One limit as it applies to one call."""

    key: str             # the counter, unique within its tag
    kind: str            # counter | gauge | rolling | bucket
    metric: str          # what settles it: t(okens), w(eighted tokens: credits), r(equests),
    #                      c(ost), g(auge)
    amount: int          # the limit
    fixed: int           # charge that does not depend on output tokens (prompt, 1 request)
    per_out: int         # charge per output token
    expires_ms: int = 0  # counter: when its key may be dropped (0: never)
    slot_ms: int = 0     # rolling: slot length, slots in the span, the current slot
    slots: int = 0
    slot: int = 0
    refill: int = 0      # bucket: tokens added per interval
    interval_ms: int = 0

    def wire(self) -> dict[str, Any]:
        return dict(self.__dict__)  # every field is a scalar: no need for asdict's deep copy


@dataclass(frozen=True)
class CheckState:
    used: int                      # in use, reservations included
    remaining: int                 # amount - used (negative after an overrun)
    oldest_slot: int | None = None  # rolling: the oldest slot still holding usage


@dataclass(frozen=True)
class Reservation:
    granted: bool
    out: int                        # output tokens granted (clipped), when granted
    refused: int | None             # index of the check that refused, when not
    states: tuple[CheckState, ...]  # after the charge when granted, before it when not


@dataclass(frozen=True)
class Actual:
    """What a call really used, in the units checks count."""

    tokens: int
    cost: int = 0
    credits: int | None = None  # tokens x the credit multiplier of the model's tier

    def charge(self, check: dict[str, Any] | Check, charged: int) -> int:
        metric = check["metric"] if isinstance(check, dict) else check.metric
        if metric == "t":
            return self.tokens
        if metric == "w":
            return self.tokens if self.credits is None else self.credits
        if metric == "c":
            return self.cost
        if metric == "r":
            return charged  # a request that ran stays counted
        return 0            # a concurrency slot is freed


@dataclass(frozen=True)
class Settlement:
    outcome: str  # settled | released | expired | unknown | already_settled | already_released
    actual: dict[str, int] | None = None  # what an earlier settle recorded


class LimitStore(Protocol):
    # True when settle_many costs one round trip for the whole batch.
    batches: bool

    def reserve(self, tag: str, lease_id: str, checks: list[Check], *, now_ms: int,
                expires_ms: int, want_out: int, min_out: int, clip: bool,
                meta: dict[str, Any]) -> Reservation: ...

    def settle(self, tag: str, lease_id: str, actual: Actual | None, *, now_ms: int,
               remember_ms: int = DONE_TTL_MS) -> Settlement: ...

    def settle_many(self, items: list[tuple[str, str, Actual | None]], *, now_ms: int,
                    remember_ms: int = DONE_TTL_MS) -> list[Settlement]: ...

    def lease_meta(self, tag: str, lease_id: str) -> dict[str, Any] | None: ...

    def renew(self, tag: str, lease_id: str, *, now_ms: int, expires_ms: int) -> bool: ...

    def peek(self, tag: str, checks: list[Check], *, now_ms: int) -> tuple[CheckState, ...]: ...

    def commit(self, tag: str, event_id: str, checks: list[Check], actual: Actual, *,
               now_ms: int) -> bool: ...

    def commit_many(self, items: list[tuple[str, str, list[Check], Actual]], *,
                    now_ms: int) -> list[bool]: ...

    def peek_many(self, items: list[tuple[str, list[Check]]], *, now_ms: int
                  ) -> list[tuple[CheckState, ...]]: ...

    def overwrite(self, tag: str, values: list[tuple[Check, int]], *, now_ms: int) -> None: ...

    def ping(self) -> None: ...


# -- the algorithm, on a tag's counters held in memory -------------------------------------

Row = list[int]  # [value, ts, expires_ms]


class _Counters:
    """A tag's counters inside one transaction: {(key, slot): [value, ts, expires_ms]}."""

    def __init__(self, rows: dict[tuple[str, int], Row], now: int) -> None:
        self.rows = rows
        self.now = now
        self.dirty: set[tuple[str, int]] = set()
        self.gone: set[tuple[str, int]] = set()

    def _set(self, k: tuple[str, int], row: Row) -> None:
        self.rows[k] = row
        self.dirty.add(k)
        self.gone.discard(k)

    def _drop(self, k: tuple[str, int]) -> None:
        if self.rows.pop(k, None) is not None:
            self.gone.add(k)
        self.dirty.discard(k)

    def state(self, c: dict[str, Any]) -> CheckState:
        kind, key, amount = c["kind"], c["key"], c["amount"]
        if kind in ("counter", "gauge"):
            row = self.rows.get((key, 0))
            used = row[0] if row else 0
            return CheckState(used, amount - used)
        if kind == "rolling":
            low = c["slot"] - c["slots"] + 1
            used, oldest = 0, None
            for (k, slot), row in list(self.rows.items()):
                if k != key:
                    continue
                if slot < low:
                    self._drop((k, slot))
                    continue
                used += row[0]
                if row[0] > 0 and (oldest is None or slot < oldest):
                    oldest = slot
            return CheckState(used, amount - used, oldest)
        level = self._bucket_level(c)
        tokens = level // c["interval_ms"]
        return CheckState(amount - tokens, tokens)

    def _bucket_level(self, c: dict[str, Any]) -> int:
        cap = int(c["amount"]) * int(c["interval_ms"])
        row = self.rows.get((c["key"], 0))
        if row is None:
            return cap
        level, ts = int(row[0]), int(row[1])
        if self.now > ts:
            level = min(cap, level + (self.now - ts) * int(c["refill"]))
        return level

    def apply(self, c: dict[str, Any], slot: int, delta: int) -> None:
        if delta == 0:
            return
        kind, key = c["kind"], c["key"]
        if kind in ("counter", "gauge"):
            row = self.rows.get((key, 0))
            if row is None and delta < 0:
                return  # its period is over: nothing to give back
            value = (row[0] if row else 0) + delta
            if kind == "gauge" and value <= 0:
                self._drop((key, 0))
                return
            self._set((key, 0), [value, 0, c["expires_ms"]])
        elif kind == "rolling":
            row = self.rows.get((key, slot))
            if row is None and delta < 0:
                return  # the slot has left the span
            expires = (slot + c["slots"] + 1) * c["slot_ms"]
            self._set((key, slot), [(row[0] if row else 0) + delta, 0, expires])
        else:
            cap = c["amount"] * c["interval_ms"]
            level = self._bucket_level(c) - delta * c["interval_ms"]
            level = min(cap, level)
            if level >= cap:
                self._drop((key, 0))  # a full bucket is the same as no row
                return
            full_at = self.now + (cap - level) // c["refill"] + 1
            self._set((key, 0), [level, self.now, full_at])


def reserve_in(counters: _Counters, checks: list[dict[str, Any]], want_out: int,
               min_out: int, clip: bool) -> tuple[Reservation, list[dict[str, Any]]]:
    """The reservation step; returns the charges to keep on the lease when granted."""
    grant, binding = want_out, None
    states = []
    for i, c in enumerate(checks):
        st = counters.state(c)
        states.append(st)
        avail = st.remaining
        if c["per_out"] > 0:
            cap_out = (avail - c["fixed"]) // c["per_out"]
        else:
            cap_out = want_out if avail >= c["fixed"] else -1
        if cap_out < grant:
            grant, binding = cap_out, i
    if grant < min_out or (not clip and grant < want_out):
        return Reservation(False, 0, binding, tuple(states)), []
    charges, after = [], []
    for c, st in zip(checks, states, strict=True):
        charge = c["fixed"] + c["per_out"] * grant
        counters.apply(c, c["slot"], charge)
        charges.append({**c, "charged": charge})
        oldest = st.oldest_slot
        if oldest is None and charge > 0 and c["kind"] == "rolling":
            oldest = c["slot"]
        after.append(CheckState(st.used + charge, st.remaining - charge, oldest))
    return Reservation(True, grant, None, tuple(after)), charges


# -- the SQL store ------------------------------------------------------------------------


class SqlLimitStore:
    """Counters in `limit_counters`, leases in `limit_leases`; one transaction per step,
    serialised per tag (Postgres: an advisory lock; SQLite: BEGIN IMMEDIATE)."""

    batches = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    @contextmanager
    def _tx(self, tag: str, now: int) -> Iterator[tuple[Connection, _Counters]]:
        if self.sqlite:
            with self._auto.connect() as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    counters = self._load(conn, tag, now)
                    yield conn, counters
                    self._flush(conn, tag, counters)
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
            return
        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:t, 0))"),
                         {"t": tag})
            counters = self._load(conn, tag, now)
            yield conn, counters
            self._flush(conn, tag, counters)

    @staticmethod
    def _load(conn: Connection, tag: str, now: int) -> _Counters:
        rows = {}
        stale = []
        for key, slot, value, ts, expires in conn.execute(text(
                "SELECT key, slot, value, ts, expires_ms FROM limit_counters WHERE tag = :t"),
                {"t": tag}):
            if expires and expires <= now:
                stale.append((key, slot))
            else:
                rows[(key, slot)] = [value, ts, expires]
        counters = _Counters(rows, now)
        counters.gone.update(stale)
        return counters

    def _flush(self, conn: Connection, tag: str, counters: _Counters) -> None:
        if counters.gone:
            conn.execute(text("DELETE FROM limit_counters WHERE tag = :t AND key = :k "
                              "AND slot = :s"),
                         [{"t": tag, "k": k, "s": s} for k, s in counters.gone])
        if counters.dirty:
            conn.execute(text(
                "INSERT INTO limit_counters (tag, key, slot, value, ts, expires_ms) "
                "VALUES (:t, :k, :s, :v, :ts, :x) ON CONFLICT (tag, key, slot) DO UPDATE SET "
                "value = excluded.value, ts = excluded.ts, expires_ms = excluded.expires_ms"),
                [{"t": tag, "k": k, "s": s, "v": counters.rows[(k, s)][0],
                  "ts": counters.rows[(k, s)][1], "x": counters.rows[(k, s)][2]}
                 for k, s in counters.dirty])

    def _sweep(self, conn: Connection, tag: str, counters: _Counters) -> None:
        """Release leases past their expiry, and forget old answers."""
        now = counters.now
        expired = conn.execute(text(
            "SELECT id, body FROM limit_leases WHERE tag = :t AND state = 'active' "
            "AND expires_ms <= :n ORDER BY expires_ms LIMIT :lim"),
            {"t": tag, "n": now, "lim": SWEEP_BATCH}).all()
        for _lease_id, body in expired:
            for ch in json.loads(body)["charges"]:
                counters.apply(ch, ch["slot"], -ch["charged"])
        if expired:
            conn.execute(text("UPDATE limit_leases SET state = 'expired', expires_ms = :k "
                              "WHERE tag = :t AND id = :i"),
                         [{"t": tag, "i": lease_id, "k": now + DONE_TTL_MS}
                          for lease_id, _ in expired])
        conn.execute(text("DELETE FROM limit_leases WHERE tag = :t AND state <> 'active' "
                          "AND expires_ms <= :n"), {"t": tag, "n": now})

    def reserve(self, tag: str, lease_id: str, checks: list[Check], *, now_ms: int,
                expires_ms: int, want_out: int, min_out: int, clip: bool,
                meta: dict[str, Any]) -> Reservation:
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            taken = conn.execute(text("SELECT 1 FROM limit_leases WHERE tag = :t AND id = :i"),
                                 {"t": tag, "i": lease_id}).first()
            if taken:
                raise ValueError(f"lease id {lease_id} was already used")
            result, charges = reserve_in(counters, [c.wire() for c in checks], want_out,
                                         min_out, clip)
            if result.granted:
                conn.execute(text(
                    "INSERT INTO limit_leases (tag, id, state, expires_ms, body) "
                    "VALUES (:t, :i, 'active', :x, :b)"),
                    {"t": tag, "i": lease_id, "x": expires_ms,
                     "b": json.dumps({"charges": charges, "meta": meta})})
        return result

    def renew(self, tag: str, lease_id: str, *, now_ms: int, expires_ms: int) -> bool:
        """Push an active lease's expiry out (its call still runs); False when it is no
        longer active (settled, released, or already expired and swept)."""
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            moved = conn.execute(text(
                "UPDATE limit_leases SET expires_ms = :x WHERE tag = :t AND id = :i "
                "AND state = 'active'"), {"x": expires_ms, "t": tag, "i": lease_id}).rowcount
        return bool(moved)

    def settle(self, tag: str, lease_id: str, actual: Actual | None, *, now_ms: int,
               remember_ms: int = DONE_TTL_MS) -> Settlement:
        """Apply the real usage (None: release it all). The answer is remembered for
        `remember_ms` so a repeat gets it again; 0 remembers nothing (the gateway settles
        its own leases exactly once)."""
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            row = conn.execute(text("SELECT state, body FROM limit_leases WHERE tag = :t "
                                    "AND id = :i"), {"t": tag, "i": lease_id}).first()
            if row is None:
                return Settlement("unknown")
            state, body = row
            doc = json.loads(body)
            if state != "active":
                return Settlement(state if state == "expired" else f"already_{state}",
                                  doc.get("actual"))
            recorded = None
            for ch in doc["charges"]:
                real = actual.charge(ch, ch["charged"]) if actual else 0
                counters.apply(ch, ch["slot"], real - ch["charged"])
            if actual is not None:
                recorded = {"tokens": actual.tokens, "cost": actual.cost,
                            "credits": actual.charge({"metric": "w"}, 0)}
            outcome = "settled" if actual is not None else "released"
            if remember_ms <= 0:
                conn.execute(text("DELETE FROM limit_leases WHERE tag = :t AND id = :i"),
                             {"t": tag, "i": lease_id})
            else:
                conn.execute(text("UPDATE limit_leases SET state = :s, expires_ms = :k, "
                                  "body = :b WHERE tag = :t AND id = :i"),
                             {"s": outcome, "k": now_ms + remember_ms, "t": tag, "i": lease_id,
                              "b": json.dumps({"meta": doc["meta"], "actual": recorded})})
        return Settlement(outcome, recorded)

    def settle_many(self, items: list[tuple[str, str, Actual | None]], *, now_ms: int,
                    remember_ms: int = DONE_TTL_MS) -> list[Settlement]:
        return [self.settle(tag, lease_id, actual, now_ms=now_ms, remember_ms=remember_ms)
                for tag, lease_id, actual in items]

    def lease_meta(self, tag: str, lease_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            body = conn.execute(text("SELECT body FROM limit_leases WHERE tag = :t AND id = :i"),
                                {"t": tag, "i": lease_id}).scalar_one_or_none()
        if body is None:
            return None
        meta: dict[str, Any] = json.loads(body)["meta"]
        return meta

    def peek(self, tag: str, checks: list[Check], *, now_ms: int) -> tuple[CheckState, ...]:
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            return tuple(counters.state(c.wire()) for c in checks)

    def commit(self, tag: str, event_id: str, checks: list[Check], actual: Actual, *,
               now_ms: int) -> bool:
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            seen = conn.execute(text("SELECT 1 FROM limit_leases WHERE tag = :t AND id = :i"),
                                {"t": tag, "i": event_id}).first()
            if seen:
                return False
            for c in checks:
                wire = c.wire()
                counters.state(wire)  # prunes rolling slots that left the span
                counters.apply(wire, c.slot, actual.charge(wire, c.fixed))
            conn.execute(text("INSERT INTO limit_leases (tag, id, state, expires_ms, body) "
                              "VALUES (:t, :i, 'committed', :x, '{}')"),
                         {"t": tag, "i": event_id, "x": now_ms + DONE_TTL_MS})
        return True

    def peek_many(self, items: list[tuple[str, list[Check]]], *, now_ms: int
                  ) -> list[tuple[CheckState, ...]]:
        return [self.peek(tag, checks, now_ms=now_ms) for tag, checks in items]

    def commit_many(self, items: list[tuple[str, str, list[Check], Actual]], *,
                    now_ms: int) -> list[bool]:
        return [self.commit(tag, event_id, checks, actual, now_ms=now_ms)
                for tag, event_id, checks, actual in items]

    def overwrite(self, tag: str, values: list[tuple[Check, int]], *, now_ms: int) -> None:
        """Set counters to values rebuilt from the ledger, plus what active leases hold."""
        with self._tx(tag, now_ms) as (conn, counters):
            self._sweep(conn, tag, counters)
            keys = {check.key: check.wire() for check, _ in values if check.kind != "bucket"}
            for k in [k for k in counters.rows if k[0] in keys]:
                counters._drop(k)
            for (body,) in conn.execute(text("SELECT body FROM limit_leases WHERE tag = :t "
                                             "AND state = 'active'"), {"t": tag}):
                for ch in json.loads(body)["charges"]:
                    if ch["key"] in keys:
                        counters.apply(ch, ch["slot"] if ch["kind"] == "rolling" else 0,
                                       ch["charged"])
            for check, value in values:
                if check.kind != "bucket":
                    counters.apply(check.wire(), check.slot if check.kind == "rolling" else 0,
                                   value)
