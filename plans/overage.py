"""Overage to Stripe: each usage event's overage credits become one meter event, keyed by our
own id and the customer's (Stripe drops a repeat) and stamped with when the usage happened;
and, per end user and month, what was accounted, reported, and summed by Stripe (for the
reconciliation)."""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import stripe
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.errors import InvalidRequestError
from plans.models import CreditOverage, StripeCustomer
from plans.stripe_sync import METER_EVENT, BillingProviderError

log = logging.getLogger(__name__)


def meter_identifier(usage_event_id: int, customer: str) -> str:
    """The meter event's identifier, by which Stripe drops a repeat. Stripe asks for one
    unique across everything sent to the account: our event id alone repeats in another
    database on the same account (a second deployment, a rebuilt one), whose overage Stripe
    would then drop as a repeat; the customer belongs to one database only."""
    digest = hashlib.sha256(customer.encode()).hexdigest()[:16]
    return f"mlane_ov_{usage_event_id}_{digest}"


def month_of(period: str) -> tuple[datetime, datetime]:
    """"2026-11" -> [2026-11-01, 2026-12-01) in UTC."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", period)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise InvalidRequestError(f"period must be a month like 2026-11, got {period!r}",
                                  param="period")
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=UTC)
    days = calendar.monthrange(year, month)[1]
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    assert (end - start).days == days
    return start, end


@dataclass(frozen=True)
class OverageLine:
    customer: str | None   # None: an end user without a Stripe customer
    end_user_id: int
    accounted: int         # overage credits accounted in the period (credit_overages)
    reported: int          # of which sent to Stripe
    stripe: int | None     # what Stripe's meter summed for the customer (None: not asked)


class OverageReporter:
    def __init__(self, engine: Engine, client: Callable[[], stripe.StripeClient], *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.client = client
        self.clock = clock

    def report(self, batch: int = 1000, *, retry_refused: bool = False) -> int:
        """Send every unreported overage of a Stripe customer; returns how many were sent.
        With retry_refused, those Stripe refused before are tried again."""
        if retry_refused:
            with self.engine.begin() as conn:
                conn.execute(update(CreditOverage).where(
                    CreditOverage.reported_at.is_(None),
                    CreditOverage.report_error.is_not(None)).values(report_error=None))
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditOverage.usage_event_id, CreditOverage.credits,
                       CreditOverage.happened_at, StripeCustomer.customer_id)
                .join(StripeCustomer, StripeCustomer.end_user_id == CreditOverage.end_user_id)
                .where(CreditOverage.reported_at.is_(None),
                       CreditOverage.report_error.is_(None))
                .order_by(CreditOverage.usage_event_id).limit(batch)).all()
        client = self.client()
        sent = 0
        for event_id, credits, happened_at, customer in rows:
            values: dict[str, object] = {"reported_at": self.clock()}
            try:
                client.v1.billing.meter_events.create(params={
                    "event_name": METER_EVENT, "identifier": meter_identifier(event_id, customer),
                    "payload": {"stripe_customer_id": customer, "value": str(credits)},
                    "timestamp": int(happened_at.timestamp())})
                sent += 1
            except stripe.InvalidRequestError as exc:
                if "already exists" in str(exc):
                    sent += 1  # sent before but not marked: Stripe has it
                else:
                    # Refused for good (too old, an unknown customer): kept aside, shown by
                    # reconcile, and the rest still go.
                    log.error("Stripe refused the overage of usage event %s: %s", event_id, exc)
                    values = {"report_error": str(exc.user_message or exc)[:500]}
            except stripe.StripeError as exc:
                raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
            with self.engine.begin() as conn:
                conn.execute(update(CreditOverage).where(
                    CreditOverage.usage_event_id == event_id).values(**values))
        return sent

    def by_user(self, period: str, *, ask_stripe: bool = True) -> list[OverageLine]:
        """Per end user: overage credits accounted for the month, reported, and summed by
        Stripe's meter (the metering package's reconciliation sets these against the raw
        ledger)."""
        start, end = month_of(period)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditOverage.end_user_id, StripeCustomer.customer_id,
                       func.sum(CreditOverage.credits),
                       func.sum(CreditOverage.credits).filter(
                           CreditOverage.reported_at.is_not(None)))
                .outerjoin(StripeCustomer,
                           StripeCustomer.end_user_id == CreditOverage.end_user_id)
                .where(CreditOverage.happened_at >= start, CreditOverage.happened_at < end)
                .group_by(CreditOverage.end_user_id, StripeCustomer.customer_id)
                .order_by(CreditOverage.end_user_id)).all()
        meter = self._meter() if ask_stripe and rows else None
        lines = []
        for end_user_id, customer, accounted, reported in rows:
            summed = None
            if meter is not None and customer is not None:
                summed = self._summed(meter, customer, start, end)
            lines.append(OverageLine(customer, int(end_user_id), int(accounted or 0),
                                     int(reported or 0), summed))
        return lines

    def _meter(self) -> str | None:
        try:
            meters = self.client().v1.billing.meters.list(params={"status": "active"}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return next((m.id for m in meters if m.event_name == METER_EVENT), None)

    def _summed(self, meter: str, customer: str, start: datetime, end: datetime) -> int:
        try:
            summaries = self.client().v1.billing.meters.event_summaries.list(meter, params={
                "customer": customer, "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp())}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return int(sum(s.aggregated_value for s in summaries))
