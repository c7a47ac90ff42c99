"""Roll-ups: the ledger summed per (app, end user, plan, model, UTC day), with each local GPU
hour's cost allocated to the calls served in it, and revenue spread over the days it pays for.

Idempotent: a day is always recomputed whole from the raw events (delete, then insert, in one
transaction), so a re-run changes nothing. Incremental: the days recomputed are those of the
events recorded since the last run (by event id, so a late event, replayed from the spool
with an old time, still lands in its day). Revenue is recomputed whole each run (one row per
invoice: small). Reports read only roll-ups."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from core.config import Config
from core.db import utcnow
from finance.models import GpuHour, RevenueDaily, RollupState, UsageDaily
from finance.prices import PriceBook
from metering import reads as ledger
from metering.pricing import TokenUsage, cost_pico_usd
from plans import revenue as revenue_events

log = logging.getLogger(__name__)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
OVERLAP = 500_000  # ids re-read each run (a minute at the fastest ingestion measured)
TOKEN_FIELDS = ledger.TOKEN_FIELDS


def allocate(total: int, weights: list[int]) -> list[int]:
    """Split an integer total by weights, exactly (largest remainder; ties to the first):
    the parts always sum to the total. No weight at all: equal parts."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    whole = sum(weights)
    parts = [total * w // whole for w in weights]
    left = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


@dataclass
class RollupRun:
    days: list[date]
    events_read_to: int
    revenue_rows: int


class Rollups:
    def __init__(self, engine: Engine, config: Config, prices: PriceBook,
                 plan_of: Callable[[int], str], clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.prices = prices
        self.plan_of = plan_of  # the plan of an event recorded without one (older rows)
        self.clock = clock
        self.local = {u.name: u.cost for u in config.upstreams if u.cost is not None}

    # -- the run ------------------------------------------------------------------------------

    def refresh(self, progress: Callable[[int, int], None] | None = None) -> RollupRun:
        """Recompute the days with events recorded since the last run, and the revenue."""
        with self.engine.connect() as conn:
            last = conn.execute(select(RollupState.last_id).where(
                RollupState.name == "usage")).scalar() or 0
            top = ledger.last_event_id(conn)
            # With new events, the last OVERLAP ids are read again: a row whose id was drawn
            # before the last run's top but committed after it (a concurrent writer) is not
            # left out of its day.
            # (SQLite gives ids under its write lock: they commit in order, no overlap needed)
            overlap = OVERLAP if self.engine.dialect.name == "postgresql" and top > last else 0
            days = ledger.days_with_events(conn, max(0, last - overlap), top)
        failed = []
        for n, d in enumerate(days, 1):
            try:
                self.rollup_day(d)
            except Exception:  # one bad day must not hold back the others
                log.exception("could not roll up %s; it is tried again on the next run", d)
                failed.append(d)
            if progress is not None:
                progress(n, len(days))
        revenue = self.rollup_revenue()
        # a failed day keeps the watermark where it was (its events come round again); the
        # run is still recorded, so that reports know the roll-ups exist
        mark = last if failed else top
        with self.engine.begin() as conn:
            moved = conn.execute(update(RollupState).where(RollupState.name == "usage")
                                 .values(last_id=mark, updated_at=self.clock())).rowcount
            if not moved:
                conn.execute(insert(RollupState).values(name="usage", last_id=mark,
                                                        updated_at=self.clock()))
        return RollupRun([d for d in days if d not in failed], mark, revenue)

    def rollup_day(self, d: date) -> int:
        """Recompute one UTC day; returns the rows written."""
        start, end = day_start(d), day_start(d) + DAY
        rows: dict[tuple[int, int, str, str], list[int]] = {}
        with self.engine.connect() as conn:
            for r in ledger.daily_groups(conn, start, end, list(self.local)):
                key = (int(r[0]), int(r[1]), r[2] or self.plan_of(int(r[1])), str(r[3]))
                values = [int(v or 0) for v in r[4:]]
                # calls, 5 token sums, cloud cost, local, shadow, unpriced
                now = values[:7] + [0, 0, values[7]]
                old = rows.get(key)
                rows[key] = now if old is None else [a + b for a, b in zip(old, now,
                                                                          strict=True)]
            hours = self._local_hours(conn, start, end) if self.local else []
        gpu_rows = []
        for hour in hours:
            gpu_rows.append(hour.row)
            for key, (local, shadow) in hour.shares.items():
                # (a call committed between the two reads: its usage comes with the next run)
                row = rows.setdefault(key, [0] * 10)
                row[7] += local
                row[8] += shadow
        names = ("calls", *TOKEN_FIELDS, "cloud_cost_pico", "local_cost_pico",
                 "shadow_cost_pico", "unpriced_calls")
        with self.engine.begin() as conn:
            conn.execute(delete(UsageDaily).where(UsageDaily.day == d))
            conn.execute(delete(GpuHour).where(GpuHour.hour >= start, GpuHour.hour < end))
            if rows:
                conn.execute(insert(UsageDaily), [
                    {"app_id": k[0], "end_user_id": k[1], "plan_id": k[2], "model": k[3],
                     "day": d, **dict(zip(names, v, strict=True))} for k, v in rows.items()])
            if gpu_rows:
                conn.execute(insert(GpuHour), gpu_rows)
        return len(rows)

    def _local_hours(self, conn: Connection, start: datetime, end: datetime) -> list[_Hour]:
        """Each hour a local upstream served calls in: its cost split over those calls' groups
        by tokens, and what the same tokens cost at the shadow model's price."""
        found: dict[tuple[str, datetime], dict[tuple[int, int, str, str], list[int]]] = \
            defaultdict(dict)
        for r in ledger.hourly_groups(conn, start, end, list(self.local)):
            hour = r[1]
            key = (int(r[2]), int(r[3]), r[4] or self.plan_of(int(r[3])), str(r[5]))
            values = [int(v or 0) for v in r[6:]]
            group = found[(str(r[0]), hour)]
            old = group.get(key)
            group[key] = values if old is None else [a + b for a, b in zip(old, values,
                                                                           strict=True)]
        out = []
        for (upstream, hour), groups in sorted(found.items()):
            cost = self.local[upstream]
            keys = sorted(groups)
            weights = [groups[k][1] + groups[k][4] for k in keys]  # input + output tokens
            parts = allocate(cost.hourly_pico, weights)
            shadow_price = (self.prices.price_at(cost.shadow_model, hour)
                            if cost.shadow_model else None)
            shares = {}
            for k, part in zip(keys, parts, strict=True):
                g = groups[k]
                shadow = 0
                if shadow_price is not None:
                    usage = TokenUsage(input_tokens=g[1], cached_input_tokens=g[2],
                                       cache_write_tokens=g[3], output_tokens=g[4],
                                       reasoning_tokens=g[5])
                    fee = shadow_price.request_fee
                    shadow = cost_pico_usd(usage, replace(shadow_price, request_fee=None))
                    if fee is not None:
                        shadow += int(fee * 10**12) * g[0]
                shares[k] = (part, shadow)
            out.append(_Hour({"upstream": upstream, "hour": hour, "cost_pico": cost.hourly_pico,
                              "allocated_pico": sum(parts),
                              "calls": sum(g[0] for g in groups.values()),
                              "tokens": sum(weights)}, shares))
        return out

    # -- revenue ------------------------------------------------------------------------------

    def rollup_revenue(self) -> int:
        """Spread every revenue event over the days it pays for (whole, each run)."""
        with self.engine.connect() as conn:
            events = revenue_events.all_events(conn)
        days: dict[tuple[int, int, str, str, date], int] = defaultdict(int)
        for e in events:
            plan = e.plan_id or self.plan_of(int(e.end_user_id))
            for d, amount in spread(int(e.amount), e.period_start, e.period_end,
                                    e.occurred_at):
                days[(int(e.app_id), int(e.end_user_id), plan, e.currency, d)] += amount
        with self.engine.begin() as conn:
            conn.execute(delete(RevenueDaily))
            if days:
                conn.execute(insert(RevenueDaily), [
                    {"app_id": k[0], "end_user_id": k[1], "plan_id": k[2], "currency": k[3],
                     "day": k[4], "amount": v} for k, v in days.items()])
        return len(days)


@dataclass
class _Hour:
    row: dict[str, Any]
    shares: dict[tuple[int, int, str, str], tuple[int, int]]


def spread(amount: int, start: datetime | None, end: datetime | None,
           occurred: datetime) -> Iterable[tuple[date, int]]:
    """An amount over the UTC days of [start, end) by the time in each (exact: the parts sum
    to the amount); without a service period (a credit pack, a refund), on the day it
    happened."""
    if start is None or end is None or end <= start:
        return [(occurred.date(), amount)]
    days, weights = [], []
    d = start.date()
    while day_start(d) < end:
        lo, hi = max(start, day_start(d)), min(end, day_start(d) + DAY)
        days.append(d)
        weights.append(int((hi - lo).total_seconds()))
        d += DAY
    sign = -1 if amount < 0 else 1
    return list(zip(days, [sign * p for p in allocate(abs(amount), weights)], strict=True))
