"""Meter overage to Stripe: each meter event's overage sent as one Stripe meter event to the
Stripe Billing Meter of its [[meters]] meter ("mlane_meter_<id>", made by `plans sync` with
each plan version's metered price, stripe_sync.py), keyed by our id (Stripe drops a repeat),
written down before it is tried and checked against Stripe's meter when a repeat could fall
outside Stripe's de-duplication window, as token overage is (plans/overage.py)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.meters import METER_SCALE, format_units
from plans.models import MeterOverage, StripeCustomer
from plans.overage import SAFE_RESEND, month_of, send_in_flight
from plans.stripe_sync import BillingProviderError, event_name

if TYPE_CHECKING:
    import stripe

log = logging.getLogger(__name__)
_O = MeterOverage


def meter_identifier(meter_event_id: int, customer: str) -> str:
    """As plans.overage.meter_identifier, for a meter event's overage (its own prefix: meter
    event ids and usage event ids are counted apart and meet)."""
    digest = hashlib.sha256(customer.encode()).hexdigest()[:16]
    return f"mlane_mv_{meter_event_id}_{digest}"


@dataclass(frozen=True)
class MeterOverageLine:
    end_user_id: int
    customer: str | None   # None: an end user without a Stripe customer
    meter: str
    accounted: int         # micro-units of overage in the month (meter_overages)
    reported: int          # of which marked sent to Stripe
    stripe: int | None     # what Stripe's meter summed for the customer (None: not asked)

    @property
    def ok(self) -> bool:
        return self.customer is None or self.accounted == self.reported == self.stripe


class MeterOverageReporter:
    def __init__(self, engine: Engine, client: Callable[[], stripe.StripeClient], *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.client = client
        self.clock = clock

    def report(self, batch: int = 1000, *, retry_refused: bool = False) -> int:
        """Send every unreported meter overage of a Stripe customer; returns how many were
        sent (or found in Stripe already). As OverageReporter.report: each send is written
        down first; one tried longer ago than Stripe de-duplicates is checked against
        Stripe's meter before it is sent again."""
        if retry_refused:
            with self.engine.begin() as conn:
                conn.execute(update(_O).where(_O.reported_at.is_(None),
                                              _O.report_error.is_not(None))
                             .values(report_error=None))
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_O.meter_event_id, _O.meter_id, _O.units_micro, _O.happened_at,
                       StripeCustomer.customer_id, _O.report_attempted_at)
                .join(StripeCustomer, StripeCustomer.end_user_id == _O.end_user_id)
                .where(_O.reported_at.is_(None), _O.report_error.is_(None))
                .order_by(_O.meter_event_id).limit(batch)).all()
        horizon = self.clock() - SAFE_RESEND
        sent = 0
        uncertain: list[Any] = []
        for r in rows:
            if r.report_attempted_at is not None and r.report_attempted_at <= horizon:
                uncertain.append(r)
            else:
                sent += self._send(r, first=r.report_attempted_at is None)
        return sent + (self._settle_uncertain(uncertain) if uncertain else 0)

    def _send(self, row: Any, *, first: bool) -> int:
        """One Stripe meter event: its attempt written down, sent, marked; 1 when Stripe
        has it."""
        import stripe

        where = _O.meter_event_id == row.meter_event_id
        if first:
            with self.engine.begin() as conn:
                conn.execute(update(_O).where(where).values(report_attempted_at=self.clock()))
        values: dict[str, object] = {"reported_at": self.clock()}
        sent = 0
        try:
            self.client().v1.billing.meter_events.create(params={
                "event_name": event_name(row.meter_id),
                "identifier": meter_identifier(row.meter_event_id, row.customer_id),
                "payload": {"stripe_customer_id": row.customer_id,
                            "value": format_units(row.units_micro)},
                "timestamp": int(row.happened_at.timestamp())})
            sent = 1
        except stripe.InvalidRequestError as exc:
            if "already exists" in str(exc):
                sent = 1  # sent before but not marked: Stripe has it
            else:  # refused for good: kept aside (retry_refused sends it again)
                log.error("Stripe refused the overage of meter event %s: %s",
                          row.meter_event_id, exc)
                values = {"report_error": str(exc.user_message or exc)[:500]}
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        with self.engine.begin() as conn:
            conn.execute(update(_O).where(where).values(**values))
        return sent

    def _settle_uncertain(self, rows: list[Any]) -> int:
        """Sends tried long ago and never marked, per customer, meter and minute: Stripe's
        meter beyond what is marked sent says all landed (marked), none (sent now) or some
        (set aside for an operator: never guessed)."""
        meters = self._meters()
        groups: dict[tuple[str, str, int], list[Any]] = {}
        for row in rows:
            minute = int(row.happened_at.timestamp()) // 60 * 60
            groups.setdefault((row.customer_id, row.meter_id, minute), []).append(row)
        done = 0
        for (customer, meter_id, minute), group in groups.items():
            meter = meters.get(event_name(meter_id))
            if meter is None:
                log.error("no active Stripe meter %s: overage that may have landed is left "
                          "unsent until it is back", event_name(meter_id))
                continue
            start = datetime.fromtimestamp(minute, UTC)
            end = start + timedelta(seconds=60)
            known = self._marked(customer, meter_id, start, end)
            if known is None:
                continue  # a recent send of that minute is unmarked: settled at a later run
            landed = self._summed(meter, customer, start, end) - known
            total = sum(int(r.units_micro) for r in group)
            ids = [r.meter_event_id for r in group]
            if landed == total:
                with self.engine.begin() as conn:
                    conn.execute(update(_O).where(_O.meter_event_id.in_(ids)).values(
                        reported_at=self.clock()))
                done += len(ids)
            elif landed == 0:
                done += sum(self._send(r, first=True) for r in group)
            else:
                reason = (f"unknown whether Stripe has it: its meter {event_name(meter_id)} "
                          f"holds {format_units(landed)} beyond those marked sent at "
                          f"{start:%Y-%m-%d %H:%M} UTC, of {format_units(total)} whose sends "
                          "may have landed; check, then mark or retry")
                log.error("overage of meter events %s: %s", ids, reason)
                with self.engine.begin() as conn:
                    conn.execute(update(_O).where(_O.meter_event_id.in_(ids)).values(
                        report_error=reason[:500]))
        return done

    def _marked(self, customer: str, meter_id: str, start: datetime, end: datetime
                ) -> int | None:
        """Micro-units of the customer's overage of the meter in [start, end) marked sent;
        None when a send of that minute is unmarked but recent (plans.overage.send_in_flight)."""
        where = (StripeCustomer.customer_id == customer, _O.meter_id == meter_id,
                 _O.happened_at >= start, _O.happened_at < end)
        with self.engine.connect() as conn:
            if send_in_flight(conn, _O, *where, horizon=self.clock() - SAFE_RESEND):
                return None
            return int(conn.execute(
                select(func.coalesce(func.sum(_O.units_micro), 0))
                .join(StripeCustomer, StripeCustomer.end_user_id == _O.end_user_id)
                .where(*where, _O.reported_at.is_not(None))).scalar_one())

    def _meters(self) -> dict[str, str]:
        import stripe

        try:
            found = self.client().v1.billing.meters.list(params={"status": "active"}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return {m.event_name: m.id for m in found}

    def _summed(self, meter: str, customer: str, start: datetime, end: datetime) -> int:
        """What Stripe's meter summed for the customer in [start, end), in micro-units."""
        import stripe

        try:
            summaries = self.client().v1.billing.meters.event_summaries.list(meter, params={
                "customer": customer, "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp())}).data
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe is unreachable: {exc}") from exc
        return sum(round(Decimal(str(s.aggregated_value)) * METER_SCALE) for s in summaries)

    def by_user(self, period: str) -> list[MeterOverageLine]:
        """Per end user and meter: overage accounted for the month, reported, and summed by
        Stripe's meter of it (`billing reconcile` sets them side by side)."""
        start, end = month_of(period)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_O.end_user_id, StripeCustomer.customer_id, _O.meter_id,
                       func.sum(_O.units_micro),
                       func.sum(_O.units_micro).filter(_O.reported_at.is_not(None)))
                .outerjoin(StripeCustomer, StripeCustomer.end_user_id == _O.end_user_id)
                .where(_O.happened_at >= start, _O.happened_at < end)
                .group_by(_O.end_user_id, StripeCustomer.customer_id, _O.meter_id)
                .order_by(_O.end_user_id, _O.meter_id)).all()
        meters = self._meters() if rows else {}
        lines = []
        for end_user_id, customer, meter_id, accounted, reported in rows:
            meter = meters.get(event_name(meter_id))
            summed = self._summed(meter, customer, start, end) \
                if customer is not None and meter is not None else None
            lines.append(MeterOverageLine(int(end_user_id), customer, meter_id,
                                          int(accounted or 0), int(reported or 0), summed))
        return lines
