"""Usage queries over the ledger: totals for an app or end user, by model or by day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import ColumnElement

from metering.models import UsageEvent
from metering.superseded import counting

_T = UsageEvent.__table__.c


@dataclass(frozen=True)
class UsageQuery:
    app_id: int | None
    end_user_id: int | None
    start: datetime
    end: datetime
    group_by: str | None = None


@dataclass(frozen=True)
class UsageTotals:
    key: str | None
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_pico_usd: int
    unpriced_requests: int
    counted_requests: int
    failed_requests: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class RoutedTotals:
    """Routed calls of one alias served by one model."""

    alias: str
    model: str
    calls: int
    cost_pico_usd: int
    baseline_pico_usd: int
    unpriced_calls: int  # served by a model with no list price (a local GPU): counted as 0


def _day(dialect: str) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", _T.created_at), "YYYY-MM-DD")
    return func.substr(_T.created_at, 1, 10)  # SQLite stores UTC ISO text


class UsageStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def totals(self, query: UsageQuery) -> tuple[UsageTotals, list[UsageTotals]]:
        """Overall totals and, when grouped, one row per model or per UTC day."""
        measures = [
            func.count(),
            func.coalesce(func.sum(_T.input_tokens), 0),
            func.coalesce(func.sum(_T.cached_input_tokens), 0),
            func.coalesce(func.sum(_T.output_tokens), 0),
            func.coalesce(func.sum(_T.reasoning_tokens), 0),
            func.coalesce(func.sum(_T.cost_pico_usd), 0),
            func.coalesce(func.sum(case((_T.priced.is_(False), 1), else_=0)), 0),
            func.coalesce(func.sum(case((_T.usage_source == "counted", 1), else_=0)), 0),
            func.coalesce(func.sum(case((_T.status != "ok", 1), else_=0)), 0),
        ]
        where = [_T.created_at >= query.start, _T.created_at < query.end, counting()]
        if query.app_id is not None:
            where.append(_T.app_id == query.app_id)
        if query.end_user_id is not None:
            where.append(_T.end_user_id == query.end_user_id)
        with self.engine.connect() as conn:
            overall = conn.execute(select(*measures).where(*where)).one()
            groups: list[Any] = []
            if query.group_by is not None:
                key = (_T.requested_model if query.group_by == "model"
                       else _day(conn.dialect.name)).label("k")
                groups = list(conn.execute(
                    select(key, *measures).where(*where).group_by(key).order_by(key)))
        return _totals(None, tuple(overall)), [_totals(str(r[0]), tuple(r[1:])) for r in groups]


    def routed(self, query: UsageQuery) -> list[RoutedTotals]:
        """Routed calls per (alias, served model): their cost, and the baseline cost of the
        same tokens on each call's most expensive allowed candidate."""
        where = [_T.created_at >= query.start, _T.created_at < query.end,
                 _T.route_alias.is_not(None), _T.status == "ok",  # calls a model served
                 counting()]
        if query.app_id is not None:
            where.append(_T.app_id == query.app_id)
        if query.end_user_id is not None:
            where.append(_T.end_user_id == query.end_user_id)
        stmt = select(
            _T.route_alias, _T.requested_model, func.count(),
            func.coalesce(func.sum(_T.cost_pico_usd), 0),
            func.coalesce(func.sum(func.coalesce(_T.baseline_cost_pico_usd,
                                                 _T.cost_pico_usd)), 0),
            func.coalesce(func.sum(case((_T.priced.is_(False), 1), else_=0)), 0),
        ).where(*where).group_by(_T.route_alias, _T.requested_model).order_by(
            _T.route_alias, _T.requested_model)
        with self.engine.connect() as conn:
            return [RoutedTotals(str(r[0]), str(r[1]), *(int(v) for v in r[2:]))
                    for r in conn.execute(stmt)]


def _totals(key: str | None, row: tuple[Any, ...]) -> UsageTotals:
    values = [int(v) for v in row]
    return UsageTotals(key, *values)
