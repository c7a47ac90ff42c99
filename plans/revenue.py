"""Revenue events (invoices paid, credit packs bought, refunds) as other packages read them:
finance's roll-ups, the paywall's refunds and evidence. Stripe's webhooks write them
(plans/billing.py); callers pass their own connection and get rows of plain values."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from plans.models import RevenueEvent

_R = RevenueEvent


def all_events(conn: Connection) -> Sequence[Any]:
    """(app_id, end_user_id, plan_id, currency, amount, period_start, period_end,
    occurred_at) of every revenue event."""
    return conn.execute(select(
        _R.app_id, _R.end_user_id, _R.plan_id, _R.currency, _R.amount, _R.period_start,
        _R.period_end, _R.occurred_at)).all()


def paid_invoices(conn: Connection, app_id: int, end_user_id: int, *,
                  since: datetime) -> Sequence[Any]:
    """(source_id, amount, currency, period_start) of an end user's invoices paid (for more
    than nothing) since a time, oldest first."""
    return conn.execute(select(_R.source_id, _R.amount, _R.currency, _R.period_start).where(
        _R.app_id == app_id, _R.end_user_id == end_user_id, _R.kind == "invoice_paid",
        _R.amount > 0, _R.occurred_at >= since).order_by(_R.occurred_at, _R.id)).all()


def invoices_for_periods_from(conn: Connection, app_id: int, end_user_id: int,
                              start: datetime) -> list[str]:
    """Stripe ids of an end user's invoices paid for a period starting at or after `start`."""
    return list(conn.execute(select(_R.source_id).where(
        _R.app_id == app_id, _R.end_user_id == end_user_id, _R.kind == "invoice_paid",
        _R.amount > 0, _R.period_start >= start)).scalars())


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert revenue rows as given (generated demo data; Stripe's webhooks write the rest)."""
    if rows:
        conn.execute(insert(RevenueEvent), list(rows))
