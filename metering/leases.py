"""A reservation's parts: the limits it applies (and where each stands), the lease that holds
them, and the store tags that name whose counters they are."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.config import ModelConfig, ModelPrice
from metering.limitstore import Check, CheckState, LimitStore
from metering.outage import store_errors
from metering.pricing import output_rate, rate_of
from plans.catalog import LimitSpec, Plan
from plans.windows import from_epoch_ms

log = logging.getLogger(__name__)
COUNTER_GRACE_MS = 60_000


@dataclass(frozen=True)
class Applied:
    """A limit as it applied to one call: the spec, its counter, and where it stands."""

    limit: LimitSpec
    tag: str
    check: Check
    state: CheckState | None = None

    def resets_at(self, now: datetime, need: int = 0) -> datetime | None:
        """When the counter frees up (its period ends, its oldest slot leaves the span, or the
        bucket holds `need` more); None for a gauge, which frees when calls end."""
        c = self.check
        if c.kind == "counter":
            return from_epoch_ms(c.expires_ms - COUNTER_GRACE_MS)
        if c.kind == "rolling":
            oldest = self.state.oldest_slot if self.state else None
            return from_epoch_ms((oldest + c.slots) * c.slot_ms) if oldest is not None else None
        if c.kind == "bucket":
            tokens = self.state.remaining if self.state else c.amount
            missing = (need or c.amount) - tokens
            if missing <= 0:
                return now
            return now + timedelta(milliseconds=-(-missing * c.interval_ms // c.refill))
        return None


@dataclass
class Lease:
    id: str
    plan: Plan
    model: str
    applied: list[Applied]
    out: int | None           # output tokens granted; None when no limit bounds them
    created: datetime
    fail_open: bool = False
    credits_per_token: int = 1  # the credit multiplier of the model's tier on the plan
    done: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    expires: datetime | None = None

    @property
    def tags(self) -> list[str]:
        return list(dict.fromkeys(a.tag for a in self.applied))


@dataclass(frozen=True)
class QuotaLine:
    limit: LimitSpec
    used: int
    remaining: int
    resets_at: datetime | None
    model: str | None


def user_tag(app_id: int, end_user_id: int) -> str:
    return f"u{app_id}.{end_user_id}"


def app_tag(app_id: int) -> str:
    return f"a{app_id}"


def lease_tags(lease_id: str) -> tuple[int, int, str] | None:
    """(app id, end user id, user tag) named by a lease id, or None if it is not one of ours."""
    try:
        prefix, app, user, _rand = lease_id.split("_", 3)
        if prefix != "ls":
            return None
        return int(app), int(user), user_tag(int(app), int(user))
    except ValueError:
        return None


def counter_key(limit: LimitSpec) -> str:
    """What a counter counts, independent of plan: metric, window (with its zone) and model."""
    w = limit.window
    zone = w.tz if w.kind == "calendar" and w.unit in ("day", "week", "month") else ""
    return f"{limit.metric}|{w.spec}|{zone}|{limit.model or '*'}"


def charges(limit: LimitSpec, model: ModelConfig | None, prompt_tokens: int,
            out_per_token: int, credits_per_token: int = 1,
            price: ModelPrice | None = None) -> tuple[int | None, int]:
    """(fixed charge, charge per output token) of one call on one limit; (None, 0) when the
    limit cannot apply (a cost limit on a model without a price)."""
    if limit.metric == "tokens":
        return prompt_tokens, out_per_token
    if limit.metric == "credits":
        return prompt_tokens * credits_per_token, out_per_token * credits_per_token
    if limit.metric == "cost_usd":
        if model is None:
            return 0, 0
        if price is None:
            return None, 0
        return prompt_tokens * rate_of(price.input), output_rate(price) * out_per_token
    return 1, 0


class Heartbeat:
    """Renews a running call's lease every `every` seconds until stopped, so that only a dead
    worker's lease expires (a stream or an agent's call may run longer than lease_seconds).
    One thread per process (a greenlet under gevent) beats for every running call, so a call
    only joins a table; a failed renewal is tried again at the next beat."""

    TICK = 0.25  # how late a beat may come, at most (every is a second or more)
    _running: dict[int, Heartbeat] = {}
    _lock = threading.Lock()
    _beater: tuple[int, threading.Thread] | None = None  # (its process, the thread)

    def __init__(self, renew: Callable[[], bool], every: float) -> None:
        self._renew = renew
        self._every = every
        self._due = time.monotonic() + every
        cls = type(self)
        with cls._lock:
            cls._running[id(self)] = self
            # The beater clears _beater as it ends: never Thread.is_alive() here, which under
            # gevent yields to the hub on every call (hundreds of us on a busy worker).
            if cls._beater is None or cls._beater[0] != os.getpid():
                thread = threading.Thread(target=cls._beat, daemon=True, name="lease-heartbeat")
                cls._beater = (os.getpid(), thread)  # (a forked worker starts its own)
                thread.start()

    @classmethod
    def _beat(cls) -> None:
        try:
            cls._beat_forever()
        finally:
            with cls._lock:
                if cls._beater is not None and cls._beater[1] is threading.current_thread():
                    cls._beater = None

    @classmethod
    def _beat_forever(cls) -> None:
        while True:
            time.sleep(cls.TICK)
            now = time.monotonic()
            with cls._lock:
                due = [beat for beat in cls._running.values() if beat._due <= now]
            for beat in due:
                beat._due = now + beat._every
                try:
                    if not beat._renew():  # settled, released or expired: nothing to keep
                        beat.stop()
                except Exception:  # noqa: BLE001 - the store is away: try again at the next beat
                    log.warning("renewing a lease failed; trying again in %.0f s", beat._every,
                                exc_info=True)

    def stop(self) -> None:
        with type(self)._lock:
            type(self)._running.pop(id(self), None)


class Unsettled:
    """The store tags of the leases this process has yet to settle after their answers went
    out. A client that makes its next call as soon as it has the last answer (the same
    connection, so this process) must find that answer counted at what it cost, not still
    held at its estimate, which would clip or refuse the next call for usage that never
    happened. So a call whose reservation on one of those tags was clipped or refused waits
    for them and reserves again; one that got all it asked for goes on at once (its quota
    headers may then show the last call still at its estimate, for the milliseconds until it
    is settled). A lease another process is settling is not waited for; its estimate is held
    for the few milliseconds it takes."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._changed = threading.Condition()

    def hold(self, tags: list[str]) -> None:
        with self._changed:
            self._count.update(tags)

    def done(self, tags: list[str]) -> None:
        with self._changed:
            self._count.subtract(tags)
            for tag in tags:
                if self._count[tag] <= 0:
                    del self._count[tag]
            self._changed.notify_all()

    def pending(self, tags: list[str]) -> bool:
        """Whether a lease on `tags` is still to be settled by this process."""
        return bool(self._count) and any(self._count[t] > 0 for t in tags)

    def wait(self, tags: list[str], timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until no lease on `tags` is left to settle."""
        if not self._count:  # the usual case: nothing queued, no lock taken
            return True
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(self._count[t] > 0 for t in tags), timeout)


def reserve_tags(store: LimitStore, lease: Lease, tags: list[str], reserved: list[str],
                 now_ms: int, expires: int, want_out: int, min_out: int
                 ) -> tuple[int, Applied | None]:
    """Reserve the lease's checks on each tag in turn (each tag reserved goes to `reserved`;
    `lease.applied` gets each check's state): the output granted, and the limit that refused
    (None: every tag granted)."""
    applied, grant = lease.applied, want_out
    for tag in tags:
        at = [i for i, a in enumerate(applied) if a.tag == tag]
        group = [applied[i] for i in at]
        with store_errors():
            result = store.reserve(
                tag, lease.id, [a.check for a in group], now_ms=now_ms, expires_ms=expires,
                want_out=grant, min_out=min_out, clip=lease.plan.on_limit == "clip",
                meta=lease.meta)
        for i, a, state in zip(at, group, result.states, strict=True):
            applied[i] = Applied(a.limit, a.tag, a.check, state)
        if not result.granted:
            idx = result.refused if result.refused is not None else 0
            return grant, Applied(group[idx].limit, tag, group[idx].check, result.states[idx])
        reserved.append(tag)
        grant = min(grant, result.out)
    return grant, None
