"""Allowances of [[meters]] meters: each meter event counted against the plan's allowance of
its meter in the billing cycle it is counted in (when received, as the meter's limits count
it), in the transaction that records the event; what passes the allowance is overage, billed
at the plan version's price per unit (plans/meter_stripe.py sends it to Stripe).

A late event (it occurred in a cycle already closed) counts in the open cycle, stamped at
that cycle's start at the earliest: never into an invoice already closed, as token overage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from plans.models import MeterCycleUse, MeterOverage
from plans.service import Assignment
from plans.windows import parse_window, period_of

_CYCLE = parse_window("cycle", "UTC")
_U, _O = MeterCycleUse, MeterOverage


@dataclass(frozen=True)
class MeterEventIn:
    """A meter event as the metering package records it."""

    id: int
    app_id: int
    end_user_id: int
    meter: str
    units_micro: int
    occurred_at: datetime
    received_at: datetime


def account_in(conn: Connection, assignment: Assignment, event: MeterEventIn) -> int:
    """Count the event against the plan's allowance of its meter, in the caller's transaction
    (the one that records it: counted exactly once); returns its overage in micro-units (0:
    within the allowance, or the plan has none of this meter). The cycle's row is locked, so
    concurrent events of one user and meter split the allowance exactly."""
    allowance = assignment.plan.terms.meter(event.meter)
    if allowance is None:
        return 0
    start = period_of(_CYCLE, event.received_at, assignment.anchored_at).start
    key = (_U.end_user_id == event.end_user_id, _U.meter_id == event.meter,
           _U.cycle_start == start)
    used = conn.execute(select(_U.used_micro).where(*key).with_for_update()).scalar()
    if used is None:  # the cycle's first event (or one of the first, at once: one row wins)
        upsert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)
        conn.execute(upsert(_U).values(end_user_id=event.end_user_id, meter_id=event.meter,
                                       cycle_start=start, used_micro=0)
                     .on_conflict_do_nothing())
        used = conn.execute(select(_U.used_micro).where(*key).with_for_update()).scalar_one()
    conn.execute(update(_U).where(*key).values(used_micro=used + event.units_micro))
    over = event.units_micro - min(event.units_micro, max(0, allowance.included - used))
    if over <= 0 or allowance.overage_price is None:
        return 0  # (past a hard-stop allowance only when the event was not enforced)
    price = assignment.plan.terms.price
    assert price is not None  # terms.py: meter overage needs a price
    conn.execute(insert(_O).values(
        meter_event_id=event.id, app_id=event.app_id, end_user_id=event.end_user_id,
        meter_id=event.meter, plan_id=assignment.plan.id,
        plan_version=assignment.plan.version, units_micro=over,
        price_minor=str(allowance.overage_price), currency=price.currency,
        happened_at=min(max(event.occurred_at, start), event.received_at)))
    return over


@dataclass(frozen=True)
class MeterCycle:
    """An end user's allowance of a meter in the current billing cycle."""

    meter: str
    included: int             # micro-units
    used: int                 # micro-units counted in the cycle (within the allowance or not)
    overage: int              # micro-units billed as overage
    overage_minor: Decimal    # what that overage costs, minor units of `currency` (exact)
    currency: str | None
    overage_price: Decimal | None
    cycle_start: datetime
    cycle_end: datetime


def cycles_of(engine: Engine, end_user_id: int, assignment: Assignment,
              now: datetime) -> list[MeterCycle]:
    """Each meter the user's plan includes: allowance, used and overage of the open cycle."""
    terms = assignment.plan.terms
    if not terms.meters:
        return []
    cycle = period_of(_CYCLE, now, assignment.anchored_at)
    with engine.connect() as conn:
        used = dict(conn.execute(select(_U.meter_id, _U.used_micro).where(
            _U.end_user_id == end_user_id, _U.cycle_start == cycle.start)).all())
        rows = conn.execute(select(_O.meter_id, _O.units_micro, _O.price_minor).where(
            _O.end_user_id == end_user_id, _O.happened_at >= cycle.start,
            _O.happened_at < cycle.end)).all()
    over: dict[str, tuple[int, Decimal]] = {}
    for meter_id, units, price in rows:
        n, minor = over.get(meter_id, (0, Decimal(0)))
        over[meter_id] = (n + int(units), minor + Decimal(price) * int(units) / 10**6)
    currency = terms.price.currency if terms.price else None
    return [MeterCycle(m.meter, m.included, int(used.get(m.meter, 0)),
                       over.get(m.meter, (0, Decimal(0)))[0],
                       over.get(m.meter, (0, Decimal(0)))[1], currency, m.overage_price,
                       cycle.start, cycle.end) for m in terms.meters]


@dataclass(frozen=True)
class MeterRevenue:
    """Overage billed for a meter, summed for one group (plan, end user, meter or day)."""

    key: Any
    currency: str
    units_micro: int
    minor: Decimal  # exact minor units of `currency`


def meter_revenue(engine: Engine, app_id: int, start: datetime, end: datetime,
                  group_by: str | None = None) -> list[MeterRevenue]:
    """Finance's read of meter overage billed in [start, end) (by when it counts), per plan,
    end user, meter ("model": "meter:<id>"), day (a date) or all together (key None)."""
    column = {"plan": _O.plan_id, "user": _O.end_user_id, "model": _O.meter_id,
              "day": _O.happened_at, None: None}[group_by]
    keys = [column] if column is not None else []
    with engine.connect() as conn:
        rows = conn.execute(select(*keys, _O.currency, _O.price_minor,
                                   func.sum(_O.units_micro))
                            .where(_O.app_id == app_id, _O.happened_at >= start,
                                   _O.happened_at < end)
                            .group_by(*keys, _O.currency, _O.price_minor)).all()
    return list(_summed(rows, group_by))


def _summed(rows: Iterable[Any], group_by: str | None) -> Iterable[MeterRevenue]:
    found: dict[tuple[Any, str], tuple[int, Decimal]] = {}
    for row in rows:
        key: Any = row[0] if group_by else None
        if group_by == "model":
            key = f"meter:{key}"
        elif group_by == "day":
            key = key.date()
        units = int(row[-1])
        n, minor = found.get((key, row[-3]), (0, Decimal(0)))
        found[(key, row[-3])] = (n + units, minor + Decimal(row[-2]) * units / 10**6)
    for (key, currency), (units, minor) in found.items():
        yield MeterRevenue(key, currency, units, minor)
