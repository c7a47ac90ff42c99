"""Finance reports, read from the roll-ups only: the summary of a period (revenue, inference
cost cloud and local, gross margin, active users, cost and revenue per active user), margins
grouped by plan, model, user or day, and local GPUs against cloud prices.

Money is integer pico-USD until it is shown (exact decimal strings); revenue in another
currency is converted at the configured rate ([finance] usd_per) per roll-up row, so that a
report's totals are exactly the sum of its rows."""

from __future__ import annotations

import calendar
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from core.config import Config
from core.db import utcnow
from core.errors import InvalidRequestError
from core.models import EndUser
from core.pagination import page_of
from finance.models import GpuHour, RevenueDaily, UsageDaily
from metering.meters import meter_costs
from metering.pricing import pico_to_usd
from plans.meter_overage import meter_revenue
from plans.terms import minor_exponent

GROUPS = ("plan", "model", "user", "day")
PICO = 10**12


@dataclass(frozen=True)
class Period:
    label: str
    start: date  # first day
    end: date    # the day after the last

    @property
    def days(self) -> int:
        return (self.end - self.start).days


def parse_period(text: str | None) -> Period:
    """"2026-11" (a month), "2026-11-03" (a day) or "2026-11-03..2026-11-09" (days, both
    included)."""
    value = (text or "").strip()
    try:
        if m := re.fullmatch(r"(\d{4})-(\d{2})", value):
            year, month = int(m[1]), int(m[2])
            first = date(year, month, 1)
            return Period(value, first, first + timedelta(
                days=calendar.monthrange(year, month)[1]))
        if m := re.fullmatch(r"(\d{4}-\d{2}-\d{2})(?:\.\.(\d{4}-\d{2}-\d{2}))?", value):
            first = date.fromisoformat(m[1])
            last = date.fromisoformat(m[2]) if m[2] else first
            if last < first or (last - first).days > 366:
                raise ValueError("range")
            return Period(value, first, last + timedelta(days=1))
    except (ValueError, OverflowError):
        pass
    raise InvalidRequestError(
        f"period must be a month (2026-11), a day (2026-11-03) or days "
        f"(2026-11-03..2026-11-09, at most a year), got {value!r}", param="period")


def usd(pico: int | None) -> str | None:
    """Exact USD: at least cents, more decimals only when there are any."""
    if pico is None:
        return None
    text = f"{pico_to_usd(pico):.12f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def cents(value: str | None, *, grouped: bool = False) -> str:
    """An exact USD amount as text and CSV show it: rounded half up to the cent ("-" for
    none); `grouped` adds thousands separators (text). JSON keeps the exact value."""
    if value is None or value == "":
        return "-"
    amount = Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{amount:,}" if grouped else str(amount)


def percent(part: int | None, whole: int | None) -> str | None:
    if part is None or not whole:
        return None
    return str((Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01"),
                                                               rounding=ROUND_HALF_UP))


class Reports:
    def __init__(self, engine: Engine, config: Config,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.rates = dict(config.finance_usd_per)
        self.local = {u.name: u.cost for u in config.upstreams if u.cost is not None}
        self.clock = clock

    def to_pico(self, amount: int | Decimal, currency: str) -> int | None:
        """Minor units of a currency (exact: a Decimal for a meter's overage) in pico-USD
        (None: no rate configured)."""
        rate = self.rates.get(currency.lower())
        if rate is None:
            return None
        exponent = minor_exponent(currency)
        exact = Decimal(amount) * rate * Decimal(10) ** (12 - exponent)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))

    # -- reading the roll-ups ---------------------------------------------------------------

    def _usage(self, app_id: int, p: Period, key: Any = None) -> list[Any]:
        u = UsageDaily
        keys = [key] if key is not None else []
        with self.engine.connect() as conn:
            # every row counts its cost (a failed call can cost a fee, or its GPU hour);
            # an active user is one with a metered call (tokens)
            active = func.count(func.distinct(case((u.calls > 0, u.end_user_id))))
            return list(conn.execute(select(
                *keys, func.sum(u.calls), func.sum(u.input_tokens + u.output_tokens),
                func.sum(u.cloud_cost_pico), func.sum(u.local_cost_pico),
                func.sum(u.shadow_cost_pico), active)
                .where(u.app_id == app_id, u.day >= p.start, u.day < p.end)
                .group_by(*keys)))

    def _revenue(self, app_id: int, p: Period, key: Any = None
                 ) -> tuple[dict[Any, int], dict[str, int]]:
        """Revenue in pico-USD per key; and what could not be converted, per currency."""
        r = RevenueDaily
        keys = [key] if key is not None else []
        out: dict[Any, int] = defaultdict(int)
        unconverted: dict[str, int] = defaultdict(int)
        with self.engine.connect() as conn:
            # revenue is earned day by day: a period that runs past today counts it to today
            for row in conn.execute(select(*keys, r.currency, func.sum(r.amount)).where(
                    r.app_id == app_id, r.day >= p.start, r.day < self._cut(p)).group_by(
                    *keys, r.currency)):
                k = row[0] if key is not None else None
                pico = self.to_pico(int(row[-1]), row[-2])
                if pico is None:
                    unconverted[row[-2]] += int(row[-1])
                else:
                    out[k] += pico
        return out, unconverted

    def summary(self, app_id: int, period: str) -> dict[str, Any]:
        p = parse_period(period)
        [total] = self._usage(app_id, p) or [(0, 0, 0, 0, 0, 0)]
        calls, tokens, cloud, local, shadow, monthly = (int(v or 0) for v in total)
        revenue_by, unconverted = self._revenue(app_id, p)
        metered_revenue = self._meter_revenue(app_id, p, "model", unconverted)
        meter_revenue = sum(metered_revenue.values())
        revenue = revenue_by.get(None, 0) + meter_revenue
        daily = self._daily_active(app_id, p)
        metered = self._meters(app_id, p, "model")
        meters = sum(cost for _, cost in metered.values())
        cost = cloud + local + meters
        margin = revenue - cost
        return {
            "period": p.label, "from": p.start.isoformat(), "to": p.end.isoformat(),
            "partial": self._cut(p) < p.end, "through": (self._cut(p) - timedelta(days=1))
            .isoformat(),
            "revenue_usd": usd(revenue), "meter_revenue_usd": usd(meter_revenue),
            "meter_revenues": [{"meter": k.removeprefix("meter:"), "revenue_usd": usd(v)}
                               for k, v in sorted(metered_revenue.items())],
            "inference_cost_usd": usd(cloud + local),
            "meter_cost_usd": usd(meters), "total_cost_usd": usd(cost),
            "meter_costs": [{"meter": k.removeprefix("meter:"), "events": n,
                             "cost_usd": usd(c)} for k, (n, c) in sorted(metered.items())],
            "cloud_cost_usd": usd(cloud), "local_cost_usd": usd(local),
            "local_shadow_cost_usd": usd(shadow), "local_savings_usd": usd(shadow - local),
            "gross_margin_usd": usd(margin), "gross_margin_percent": percent(margin, revenue),
            "inference_cost_percent_of_revenue": percent(cloud + local, revenue),
            "active_users_monthly": monthly,
            "active_users_daily_average": str((Decimal(sum(daily.values()))
                                               / max(1, self._elapsed_days(p))).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP)),
            "cost_per_active_user_usd": usd(cost // monthly) if monthly else None,
            "revenue_per_active_user_usd": usd(revenue // monthly) if monthly else None,
            "calls": calls, "tokens": tokens,
            "revenue_unconverted": [{"currency": c, "amount_minor": a}
                                    for c, a in sorted(unconverted.items())],
        }

    def _meters(self, app_id: int, p: Period, group_by: str | None) -> dict[Any, tuple[int, int]]:
        """(events, cost) of the custom meters in the period, per group (meter_events: read
        as they are, not rolled up)."""
        def at(day: date) -> datetime:
            return datetime.combine(day, time(0), tzinfo=UTC)
        return meter_costs(self.engine, app_id, at(p.start), at(p.end), group_by)

    def _meter_revenue(self, app_id: int, p: Period, group_by: str | None,
                       unconverted: dict[str, int]) -> dict[Any, int]:
        """Overage billed for [[meters]] meters in the period, in pico-USD per group (by when
        it counts: a late event's in the cycle it was billed in); what cannot be converted is
        added to `unconverted` (whole minor units, rounded half up)."""
        def at(day: date) -> datetime:
            return datetime.combine(day, time(0), tzinfo=UTC)
        out: dict[Any, int] = defaultdict(int)
        for line in meter_revenue(self.engine, app_id, at(p.start), at(self._cut(p)),
                                  group_by):
            pico = self.to_pico(line.minor, line.currency)
            if pico is None:
                unconverted[line.currency] = unconverted.get(line.currency, 0) + int(
                    line.minor.quantize(Decimal(1), rounding=ROUND_HALF_UP))
            else:
                out[line.key] += pico
        return out

    def _cut(self, p: Period) -> date:
        """The day after the last one reported: the period's end, or tomorrow when the period
        runs past today (it is partial)."""
        return min(p.end, self.clock().astimezone(UTC).date() + timedelta(days=1))

    def _elapsed_days(self, p: Period) -> int:
        today = self.clock().astimezone(UTC).date()
        return max(0, min(p.end, today + timedelta(days=1)).toordinal() - p.start.toordinal())

    def _daily_active(self, app_id: int, p: Period) -> dict[date, int]:
        u = UsageDaily
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(select(
                u.day, func.count(func.distinct(u.end_user_id))).where(
                u.app_id == app_id, u.day >= p.start, u.day < p.end, u.calls > 0).group_by(
                u.day))}

    def margins(self, app_id: int, period: str, group_by: str, *, order: str = "key",
                limit: int | None = None, starting_after: str | None = None
                ) -> dict[str, Any]:
        if group_by not in GROUPS:
            raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}, got "
                                      f"{group_by!r}", param="group_by")
        p = parse_period(period)
        u, r = UsageDaily, RevenueDaily
        ukey = {"plan": u.plan_id, "model": u.model, "user": u.end_user_id, "day": u.day}[
            group_by]
        rkey = {"plan": r.plan_id, "model": None, "user": r.end_user_id, "day": r.day}[group_by]
        usage = {row[0]: row[1:] for row in self._usage(app_id, p, ukey)}
        revenue, unconverted = self._revenue(app_id, p, rkey) if rkey is not None else ({}, {})
        billed = self._meter_revenue(app_id, p, group_by, unconverted) \
            if rkey is not None else {}
        names = self._user_names(app_id) if group_by == "user" else {}
        metered = self._meters(app_id, p, group_by)
        rows: list[dict[str, Any]] = []
        for key in sorted(set(usage) | set(revenue) | set(metered) | set(billed), key=str):
            calls, tokens, cloud, local, shadow, users = (int(v or 0) for v in usage.get(
                key, (0, 0, 0, 0, 0, 0)))
            meters = metered.get(key, (0, 0))[1]
            cost = cloud + local + meters
            rev = revenue.get(key, 0) + billed.get(key, 0) if rkey is not None else None
            margin = rev - cost if rev is not None else None
            rows.append({
                "key": names.get(key, str(key)) if group_by == "user" else str(key),
                "revenue_usd": usd(rev), "cost_usd": usd(cost), "cloud_cost_usd": usd(cloud),
                "local_cost_usd": usd(local), "meter_cost_usd": usd(meters),
                "meter_revenue_usd": usd(billed.get(key, 0)) if rkey is not None else None,
                "margin_usd": usd(margin),
                "margin_percent": percent(margin, rev), "active_users": users,
                "calls": calls, "tokens": tokens,
                "_margin": margin if margin is not None else -cost, "_rev": rev or 0,
                "_cost": cost, "_cloud": cloud, "_local": local})
        if order == "margin":  # least profitable first
            rows.sort(key=lambda row: (row["_margin"], row["key"]))
        elif order != "key":
            raise InvalidRequestError("order must be key or margin", param="order")
        shown, more = page_of(rows, lambda row: row["key"], starting_after,
                              limit or len(rows))
        totals = {"revenue_usd": usd(sum(x["_rev"] for x in shown)) if rkey is not None
                  else None,
                  "cost_usd": usd(sum(x["_cost"] for x in shown)),
                  "cloud_cost_usd": usd(sum(x["_cloud"] for x in shown)),
                  "local_cost_usd": usd(sum(x["_local"] for x in shown)),
                  "margin_usd": usd(sum(x["_margin"] for x in shown)) if rkey is not None
                  else None, "calls": sum(x["calls"] for x in shown),
                  "tokens": sum(x["tokens"] for x in shown)}
        return {"period": p.label, "group_by": group_by, "order": order,
                "rows": [{k: v for k, v in x.items() if not k.startswith("_")} for x in shown],
                "has_more": more, "totals": totals,
                "revenue_unconverted": [{"currency": c, "amount_minor": a}
                                        for c, a in sorted(unconverted.items())],
                "note": "revenue is not attributed to models" if group_by == "model" else None}

    def _user_names(self, app_id: int) -> dict[Any, str]:
        with self.engine.connect() as conn:
            return {r[0]: r[1] for r in conn.execute(select(EndUser.id, EndUser.external_id)
                                                     .where(EndUser.app_id == app_id))}

    def local_vs_cloud(self, period: str) -> dict[str, Any]:
        """Each local upstream in the period (all apps: a GPU is shared): its full cost (every
        hour since it first served, idle ones included), what was allocated to calls, and
        what the same tokens would have cost at the shadow model's price."""
        p = parse_period(period)
        start = datetime(p.start.year, p.start.month, p.start.day, tzinfo=UTC)
        end = min(datetime(p.end.year, p.end.month, p.end.day, tzinfo=UTC),
                  self.clock().astimezone(UTC).replace(minute=0, second=0, microsecond=0)
                  + timedelta(hours=1))
        u = UsageDaily
        out: list[dict[str, Any]] = []
        total_cost = 0
        with self.engine.connect() as conn:
            for name, cost in sorted(self.local.items()):
                first = conn.execute(select(func.min(GpuHour.hour)).where(
                    GpuHour.upstream == name)).scalar()
                served = conn.execute(select(
                    func.count(), func.coalesce(func.sum(GpuHour.allocated_pico), 0),
                    func.coalesce(func.sum(GpuHour.calls), 0),
                    func.coalesce(func.sum(GpuHour.tokens), 0)).where(
                    GpuHour.upstream == name, GpuHour.hour >= start, GpuHour.hour < end)).one()
                since = max(start, first if first.tzinfo else first.replace(tzinfo=UTC)) \
                    if first is not None else end
                hours = max(0, int((end - since).total_seconds() // 3600))
                total = hours * cost.hourly_pico
                total_cost += total
                allocated = int(served[1])
                out.append({"upstream": name, "hourly_cost_usd": usd(cost.hourly_pico),
                            "hours": hours, "hours_serving": int(served[0]),
                            "cost_usd": usd(total), "allocated_usd": usd(allocated),
                            "idle_unallocated_usd": usd(total - allocated),
                            "calls": int(served[2]), "tokens": int(served[3]),
                            "shadow_model": cost.shadow_model})
            shadow = conn.execute(select(func.coalesce(func.sum(u.shadow_cost_pico), 0),
                                         func.coalesce(func.sum(u.local_cost_pico), 0)).where(
                u.day >= p.start, u.day < p.end)).one()
        return {"period": p.label, "upstreams": out,
                "shadow_cost_usd": usd(int(shadow[0])), "local_cost_usd": usd(total_cost),
                "savings_usd": usd(int(shadow[0]) - total_cost),
                "savings_allocated_usd": usd(int(shadow[0]) - int(shadow[1]))}
