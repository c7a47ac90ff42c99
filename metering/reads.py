"""The ledger as other packages read it: aggregates for finance's roll-ups and the paywall's
evidence, and the bulk insert of generated usage for the demo. The usage_events table stays
metering's: callers get rows of plain values, and pass their own connection (their
transaction)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, case, cast, func, insert, not_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from metering.models import UsageEvent
from metering.superseded import counting

_E = UsageEvent
DAY = timedelta(days=1)
TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                "reasoning_tokens")


def last_event_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(_E.id))).scalar() or 0)


def has_events(conn: Connection, app_id: int) -> bool:
    return conn.execute(select(_E.id).where(_E.app_id == app_id).limit(1)).first() is not None


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ledger rows as given (generated demo usage; calls go through the ledger writer)."""
    if rows:
        conn.execute(insert(UsageEvent), list(rows))


def days_with_events(conn: Connection, after: int, upto: int) -> list[date]:
    """The UTC days of the events with ids in (after, upto], and of the events those
    correct (an amendment with a new time changes the day of the event it replaces too)."""
    if upto <= after:
        return []
    corrected = aliased(UsageEvent)
    stamps = conn.execute(select(corrected.created_at).join(
        _E, _E.supersedes_id == corrected.id).where(_E.id > after, _E.id <= upto)).scalars()
    days = {at.astimezone(UTC).date() for at in stamps}
    return sorted(days | set(_days_of_new(conn, after, upto)))


def _days_of_new(conn: Connection, after: int, upto: int) -> list[date]:
    stamps = conn.execute(select(func.min(_E.created_at), func.max(_E.created_at)).where(
        _E.id > after, _E.id <= upto)).one()
    if stamps[0] is None:
        return []
    first, last = stamps[0].date(), stamps[1].date()
    if (last - first).days <= 62:
        # few days: check each (an index range scan) rather than read every new event
        out = []
        d = first
        while d <= last:
            start = datetime(d.year, d.month, d.day, tzinfo=UTC)
            hit = conn.execute(select(_E.id).where(
                _E.id > after, _E.id <= upto, _E.created_at >= start,
                _E.created_at < start + DAY).limit(1)).first()
            if hit is not None:
                out.append(d)
            d += DAY
        return out
    day_of = (func.date(func.timezone("UTC", _E.created_at))
              if conn.dialect.name == "postgresql" else func.date(_E.created_at))
    found = conn.execute(select(day_of).where(_E.id > after, _E.id <= upto)
                         .distinct()).scalars()
    return sorted(d if isinstance(d, date) else date.fromisoformat(str(d)) for d in found)


def daily_groups(conn: Connection, start: datetime, end: datetime,
                 local: Collection[str]) -> Iterable[Any]:
    """Per (app, end user, plan, model) of the calls in [start, end): calls that produced
    tokens, the token sums of TOKEN_FIELDS, the cloud cost (priced calls of upstreams not in
    `local`: a local model's calls cost their share of its GPU hour instead) and the calls
    left unpriced (not counting local ones)."""
    is_local = _E.upstream.in_(list(local)) if local else None
    tokens = _E.input_tokens + _E.output_tokens
    counted = case((tokens > 0, 1), else_=0)
    cloud = case((_E.priced, _E.cost_pico_usd), else_=0) if is_local is None else \
        case((and_(_E.priced, not_(is_local)), _E.cost_pico_usd), else_=0)
    unpriced = case((_E.priced, 0), else_=(1 if is_local is None else
                                            case((is_local, 0), else_=1)))
    cols = [func.sum(getattr(_E, f)) for f in TOKEN_FIELDS]
    return conn.execute(select(
        _E.app_id, _E.end_user_id, _E.plan_id, _E.requested_model,
        func.sum(counted), *cols, func.coalesce(func.sum(cloud), 0),
        func.sum(cast(unpriced, Integer))).where(
        _E.created_at >= start, _E.created_at < end, counting()).group_by(
        _E.app_id, _E.end_user_id, _E.plan_id, _E.requested_model))


def hourly_groups(conn: Connection, start: datetime, end: datetime,
                  upstreams: Collection[str]) -> Iterable[tuple[Any, ...]]:
    """Per (upstream, UTC hour, app, end user, plan, model) of the calls in [start, end)
    served by `upstreams`: the call count and the token sums of TOKEN_FIELDS; the hour as
    an aware datetime."""
    if conn.dialect.name == "postgresql":
        hour_of: Any = func.date_trunc("hour", func.timezone("UTC", _E.created_at))
    else:
        hour_of = func.strftime("%Y-%m-%d %H:00:00", _E.created_at)
    cols = [func.sum(getattr(_E, f)) for f in TOKEN_FIELDS]
    for r in conn.execute(select(
            _E.upstream, hour_of, _E.app_id, _E.end_user_id, _E.plan_id, _E.requested_model,
            func.count(), *cols).where(
            _E.created_at >= start, _E.created_at < end,
            _E.upstream.in_(list(upstreams)), counting()).group_by(
            _E.upstream, hour_of, _E.app_id, _E.end_user_id, _E.plan_id, _E.requested_model)):
        yield (r[0], _parse_hour(r[1]), *r[2:])


def usage_since(conn: Connection, app_id: int, end_user_id: int,
                since: datetime) -> Any:
    """(calls, first, last, tokens) of an end user's successful calls since a time."""
    return conn.execute(select(
        func.count(), func.min(_E.created_at), func.max(_E.created_at),
        func.coalesce(func.sum(_E.input_tokens + _E.output_tokens), 0))
        .where(_E.app_id == app_id, _E.end_user_id == end_user_id,
               _E.created_at >= since, _E.status == "ok", counting())).one()


def _parse_hour(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
