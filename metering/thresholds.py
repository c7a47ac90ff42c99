"""Paywall cues from the limits engine: a quota refused, or a threshold of it crossed (pure).

The limits engine finds them (on a refusal; when a call settles, from the states its
reservation saw; after usage the metering API counted); the paywall records them once per
limit, threshold and period and tells the app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metering.leases import Applied
from metering.limits_text import utc_iso, value_of
from metering.limitstore import Actual, Check, CheckState
from plans.catalog import LimitSpec, Plan
from plans.windows import epoch_ms


@dataclass(frozen=True)
class LimitEvent:
    """A quota reached (a refusal) or a threshold of it crossed: what the paywall acts on."""

    app_id: int
    end_user_id: int
    plan: Plan
    limit: LimitSpec
    info: dict[str, Any]  # the limit as a 402 shows it (id, metric, window, used, limit, ...)
    used: int             # in the counter's units
    amount: int
    period: str           # names the limit's current period: one event per threshold and period
    threshold: int | None  # percent crossed; None for a refusal
    request_id: str = ""


# The paywall's hook: records the event and returns what a 402 carries about it (or None).
LimitHook = Callable[[LimitEvent], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Usage:
    """One limit's counter before and after a call's usage."""

    limit: LimitSpec
    check: Check
    before: int
    after: int
    resets_at: datetime | None


def limit_info(limit: LimitSpec, used: int, amount: int,
               resets: datetime | None) -> dict[str, Any]:
    """A limit as a 402 and a paywall event show it."""
    return {"id": limit.id, "metric": limit.metric, "window": limit.window.spec,
            "scope": limit.scope, "model": limit.model, "used": value_of(limit, used),
            "limit": value_of(limit, amount), "resets_at": utc_iso(resets) if resets else None}


def counter_period(check: Check, now: datetime) -> str:
    """A name for the check's current period: its end for a calendar counter, else the span
    that holds now (so a rolling window yields at most one event per threshold per span)."""
    if check.kind == "counter":
        return f"c{check.expires_ms}"
    span = max(check.slot_ms * check.slots, 1)
    return f"r{epoch_ms(now) // span}"


def crossed(app_id: int, end_user_id: int, plan: Plan, usages: list[Usage],
            thresholds: tuple[int, ...], now: datetime, request_id: str) -> list[LimitEvent]:
    """The thresholds (percents) of quotas that the usage went over."""
    out: list[LimitEvent] = []
    for u in usages:
        c = u.check
        # Percent of what the plan grants: an allowance's counter also holds the credits and
        # overage headroom beyond it, which are not "the quota".
        amount = min(c.amount, u.limit.amount) if u.limit.amount > 0 else c.amount
        if u.limit.is_rate or c.kind not in ("counter", "rolling") or amount <= 0:
            continue
        for pct in thresholds:
            if u.before * 100 < pct * amount <= u.after * 100:
                out.append(LimitEvent(app_id, end_user_id, plan, u.limit,
                                      limit_info(u.limit, u.after, amount, u.resets_at),
                                      u.after, amount, counter_period(c, now), pct, request_id))
    return out


def batch_usages(items: list[tuple[Actual, list[tuple[list[Applied], int]]]],
                 states: list[tuple[CheckState, ...]], now: datetime) -> list[list[Usage]]:
    """Where each item's counters stood before and after a batch of usage, from the states
    read after it (`states[i]` for the applied group that names i). A counter several items
    add to (a user-wide limit over two models, an app-wide one over two users) was before
    them all by their sum, and is reported once: each threshold it crossed, once."""
    total: dict[tuple[str, str], int] = {}
    for actual, parts in items:
        for group, _ in parts:
            for a in group:
                k = (a.tag, a.check.key)
                total[k] = total.get(k, 0) + actual.charge(a.check, a.check.fixed)
    done: set[tuple[str, str]] = set()
    out = []
    for _, parts in items:
        usages = []
        for group, at in parts:
            for a, st in zip(group, states[at], strict=True):
                k = (a.tag, a.check.key)
                if k in done:
                    continue
                done.add(k)
                usages.append(Usage(a.limit, a.check, st.used - total[k], st.used,
                                    Applied(a.limit, a.tag, a.check, st).resets_at(now)))
        out.append(usages)
    return out
