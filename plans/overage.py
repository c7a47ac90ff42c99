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
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Connection, Engine

from core.db import utcnow
from core.errors import InvalidRequestError
from plans.models import CreditOverage, StripeCustomer
from plans.stripe_sync import METER_EVENT, BillingProviderError

if TYPE_CHECKING:
    import stripe

log = logging.getLogger(__name__)
# Stripe drops a repeated meter event identifier for 24 hours only. A send first tried longer
# ago than this (an hour's margin for clocks and the request itself) may be outside that
# window by the time a repeat lands: Stripe's meter is checked before sending it again.
SAFE_RESEND = timedelta(hours=23)


def meter_identifier(usage_event_id: int, customer: str) -> str:
    """The meter event's identifier, by which Stripe drops a repeat. Stripe asks for one
    unique across everything sent to the account: our event id alone repeats in another
    database on the same account (a second deployment, a rebuilt one), whose overage Stripe
    would then drop as a repeat; the customer belongs to one database only."""
    digest = hashlib.sha256(customer.encode()).hexdigest()[:16]
    return f"mlane_ov_{usage_event_id}_{digest}"


def send_in_flight(conn: Connection, model: Any, *where: Any, horizon: datetime) -> bool:
    """Whether a send of `model`'s overage (CreditOverage or MeterOverage) among `where` (a
    customer's minute) was tried after `horizon` and is not marked: it may reach Stripe's
    meter at any moment, or may just have. What the meter sums beyond those marked sent then
    says nothing about the older sends of that minute: both reporters leave them to a later
    run (once that send is marked, or old itself) rather than guess. A send Stripe refused
    (report_error) is not in its meter: not in flight."""
    return conn.execute(
        select(model.report_attempted_at)
        .join(StripeCustomer, StripeCustomer.end_user_id == model.end_user_id)
        .where(*where, model.reported_at.is_(None), model.report_error.is_(None),
               model.report_attempted_at > horizon)
        .limit(1)).first() is not None


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
        """Send every unreported overage of a Stripe customer; returns how many were sent
        (or found in Stripe already). With retry_refused, those Stripe refused before are
        tried again.

        Each send is written down before it is tried (report_attempted_at), so a send that
        may have reached Stripe unmarked (a crash between sending and marking) is known.
        Sent again while Stripe's de-duplication window still covers the first try, Stripe
        drops the repeat; past it, Stripe would count it twice, so Stripe's meter is asked
        first (_settle_uncertain)."""
        if retry_refused:
            with self.engine.begin() as conn:
                conn.execute(update(CreditOverage).where(
                    CreditOverage.reported_at.is_(None),
                    CreditOverage.report_error.is_not(None)).values(report_error=None))
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditOverage.usage_event_id, CreditOverage.credits,
                       CreditOverage.happened_at, StripeCustomer.customer_id,
                       CreditOverage.report_attempted_at)
                .join(StripeCustomer, StripeCustomer.end_user_id == CreditOverage.end_user_id)
                .where(CreditOverage.reported_at.is_(None),
                       CreditOverage.report_error.is_(None),
                       CreditOverage.cancelled_at.is_(None))  # corrected: never sent
                .order_by(CreditOverage.usage_event_id).limit(batch)).all()
        client = self.client()
        horizon = self.clock() - SAFE_RESEND
        sure: list[Any] = []
        uncertain: list[Any] = []
        for r in rows:
            tried = r.report_attempted_at
            (sure if tried is None or tried > horizon else uncertain).append(r)
        sent = sum(self._send(client, r.usage_event_id, r.credits, r.happened_at,
                              r.customer_id, first=r.report_attempted_at is None)
                   for r in sure)
        if uncertain:
            sent += self._settle_uncertain(client, uncertain)
        self.cancel(client, batch)
        return sent

    def cancel(self, client: stripe.StripeClient, batch: int = 1000) -> int:
        """Cancel with Stripe the overage of corrected usage that was sent, or may have been
        (a meter event adjustment of type cancel, by the meter event's identifier); returns
        how many Stripe took. Stripe cancels an event within 24 hours of receiving it only:
        one sent longer ago is set aside (cancel_error, shown by reconcile) for an operator
        to credit on the invoice, never guessed."""
        import stripe

        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditOverage.usage_event_id, StripeCustomer.customer_id,
                       CreditOverage.reported_at, CreditOverage.report_attempted_at)
                .join(StripeCustomer, StripeCustomer.end_user_id == CreditOverage.end_user_id)
                .where(CreditOverage.cancelled_at.is_not(None),
                       CreditOverage.cancel_sent_at.is_(None),
                       CreditOverage.cancel_error.is_(None),
                       or_(CreditOverage.reported_at.is_not(None),
                           CreditOverage.report_attempted_at.is_not(None)))
                .order_by(CreditOverage.usage_event_id).limit(batch)).all()
        horizon = self.clock() - SAFE_RESEND
        done = 0
        for r in rows:
            values: dict[str, object] = {"cancel_sent_at": self.clock()}
            first = r.report_attempted_at or r.reported_at
            if first is not None and first < horizon:
                values = {"cancel_error": "sent to Stripe over 23 hours ago: Stripe no longer "
                          "cancels it; credit the customer on the invoice"}
            else:
                try:
                    client.v1.billing.meter_event_adjustments.create(params={
                        "event_name": METER_EVENT, "type": "cancel",
                        "cancel": {"identifier": meter_identifier(r.usage_event_id,
                                                                  r.customer_id)}})
                    done += 1
                except stripe.InvalidRequestError as exc:
                    log.error("Stripe refused to cancel the overage of usage event %s: %s",
                              r.usage_event_id, exc)
                    values = {"cancel_error": str(exc.user_message or exc)[:500]}
                except stripe.StripeError as exc:
                    raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
            with self.engine.begin() as conn:
                conn.execute(update(CreditOverage).where(
                    CreditOverage.usage_event_id == r.usage_event_id).values(**values))
        return done

    def _send(self, client: stripe.StripeClient, event_id: int, credits: int,
              happened_at: datetime, customer: str, *, first: bool) -> int:
        """One meter event: its attempt written down, sent, marked; 1 when Stripe has it."""
        import stripe

        if first:
            with self.engine.begin() as conn:
                conn.execute(update(CreditOverage).where(
                    CreditOverage.usage_event_id == event_id).values(
                    report_attempted_at=self.clock()))
        values: dict[str, object] = {"reported_at": self.clock()}
        sent = 0
        try:
            client.v1.billing.meter_events.create(params={
                "event_name": METER_EVENT, "identifier": meter_identifier(event_id, customer),
                "payload": {"stripe_customer_id": customer, "value": str(credits)},
                "timestamp": int(happened_at.timestamp())})
            sent = 1
        except stripe.InvalidRequestError as exc:
            if "already exists" in str(exc):
                sent = 1  # sent before but not marked: Stripe has it
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

    def _settle_uncertain(self, client: stripe.StripeClient, rows: list[Any]) -> int:
        """Overage tried more than SAFE_RESEND ago and never marked: per customer and minute
        (Stripe's summaries are by the minute), what Stripe's meter summed beyond what is
        marked sent tells whether those sends landed: all (marked, not sent again), none
        (sent now, as a first try) or some (set aside for an operator: never guessed)."""
        meter = self._meter()
        if meter is None:
            log.error("no active Stripe meter %s: %d overage sends that may have landed are "
                      "left unsent until it is back", METER_EVENT, len(rows))
            return 0
        groups: dict[tuple[str, int], list[Any]] = {}
        for row in rows:
            minute = int(row.happened_at.timestamp()) // 60 * 60
            groups.setdefault((row.customer_id, minute), []).append(row)
        done = 0
        for (customer, minute), group in groups.items():
            start = datetime.fromtimestamp(minute, UTC)
            end = start + timedelta(seconds=60)
            known = self._marked(customer, start, end)
            if known is None:
                continue  # a recent send of that minute is unmarked: settled at a later run
            landed = self._summed(meter, customer, start, end) - known
            total = sum(int(r.credits) for r in group)
            ids = [r.usage_event_id for r in group]
            if landed == total:
                with self.engine.begin() as conn:
                    conn.execute(update(CreditOverage).where(
                        CreditOverage.usage_event_id.in_(ids)).values(
                        reported_at=self.clock()))
                done += len(ids)
            elif landed == 0:
                for r in group:
                    done += self._send(client, r.usage_event_id, r.credits, r.happened_at,
                                       customer, first=True)
            else:
                self._set_aside(ids, landed, total, start)
        return done

    def _marked(self, customer: str, start: datetime, end: datetime) -> int | None:
        """Credits of the customer's overage in [start, end) marked sent; None when a send
        of that minute is unmarked but recent (Stripe still de-duplicates it)."""
        horizon = self.clock() - SAFE_RESEND
        where = (StripeCustomer.customer_id == customer, CreditOverage.happened_at >= start,
                 CreditOverage.happened_at < end)
        joined = select(func.sum(CreditOverage.credits)).join(
            StripeCustomer, StripeCustomer.end_user_id == CreditOverage.end_user_id)
        with self.engine.connect() as conn:
            if send_in_flight(conn, CreditOverage, *where, horizon=horizon):
                return None
            return int(conn.execute(joined.where(  # (less those Stripe cancelled since)
                *where, CreditOverage.reported_at.is_not(None),
                CreditOverage.cancel_sent_at.is_(None))).scalar() or 0)

    def _set_aside(self, ids: list[int], landed: int, total: int, start: datetime) -> None:
        reason = (f"unknown whether Stripe has it: its meter holds {landed} credits of this "
                  f"customer at {start:%Y-%m-%d %H:%M} UTC beyond those marked sent, of "
                  f"{total} whose sends may have landed; check, then mark or retry")
        log.error("overage of usage events %s: %s", ids, reason)
        with self.engine.begin() as conn:
            conn.execute(update(CreditOverage).where(
                CreditOverage.usage_event_id.in_(ids)).values(report_error=reason[:500]))

    def by_user(self, period: str, *, ask_stripe: bool = True) -> list[OverageLine]:
        """Per end user: overage credits accounted for the month, reported, and summed by
        Stripe's meter (the metering package's reconciliation sets these against the raw
        ledger)."""
        start, end = month_of(period)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditOverage.end_user_id, StripeCustomer.customer_id,
                       func.sum(CreditOverage.credits).filter(
                           CreditOverage.cancelled_at.is_(None)),
                       # sent and standing: not cancelled, or its cancel not sent yet
                       func.sum(CreditOverage.credits).filter(
                           CreditOverage.reported_at.is_not(None),
                           CreditOverage.cancel_sent_at.is_(None)))
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
        import stripe

        try:
            meters = self.client().v1.billing.meters.list(params={"status": "active"}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return next((m.id for m in meters if m.event_name == METER_EVENT), None)

    def _summed(self, meter: str, customer: str, start: datetime, end: datetime) -> int:
        import stripe

        try:
            summaries = self.client().v1.billing.meters.event_summaries.list(meter, params={
                "customer": customer, "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp())}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return int(round(sum(s.aggregated_value for s in summaries)))
