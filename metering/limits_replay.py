"""The ledger is the truth: count calls let through while the limit store was down, and
rebuild the counters of the current periods from the ledger."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from core.config import ModelConfig
from metering.leases import Applied, user_tag
from metering.limitstore import Actual, Check, LimitStore
from metering.models import MeterEvent, UsageEvent
from metering.outage import LimitStoreUnavailableError, store_errors
from metering.superseded import counting, meter_counting
from plans.catalog import Catalog
from plans.service import Assignment, PlanService
from plans.windows import epoch_ms, period_of


class LimitsEngine(Protocol):
    """What the replay reads of the limits engine (metering.limits.LimitsService)."""

    catalog: Catalog
    store: LimitStore
    plans: PlanService
    engine: Engine
    models: dict[str, ModelConfig]
    clock: Callable[[], datetime]
    catch_up_needed: threading.Event
    catching_up: threading.Lock

    def checks_for(self, app_id: int, end_user_id: int, assignment: Assignment,
                   model: ModelConfig | None, now: datetime, *, prompt_tokens: int = 0,
                   out_per_token: int = 1, extra: bool = True, meter: str | None = None,
                   meter_charge: int = 0) -> list[Applied]: ...


def catch_up(service: LimitsEngine) -> int:
    """Count in the store the calls that were let through while it was down."""
    if not service.catching_up.acquire(blocking=False):
        return 0
    try:
        service.catch_up_needed.clear()
        done = 0
        while True:  # 10,000 rows a pass, until none is left
            rows = list(_pending_rows(service))
            for row in rows:
                try:
                    if row.counts:  # (a row corrected meanwhile no longer counts)
                        count_event(service, row)
                except LimitStoreUnavailableError:
                    service.catch_up_needed.set()
                    return done
                with service.engine.begin() as conn:
                    conn.execute(update(UsageEvent).where(UsageEvent.id == row.id)
                                 .values(limits_pending=False))
                done += 1
            if len(rows) < 10_000:
                return done
    finally:
        service.catching_up.release()

def _pending_rows(service: LimitsEngine) -> Iterator[Any]:
    table = UsageEvent.__table__
    with service.engine.connect() as conn:
        rows = conn.execute(select(table, counting().label("counts"))
                            .where(table.c.limits_pending.is_(True))
                            .order_by(table.c.id).limit(10_000)).all()
    yield from rows

def count_event(service: LimitsEngine, row: Any) -> None:
    """Apply one ledger row to the counters of the periods it happened in (once)."""
    assignment = service.plans.plan_of(row.end_user_id)
    model = service.models.get(row.requested_model) or ModelConfig(
        row.requested_model, row.upstream or "", row.upstream_model or "")
    applied = service.checks_for(row.app_id, row.end_user_id, assignment, model,
                            row.created_at, prompt_tokens=row.input_tokens)
    tokens = row.input_tokens + row.output_tokens
    actual = Actual(tokens, row.cost_pico_usd or 0,
                    tokens * assignment.plan.terms.credits_per_token(model.tier))
    for tag in dict.fromkeys(a.tag for a in applied):
        group = [a.check for a in applied if a.tag == tag]
        with store_errors():
            service.store.commit(tag, f"ev:{row.app_id}:{row.idempotency_key}", group, actual,
                              now_ms=epoch_ms(service.clock()))


def rebuild(service: LimitsEngine, progress: Callable[[int], None] | None = None) -> int:
    """Set every counter of the current periods to what the ledger says (plus what live
    leases hold). Token buckets refill by themselves and are left as they are. Returns
    how many tags (end users and apps) were rebuilt."""
    now = service.clock()
    horizon = now - timedelta(days=32)
    for plan in service.catalog.plans:
        for limit in plan.limits:
            if limit.window.kind == "rolling":
                horizon = min(horizon, now - timedelta(seconds=limit.window.seconds))
    table = UsageEvent.__table__
    cols = table.c
    by_user: dict[tuple[int, int], list[Any]] = {}
    with service.engine.begin() as conn:
        # The rebuild counts calls let through while the store was down: no catch-up.
        conn.execute(update(UsageEvent).where(UsageEvent.limits_pending.is_(True))
                     .values(limits_pending=False))
    with service.engine.connect() as conn:
        for row in conn.execute(select(
                cols.app_id, cols.end_user_id, cols.requested_model, cols.created_at,
                cols.input_tokens, cols.output_tokens, cols.cost_pico_usd,
                cols.usage_source).where(cols.created_at >= horizon, counting())):
            by_user.setdefault((row.app_id, row.end_user_id), []).append(row)
        # Users with live counters but no recent rows are rebuilt to zero too.
        users = {(a, u) for a, u in conn.execute(select(cols.app_id, cols.end_user_id)
                                                 .distinct()
                                                 .where(cols.created_at >= horizon))}
        metered = _meter_rows(conn, horizon)
        users |= set(metered)
    by_app: dict[int, list[Any]] = {}
    for (app_id, _user), rows in by_user.items():
        by_app.setdefault(app_id, []).extend(rows)
    done = 0
    app_values: dict[str, list[tuple[Check, int]]] = {}
    for app_id, end_user_id in sorted(users):
        assignment = service.plans.plan_of(end_user_id)
        values: list[tuple[Check, int]] = []
        for a in service.checks_for(app_id, end_user_id, assignment, None, now, meter="*"):
            target = values if a.limit.scope == "user" else app_values.setdefault(a.tag, [])
            if a.limit.meter is not None:  # from the meter events (counted when received)
                events = metered.get((app_id, end_user_id), []) if a.limit.scope == "user" \
                    else [e for (app, _), rows in metered.items() if app == app_id
                          for e in rows]
                target.extend(_rebuilt_meter(a, assignment, events, now))
                continue
            rows = by_user.get((app_id, end_user_id), []) if a.limit.scope == "user" \
                else by_app.get(app_id, [])
            target.extend(_rebuilt(a, assignment, rows, now, service.models))
        with store_errors():
            service.store.overwrite(user_tag(app_id, end_user_id), values,
                                 now_ms=epoch_ms(now))
        done += 1
        if progress:
            progress(done)
    for tag, values in app_values.items():
        unique = list({(c.key, c.slot): (c, v) for c, v in values}.values())
        with store_errors():
            service.store.overwrite(tag, unique, now_ms=epoch_ms(now))
        done += 1
    return done


def _rebuilt(a: Applied, assignment: Assignment, rows: list[Any], now: datetime,
             models: dict[str, ModelConfig]) -> list[tuple[Check, int]]:
    """The values a check's counter should hold, from ledger rows."""
    terms = assignment.plan.terms

    def credits_of(model: str) -> int:
        config = models.get(model)
        return terms.credits_per_token(config.tier if config else "standard")

    limit, check = a.limit, a.check
    rows = [r for r in rows if limit.applies_to(r.requested_model) and r.usage_source != "none"]

    def amount(r: Any) -> int:
        if limit.metric == "tokens":
            return int(r.input_tokens + r.output_tokens)
        if limit.metric == "credits":
            return int(r.input_tokens + r.output_tokens) * credits_of(r.requested_model)
        if limit.metric == "cost_usd":
            return int(r.cost_pico_usd or 0)
        return 1

    if check.kind == "counter":
        period = period_of(limit.window, now, assignment.anchored_at
                           if limit.window.kind == "cycle" else None)
        return [(check, sum(amount(r) for r in rows if period.start <= r.created_at < period.end))]
    if check.kind == "rolling":
        low = check.slot - check.slots + 1
        slots: dict[int, int] = {}
        for r in rows:
            slot = epoch_ms(r.created_at) // check.slot_ms
            if low <= slot <= check.slot:
                slots[slot] = slots.get(slot, 0) + amount(r)
        return [(replace(check, slot=slot), value) for slot, value in sorted(slots.items())] or [
            (check, 0)]
    if check.kind == "gauge":
        return [(check, 0)]  # only live leases hold a concurrency slot
    return []


def _meter_rows(conn: Any, horizon: datetime) -> dict[tuple[int, int], list[Any]]:
    """Meter events received since `horizon`, per (app, end user)."""
    m = MeterEvent
    out: dict[tuple[int, int], list[Any]] = {}
    for row in conn.execute(select(m.app_id, m.end_user_id, m.meter_id, m.value_micro,
                                   m.received_at).where(m.received_at >= horizon,
                                                        meter_counting())):
        out.setdefault((row.app_id, row.end_user_id), []).append(row)
    return out


def _rebuilt_meter(a: Applied, assignment: Assignment, rows: list[Any],
                   now: datetime) -> list[tuple[Check, int]]:
    """The values a meter limit's counter should hold, from meter events (a count meter's
    events hold one unit each, so every meter's charge is its value)."""
    limit, check = a.limit, a.check
    rows = [r for r in rows if r.meter_id == limit.meter]
    if check.kind == "counter":
        period = period_of(limit.window, now, assignment.anchored_at
                           if limit.window.kind == "cycle" else None)
        return [(check, sum(int(r.value_micro) for r in rows
                            if period.start <= r.received_at < period.end))]
    if check.kind == "rolling":
        low = check.slot - check.slots + 1
        slots: dict[int, int] = {}
        for r in rows:
            slot = epoch_ms(r.received_at) // check.slot_ms
            if low <= slot <= check.slot:
                slots[slot] = slots.get(slot, 0) + int(r.value_micro)
        return [(replace(check, slot=slot), value) for slot, value in sorted(slots.items())] or [
            (check, 0)]
    return []  # a bucket refills by itself
