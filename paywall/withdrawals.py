"""EU/UK withdrawal (CXL-04): within the withdrawal period a subscriber may withdraw from the
contract: the subscription ends at once and what was paid is refunded: in full, or, when the
subscriber asked the service to start during the period (an eu_early_start consent, CNS-05),
less the part already used (price x days used / days of the term).

Separate from cancelling (which ends a subscription at the end of a paid period, refunding
nothing). Recorded first (pending, the refund fixed), then Stripe, then confirmed with its
event: a failure between leaves it pending and the next request finishes what was recorded,
never refunding an invoice twice."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor, record
from core.db import utcnow
from core.errors import ConflictError
from core.events import EventService, new_event_id
from core.models import EndUser
from paywall.acknowledge import day, of_subscription
from paywall.models import Withdrawal
from paywall.notices import add_years
from paywall.service import RETENTION, jsonable
from plans import revenue
from plans.catalog import Catalog
from plans.stripe_sync import BillingProviderError
from plans.subscriptions import SubscriptionService
from plans.terms import format_minor

DAY = timedelta(days=1)


def add_interval(at: datetime, interval: str) -> datetime:
    """One billing term later (a month or a year; the 31st becomes the month's last day)."""
    if interval == "year":
        return add_years(at, 1)
    year, month = (at.year + 1, 1) if at.month == 12 else (at.year, at.month + 1)
    for d in (at.day, 30, 29, 28):
        try:
            return at.replace(year=year, month=month, day=d)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def refund_due(paid: int, early_start: bool, days_used: int, term_days: int) -> int:
    """Minor units to refund: all of it without an early-start request; else the unused
    part, rounded half up to the minor unit (CXL-04: price x (1 - days used / term days))."""
    if not early_start:
        return paid
    unused = Fraction(paid) * Fraction(term_days - days_used, term_days)
    return int(math.floor(unused + Fraction(1, 2)))


class WithdrawalService:
    def __init__(self, engine: Engine, events: EventService, catalog: Catalog,
                 subscriptions: SubscriptionService,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.events = events
        self.catalog = catalog
        self.subscriptions = subscriptions
        self.clock = clock

    def of_subscription(self, app_id: int, subscription_id: str) -> dict[str, Any] | None:
        """The withdrawal of a subscription once done (a pending one is not yet confirmed)."""
        row = self._row(app_id, subscription_id)
        return _view(dict(row._mapping)) if row is not None and row.state == "done" else None

    def _row(self, app_id: int, subscription_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(Withdrawal.__table__).where(
                Withdrawal.app_id == app_id,
                Withdrawal.subscription_id == subscription_id)).first()

    def withdraw(self, app_id: int, subscription_id: str,
                 actor: Actor | None = None) -> tuple[dict[str, Any], bool]:
        """(the withdrawal, whether it was made now); a second request returns the first.

        Recorded first as pending, with the refund fixed; then Stripe (refunds, then the
        cancel, each found again or made with an idempotency key); then confirmed. A failure
        on the way leaves it pending, and the next request resumes it as it was computed,
        whatever the subscription's status by then."""
        self.subscriptions.state(app_id, subscription_id)  # 404 for another app's
        row = self._row(app_id, subscription_id)
        if row is not None and row.state == "done":
            return _view(dict(row._mapping)), False
        if row is None:
            values = self._compute(app_id, subscription_id)
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(Withdrawal).values(**values))
            except IntegrityError:
                pass  # recorded at the same moment by another request: resume that one
            row = self._row(app_id, subscription_id)
            if row.state == "done":
                return _view(dict(row._mapping)), False
        plan = [(str(i), int(a)) for i, a in orjson.loads(row.refund_plan)]
        refs = self._stripe(subscription_id, plan)
        values = dict(row._mapping)
        values.update(refund_ref=",".join(refs) or None, state="done")
        view = _view(values)
        with self.engine.begin() as conn:
            user = conn.execute(select(EndUser.external_id).where(
                EndUser.id == row.end_user_id)).scalar_one()
            done = conn.execute(update(Withdrawal).where(
                Withdrawal.id == row.id, Withdrawal.state == "pending").values(
                state="done", refund_ref=values["refund_ref"])).rowcount
            if done == 1:  # confirmed once, whoever finished it
                record(conn, actor, "subscription.withdraw", target_type="subscription",
                       target_id=subscription_id, app_id=app_id,
                       before={"withdrawal": "pending"},
                       after={"withdrawal": "done", "refund_ref": values["refund_ref"],
                              "user": user})
                self.events.publish_in(conn, app_id, "withdrawal.confirmed",
                                       {**jsonable(view), "user": user},
                                       event_id=row.event_id)
        return view, done == 1

    def _compute(self, app_id: int, subscription_id: str) -> dict[str, Any]:
        """Check the right of withdrawal and fix the refund (CXL-04)."""
        sub = self.subscriptions.state(app_id, subscription_id)
        now = self.clock()
        with self.engine.connect() as conn:
            ack = of_subscription(conn, app_id, subscription_id)
            if ack is None or ack.withdrawal_deadline is None:
                raise ConflictError(
                    "CXL-04: this subscription has no right of withdrawal (it was not bought "
                    "through a paywall checkout in a jurisdiction that grants one); cancel it "
                    "instead.", code="withdrawal_not_available", rule="CXL-04")
            deadline = ack.withdrawal_deadline
            if now >= deadline:
                raise ConflictError(f"CXL-04: the withdrawal period ended on {day(deadline)}; "
                                    "cancel the subscription instead.",
                                    code="withdrawal_period_over", rule="CXL-04")
            if sub.status not in ("trialing", "active", "past_due"):
                raise ConflictError(f"Subscription {subscription_id} is {sub.status}.",
                                    code="subscription_ended")
            # what was paid since the purchase (invoices of more than nothing), oldest first
            paid_rows = revenue.paid_invoices(conn, app_id, sub.end_user_id,
                                              since=ack.started_at - DAY)
        # the early-start request made with this purchase, as its acknowledgment says (CNS-05)
        early = bool(orjson.loads(ack.content).get("early_start"))
        plan = self.catalog.get(sub.plan_id, sub.plan_version)
        interval = plan.terms.price.interval if plan and plan.terms.price else "month"
        # days are counted from the start of the paid term (a free trial is not used days)
        started = ack.started_at
        if paid_rows and paid_rows[0].period_start is not None:
            started = max(started, paid_rows[0].period_start)
        term_days = max(1, round((add_interval(started, interval) - started) / DAY))
        days_used = min(term_days, max(0, math.ceil((now - started) / DAY)))
        paid = sum(int(r.amount) for r in paid_rows)
        currency = paid_rows[0].currency if paid_rows else (
            plan.terms.price.currency if plan and plan.terms.price else "usd")
        refund = refund_due(paid, early, days_used, term_days) if paid > 0 else 0
        # refunded from the newest invoice back, never more than an invoice paid
        spread: list[tuple[str, int]] = []
        left = refund
        for r in reversed(paid_rows):
            take = min(left, int(r.amount))
            if take > 0:
                spread.append((r.source_id, take))
                left -= take
        return {"withdrawal_id": "wdr_" + secrets.token_hex(12), "app_id": app_id,
                "end_user_id": sub.end_user_id, "subscription_id": subscription_id,
                "requested_at": now, "deadline": deadline, "early_start": early,
                "days_used": days_used, "term_days": term_days, "paid": paid,
                "refund": refund, "currency": currency, "refund_ref": None,
                "event_id": new_event_id(), "retain_until": now + RETENTION,
                "state": "pending", "refund_plan": orjson.dumps(spread).decode()}

    def _stripe(self, subscription_id: str, plan: list[tuple[str, int]]) -> list[str]:
        """Refund each invoice's share (one found from before is not made again), then end the
        subscription now (unless Stripe has ended it already)."""
        import stripe

        refs: list[str] = []
        try:
            client = self.subscriptions.client()
            for invoice, amount in plan:
                payments = client.v1.invoice_payments.list(params={"invoice": invoice,
                                                                  "limit": 1}).data
                if not payments:
                    raise ConflictError(f"Stripe knows no payment of invoice {invoice} to "
                                        "refund; the withdrawal stays pending.",
                                        code="payment_not_found")
                payment: Any = payments[0].payment
                target: Any = ({"payment_intent": payment.payment_intent}
                               if getattr(payment, "payment_intent", None)
                               else {"charge": payment.charge})
                found: Any = {**target, "limit": 100}
                made: Any = next((r for r in client.v1.refunds.list(params=found).data
                                  if _meta(r).get("mlane_withdrawal") == subscription_id
                                  and _meta(r).get("mlane_invoice") == invoice), None)
                if made is None:
                    params: Any = {**target, "amount": amount, "metadata": {
                        "mlane_withdrawal": subscription_id, "mlane_invoice": invoice}}
                    made = client.v1.refunds.create(params=params, options={
                        "idempotency_key": f"mlane-withdrawal-{subscription_id}-{invoice}"})
                refs.append(str(made.id))
            if client.v1.subscriptions.retrieve(subscription_id).status != "canceled":
                client.v1.subscriptions.cancel(subscription_id, params={"prorate": False})
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe could not end and refund the subscription (the "
                                       f"withdrawal is recorded and resumes on the next "
                                       f"request): {exc.user_message or exc}") from exc
        return refs


def _meta(obj: Any) -> dict[str, Any]:
    meta: Any = getattr(obj, "metadata", None) or {}
    return dict(meta.to_dict() if hasattr(meta, "to_dict") else meta)


def _view(values: dict[str, Any]) -> dict[str, Any]:
    refund = format_minor(int(values["refund"]), values["currency"])
    text = (f"Your withdrawal was received on "
            f"{values['requested_at'].strftime('%Y-%m-%d %H:%M UTC')}. The subscription "
            f"has ended; {refund} will be refunded"
            + (f" (the unused {values['term_days'] - values['days_used']} of "
               f"{values['term_days']} days, as you asked us to start at once)."
               if values["early_start"] and values["refund"] else "."))
    return {"withdrawal_id": values["withdrawal_id"],
            "subscription": values["subscription_id"], "requested_at": values["requested_at"],
            "deadline": values["deadline"], "early_start": values["early_start"],
            "days_used": values["days_used"], "term_days": values["term_days"],
            "paid": values["paid"], "refund": values["refund"], "currency": values["currency"],
            "refund_ref": values["refund_ref"], "event_id": values["event_id"],
            "text": text, "calculation": "paid x (term_days - days_used) / term_days"
            if values["early_start"] else "paid in full (no early-start request)"}
