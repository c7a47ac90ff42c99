"""Stripe webhooks: verified, stored by event id, handled once and in any order.

Subscription events set which plan version an end user is on (newest Stripe event wins;
past_due and canceled fall back to the default plan); a completed checkout links the Stripe
customer to the end user and, for a credit pack, grants the credits; invoices and refunds
become revenue facts. An event that cannot be handled yet (its end user is not known) is
kept unhandled and answered 500, so that Stripe retries it later."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from core.db import utcnow
from core.errors import DomainError, InvalidRequestError, NotFoundError
from plans.catalog import Catalog, Plan
from plans.credits import CreditsService
from plans.models import RevenueEvent, StripeCustomer, StripeEvent, Subscription
from plans.service import Assignment, PlanService
from plans.subscriptions import monthly_price
from plans.windows import parse_window, period_of

if TYPE_CHECKING:
    import stripe

log = logging.getLogger(__name__)
HANDLED = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
           "customer.subscription.created",
           "customer.subscription.updated", "customer.subscription.deleted", "invoice.paid",
           "invoice.payment_failed", "charge.refunded")
ON_PLAN = ("trialing", "active")  # other statuses fall back to the app's default plan
META_APP, META_USER = "mlane_app_id", "mlane_end_user_id"
_CYCLE = parse_window("cycle", "UTC")


AllowanceUsed = Callable[[int, int, Assignment, datetime], int]
# Called in the transaction that applies a Stripe event (kind, object, when, app, end user):
# what the paywall records of it (the acknowledgment after a checkout, ACK-01) lands with it
# or not at all.
AfterEvent = Callable[[Connection, str, dict[str, Any], datetime, int, int], None]


class WebhookRetryError(DomainError):
    """Stored, not handled yet: Stripe will retry it."""

    status, slug, title = 500, "webhook-not-handled", "Webhook event not handled yet"


def _at_or(ts: Any, default: datetime) -> datetime:
    try:
        return _at(ts) or default
    except InvalidRequestError:  # stored as received now; handling it says what is wrong
        return default


def _at(ts: Any) -> datetime | None:
    """A Stripe timestamp (seconds since the epoch) as a UTC datetime."""
    if not ts:
        return None
    try:
        seconds = int(ts)
        if not 0 <= seconds <= 32_503_680_000:  # 1970 to 3000
            raise ValueError("out of range")
        return datetime.fromtimestamp(seconds, UTC)
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise InvalidRequestError(f"Bad Stripe timestamp {str(ts)[:40]}") from exc


class BillingService:
    def __init__(self, engine: Engine, catalog: Catalog, plans: PlanService,
                 credits: CreditsService, *, webhook_secret: str | None,
                 clock: Callable[[], datetime] = utcnow,
                 allowance_used: AllowanceUsed | None = None,
                 client: Callable[[], stripe.StripeClient] | None = None) -> None:
        self.engine = engine
        # Stripe itself: asked for a subscription's state when two of its events tie
        self.client = client
        # Credits of the allowance used so far in a cycle (the limits engine's counter):
        # what an upgrade that does not carry usage over sets aside.
        self.allowance_used = allowance_used
        self.catalog = catalog
        self.plans = plans
        self.credits = credits
        self.webhook_secret = webhook_secret
        self.clock = clock
        self.after_event: AfterEvent | None = None

    # -- receiving --------------------------------------------------------------------------

    def receive(self, payload: bytes, signature: str | None) -> str:
        """Verify, store and handle one webhook delivery; returns what happened."""
        import stripe

        if not self.webhook_secret:
            raise NotFoundError("Stripe webhooks are not configured (MLANE_STRIPE_WEBHOOK_"
                                "SECRET is not set).")
        try:
            event = stripe.Webhook.construct_event(payload, signature or "",
                                                   self.webhook_secret)
        except (ValueError, stripe.SignatureVerificationError) as exc:
            raise InvalidRequestError(f"Bad Stripe webhook: {exc}") from exc
        try:
            doc: dict[str, Any] = orjson.loads(payload)
        except orjson.JSONDecodeError:  # numbers past 64 bits: Stripe's own parser took them
            doc = json.loads(payload)
        event_id, kind = event.id, event.type
        if kind not in HANDLED:
            return "ignored"
        data = doc.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        with self.engine.begin() as conn:
            try:
                conn.execute(insert(StripeEvent).values(
                    id=event_id, type=kind, created_at=_at_or(doc.get("created"), self.clock()),
                    payload=payload.decode(), received_at=self.clock()))
            except IntegrityError:
                pass  # delivered before: handled then, or to be handled now
        with self.engine.connect() as conn:
            handled = conn.execute(select(StripeEvent.handled_at).where(
                StripeEvent.id == event_id)).scalar_one()
        if handled is not None:
            return "duplicate"
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                raise ValueError("the event carries no data.object with an id")
            # Read before the write transaction opens: the limit store may be this same
            # database (SQLite), whose lock the transaction would hold.
            set_aside = (self._upgrade_usage(obj, _at(doc.get("created")) or self.clock())
                         if kind.startswith("customer.subscription.") else None)
            with self.engine.begin() as conn:
                # The claim comes first, in the transaction that applies the event: one
                # conditional update whose row count says who applies it. A delivery running
                # at the same moment waits on the row's lock, then finds it handled.
                claimed = conn.execute(update(StripeEvent).where(
                    StripeEvent.id == event_id, StripeEvent.handled_at.is_(None))
                    .values(handled_at=self.clock(), error=None)).rowcount
                if claimed != 1:
                    return "duplicate"
                self._handle(conn, kind, obj, _at(doc.get("created")), set_aside)
                if self.after_event is not None:
                    self.after_event(conn, kind, obj, _at(doc.get("created")) or self.clock(),
                                     *self._owner(conn, obj))
        except IntegrityError as exc:
            with self.engine.connect() as conn:
                done = conn.execute(select(StripeEvent.handled_at).where(
                    StripeEvent.id == event_id)).scalar_one()
            if done is not None:
                return "duplicate"  # handled at the same moment by another worker
            raise WebhookRetryError(f"Event {event_id} could not be applied ({exc.orig}); "
                                    "Stripe will deliver it again.") from exc
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError,
                InvalidRequestError, DataError) as exc:
            # Signed by Stripe but not something this service can apply (a field missing or
            # of another type, an amount past any real charge): kept with the reason and
            # answered 200, so Stripe stops retrying an event that can never succeed; the log
            # says so to the operator.
            reason = getattr(exc, "detail", None) or repr(exc)
            log.error("Stripe event %s (%s) rejected as malformed: %s", event_id, kind, reason)
            with self.engine.begin() as conn:
                conn.execute(update(StripeEvent).where(StripeEvent.id == event_id).values(
                    handled_at=self.clock(), error=f"rejected: {reason}"[:500]))
            return "rejected"
        except _NotYetError as exc:
            with self.engine.begin() as conn:
                conn.execute(update(StripeEvent).where(StripeEvent.id == event_id)
                             .values(error=str(exc)[:500]))
            raise WebhookRetryError(f"Event {event_id} cannot be handled yet: {exc}; Stripe "
                                    "will deliver it again.") from exc
        return "handled"

    # -- handling ---------------------------------------------------------------------------

    def _handle(self, conn: Connection, kind: str, obj: dict[str, Any],
                created: datetime | None, set_aside: tuple[datetime, int] | None) -> None:
        at = created or self.clock()
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            self._checkout_completed(conn, obj, at)
        elif kind.startswith("customer.subscription."):
            self._subscription(conn, obj, at, deleted=kind.endswith(".deleted"),
                               set_aside=set_aside)
        elif kind == "invoice.paid":
            app_id, user = self._owner(conn, obj)
            period = (obj.get("lines") or {}).get("data") or [{}]
            span = period[0].get("period") or {}
            paid = max(0, _amount(obj, "amount_paid") - _meter_lines(obj))
            self._revenue(conn, obj["id"], "invoice_paid", app_id, user, paid, _currency(obj), at,
                          _at(span.get("start") or obj.get("period_start")),
                          _at(span.get("end") or obj.get("period_end")), _invoice_plan(obj))
        elif kind == "invoice.payment_failed":
            app_id, user = self._owner(conn, obj)
            log.warning("invoice %s of end user %s failed; the subscription goes past_due",
                        obj.get("id"), user)
        elif kind == "charge.refunded":
            app_id, user = self._owner(conn, obj)
            refunded = -_amount(obj, "amount_refunded")
            inserted = self._revenue(conn, obj["id"], "refund", app_id, user, refunded,
                                     _currency(obj), at)
            if not inserted:  # a later partial refund: the charge's total refunded so far
                conn.execute(update(RevenueEvent).where(
                    RevenueEvent.source_id == obj["id"], RevenueEvent.kind == "refund",
                    RevenueEvent.amount > refunded).values(amount=refunded, occurred_at=at))

    def _checkout_completed(self, conn: Connection, obj: dict[str, Any], at: datetime) -> None:
        app_id, user = self._owner(conn, obj)
        customer = _customer(obj)
        if customer:
            self._link(conn, customer, app_id, user)
        meta = obj.get("metadata") or {}
        credits = _count(meta.get("mlane_credits"), "metadata.mlane_credits")
        if obj.get("mode") == "payment" and credits > 0:
            if obj.get("payment_status") not in ("paid", "no_payment_required"):
                return  # paid later: granted on checkout.session.async_payment_succeeded
            self.credits.grant_in(conn, app_id=app_id, end_user_id=user, amount=credits,
                                  source="topup", external_id=obj["id"], granted_at=at,
                                  note="credit pack bought through Stripe Checkout")
            self._revenue(conn, obj["id"], "credit_purchase", app_id, user,
                          _amount(obj, "amount_total"), _currency(obj), at)

    def _upgrade_usage(self, obj: dict[str, Any], at: datetime) -> tuple[datetime, int] | None:
        """For an upgrade to a plan that does not carry usage over: (cycle start, allowance
        credits used so far), read before the event is applied; else None."""
        plan = self._plan_of(obj)
        if (plan is None or plan.terms.upgrade_carries_usage or plan.terms.allowance is None
                or self.allowance_used is None or obj.get("status") not in ON_PLAN):
            return None
        with self.engine.connect() as conn:
            prior = conn.execute(select(Subscription.status, Subscription.plan_id,
                                        Subscription.plan_version, Subscription.last_event_at)
                                 .where(Subscription.id == obj["id"])).first()
            if prior is None or prior.status not in ON_PLAN or prior.last_event_at > at:
                return None
            before = self.catalog.get(prior.plan_id, prior.plan_version)
            if (before is None or before.id == plan.id
                    or monthly_price(plan) <= monthly_price(before)):
                return None
            app_id, user = self._owner(conn, obj)
        anchor = _at(obj.get("billing_cycle_anchor")) or at
        now = self.clock()
        used = self.allowance_used(app_id, user, Assignment(plan, anchor, True), now)
        return period_of(_CYCLE, now, anchor).start, used

    def _plan_of(self, obj: dict[str, Any]) -> Plan | None:
        items = (obj.get("items") or {}).get("data") or [{}]
        lookup = (items[0].get("price") or {}).get("lookup_key") or ""
        plan_id, _, version = lookup.partition("@")
        return self.catalog.get(plan_id, int(version)) if version.isdigit() else None

    def _subscription(self, conn: Connection, obj: dict[str, Any], at: datetime, *,
                      deleted: bool, set_aside: tuple[datetime, int] | None = None) -> None:
        app_id, user = self._owner(conn, obj)
        customer = _customer(obj)
        if customer:
            self._link(conn, customer, app_id, user)
        items = (obj.get("items") or {}).get("data") or [{}]
        item = items[0]
        lookup = (item.get("price") or {}).get("lookup_key") or ""
        plan = self._plan_of(obj)
        if plan is None:
            raise _NotYetError(f"subscription {obj.get('id')} has price lookup key "
                               f"{lookup!r}, which names no plan version of the catalog")
        status = "canceled" if deleted else str(obj.get("status") or "incomplete")
        anchor = _at(obj.get("billing_cycle_anchor")) or at
        row = {"app_id": app_id, "end_user_id": user, "plan_id": plan.id,
               "plan_version": plan.version, "status": status, "billing_anchor": anchor,
               "current_period_start": _at(item.get("current_period_start")
                                           or obj.get("current_period_start")),
               "current_period_end": _at(item.get("current_period_end")
                                         or obj.get("current_period_end")),
               "cancel_at_period_end": bool(obj.get("cancel_at_period_end")),
               "trial_end": _at(obj.get("trial_end")), "last_event_at": at,
               "updated_at": self.clock()}
        # Locked: two events of one subscription handled at once apply in turn.
        prior = conn.execute(select(Subscription.last_event_at, Subscription.status,
                                    Subscription.plan_id, Subscription.plan_version)
                             .where(Subscription.id == obj["id"]).with_for_update()).first()
        if prior is not None and (prior.last_event_at > at or prior.status == "canceled"):
            # an older event arriving late (Stripe stamps events to the second), or any
            # event after the end: a canceled subscription never comes back
            return
        if prior is not None and prior.last_event_at == at and not deleted:
            # Two events stamped in the same second: their delivery order says nothing of
            # which is newer. Stripe's own copy of the subscription decides.
            current = self._current(obj["id"])
            if current is not None:
                obj = current
                status = str(obj.get("status") or status)
                item = ((obj.get("items") or {}).get("data") or [{}])[0]
                plan = self._plan_of(obj) or plan
                row.update(plan_id=plan.id, plan_version=plan.version, status=status,
                           cancel_at_period_end=bool(obj.get("cancel_at_period_end")),
                           current_period_start=_at(item.get("current_period_start")
                                                    or obj.get("current_period_start")),
                           current_period_end=_at(item.get("current_period_end")
                                                  or obj.get("current_period_end")),
                           trial_end=_at(obj.get("trial_end")))
                if status == "canceled":
                    deleted = True
        if prior is None:
            conn.execute(insert(Subscription).values(id=obj["id"], **row))
        else:
            conn.execute(update(Subscription).where(Subscription.id == obj["id"]).values(**row))
        if status in ON_PLAN:
            if set_aside is not None:  # an upgrade that does not carry usage over
                self.credits.set_offset_in(conn, user, set_aside[0], set_aside[1])
            self.plans.assign_in(conn, app_id, user, plan, anchor)
            return
        others = conn.execute(select(Subscription.plan_id, Subscription.plan_version,
                                     Subscription.billing_anchor).where(
            Subscription.end_user_id == user, Subscription.id != obj["id"],
            Subscription.status.in_(ON_PLAN)).order_by(Subscription.updated_at.desc())).first()
        other = self.catalog.get(others.plan_id, others.plan_version) if others else None
        if others is not None and other is not None:  # another live subscription still holds
            self.plans.assign_in(conn, app_id, user, other, others.billing_anchor)
        else:
            self.plans.unassign_in(conn, user)

    # -- helpers ----------------------------------------------------------------------------

    def _current(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription as Stripe has it now (None: Stripe is not configured here; the
        event is then taken in delivery order, as before). Stripe unreachable: the event is
        left for Stripe to deliver again."""
        import stripe

        if self.client is None:
            return None
        try:
            client = self.client()
        except DomainError:  # no API key: webhooks only
            return None
        try:
            found = client.v1.subscriptions.retrieve(subscription_id)
        except stripe.StripeError as exc:
            raise _NotYetError(f"Stripe could not say which of two events of subscription "
                               f"{subscription_id} stamped in the same second is newer: "
                               f"{exc}") from exc
        return found.to_dict()

    def _owner(self, conn: Connection, obj: dict[str, Any]) -> tuple[int, int]:
        """(app id, end user id) an object belongs to: our metadata on it (or on its parent
        subscription), else its customer's link."""
        for meta in (obj.get("metadata"), (obj.get("subscription_details") or {}).get(
                "metadata"), ((obj.get("parent") or {}).get("subscription_details") or {})
                .get("metadata")):
            if meta and meta.get(META_APP) and meta.get(META_USER):
                return int(meta[META_APP]), int(meta[META_USER])
        customer = _customer(obj)
        if customer:
            found = conn.execute(select(StripeCustomer.app_id, StripeCustomer.end_user_id)
                                 .where(StripeCustomer.customer_id == customer)).first()
            if found is not None:
                return int(found[0]), int(found[1])
        raise _NotYetError(f"{obj.get('object', 'object')} {obj.get('id')} names no end user "
                           "and its customer is not linked to one yet")

    @staticmethod
    def _link(conn: Connection, customer: str, app_id: int, end_user_id: int) -> None:
        known = conn.execute(select(StripeCustomer.end_user_id).where(
            (StripeCustomer.customer_id == customer)
            | (StripeCustomer.end_user_id == end_user_id))).first()
        if known is None:  # the first customer of an end user is the one that maps back
            conn.execute(insert(StripeCustomer).values(customer_id=customer, app_id=app_id,
                                                       end_user_id=end_user_id))

    def _revenue(self, conn: Connection, source_id: str, kind: str, app_id: int,
                 end_user_id: int, amount: int, currency: str, at: datetime,
                 period_start: datetime | None = None, period_end: datetime | None = None,
                 plan_id: str | None = None) -> bool:
        exists = conn.execute(select(RevenueEvent.id).where(
            RevenueEvent.source_id == source_id, RevenueEvent.kind == kind)).first()
        if exists is not None:
            return False
        if plan_id is None:  # a credit pack, a refund: the plan the user is on as it happens,
            try:             # kept, so that a later plan change never moves past revenue
                plan_id = self.plans.plan_of(end_user_id, conn).plan.id
            except DomainError:
                plan_id = None
        conn.execute(insert(RevenueEvent).values(
            source_id=source_id, kind=kind, app_id=app_id, end_user_id=end_user_id,
            amount=amount, currency=currency.lower(), period_start=period_start,
            period_end=period_end, occurred_at=at, plan_id=plan_id))
        return True


def _invoice_plan(invoice: dict[str, Any]) -> str | None:
    """The plan an invoice pays for: the mlane_plan ("pro@2") our checkout put on its
    subscription; None for anything else (the finance roll-up then uses the user's plan)."""
    for meta in ((invoice.get("subscription_details") or {}).get("metadata"),
                 ((invoice.get("parent") or {}).get("subscription_details") or {})
                 .get("metadata")):
        ref = (meta or {}).get("mlane_plan")
        if isinstance(ref, str) and ref:
            return ref.partition("@")[0][:64]
    return None


MAX_MINOR = 10**12  # minor units in one Stripe amount: far past any real charge


def _count(value: Any, name: str, high: int = MAX_MINOR) -> int:
    """A whole number from 0 to `high` (Stripe's amounts are integers of minor units; a
    string of digits, as metadata holds them, too); else a ValueError naming the field."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 15:
        value = int(value)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ValueError(f"{name} is not a whole number from 0 to {high}: {str(value)[:40]}")
    return value


def _amount(obj: dict[str, Any], name: str) -> int:
    return _count(obj.get(name), name)


def _meter_lines(invoice: dict[str, Any]) -> int:
    """What an invoice charges for [[meters]] overage (lines of a price `plans sync` made for
    a meter): finance counts that as it happens (plans/meter_overage.py), not again here."""
    lines = invoice.get("lines")
    data = lines.get("data") if isinstance(lines, dict) else None
    total = 0
    for line in data if isinstance(data, list) else []:
        price = line.get("price") if isinstance(line, dict) else None
        meta = price.get("metadata") if isinstance(price, dict) else None
        if isinstance(meta, dict) and meta.get("mlane_meter"):
            total += _amount(line, "amount")
    return total


def _customer(obj: dict[str, Any]) -> str | None:
    """The Stripe customer id an object names (its id when Stripe expanded the customer);
    else a ValueError: it must not reach a query as something else."""
    value = obj.get("customer")
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 100:
        raise ValueError(f"customer is not a Stripe customer id: {str(value)[:40]}")
    return value


def _currency(obj: dict[str, Any]) -> str:
    value = obj.get("currency") or "usd"
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha():
        raise ValueError(f"currency is not a three-letter code: {str(value)[:20]}")
    return value


class _NotYetError(Exception):
    """The event needs something that has not arrived yet (an end user link, a plan)."""
