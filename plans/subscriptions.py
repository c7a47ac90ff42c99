"""Changing a subscription through Stripe: an upgrade applies at once with proration, a
downgrade at the end of the period (a subscription schedule), a cancellation at the end of
the period. Stripe then sends the subscription's events, which set the end user's plan
(plans/billing.py): Stripe stays the record of what was bought."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from core.audit import Actor, record
from core.db import utcnow
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from plans.catalog import Catalog, Plan
from plans.models import StripeCustomer, Subscription
from plans.stripe_sync import BillingProviderError

if TYPE_CHECKING:
    import stripe

LIVE = ("trialing", "active")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriptionChange:
    subscription: str
    action: str          # upgraded | downgrade_scheduled | cancel_scheduled
    plan: str            # the plan version the subscription is (or will be) on
    effective_at: datetime | None


def monthly_price(plan: Plan) -> Fraction:
    """What the plan costs a month, to tell an upgrade from a downgrade."""
    price = plan.terms.price
    if price is None:
        return Fraction(0)
    return Fraction(price.amount, 12 if price.interval == "year" else 1)


# -- reads for other packages (their own connection, their transaction) ---------------------

def cancel_state(conn: Connection, subscription_id: str) -> Any:
    """(status, cancel_at_period_end) of a subscription, as Stripe's events left it."""
    return conn.execute(select(Subscription.status, Subscription.cancel_at_period_end)
                        .where(Subscription.id == subscription_id)).first()


def stripe_customer_of(conn: Connection, app_id: int, subscription_id: str) -> str | None:
    """The Stripe customer id of a subscription's end user (None: none known)."""
    return conn.execute(select(StripeCustomer.customer_id).join(
        Subscription, Subscription.end_user_id == StripeCustomer.end_user_id).where(
        Subscription.id == subscription_id, Subscription.app_id == app_id)).scalar()


def page_of(conn: Connection, statuses: tuple[str, ...], *, after: str,
            limit: int) -> Sequence[Any]:
    """Whole subscription rows in these statuses, by id after `after` (a page of them)."""
    return conn.execute(select(Subscription.__table__).where(
        Subscription.status.in_(statuses), Subscription.id > after).order_by(
        Subscription.id).limit(limit)).all()


class SubscriptionService:
    def __init__(self, engine: Engine, catalog: Catalog,
                 client: Callable[[], stripe.StripeClient],
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.catalog = catalog
        self.client = client
        self.clock = clock

    def state(self, app_id: int, subscription_id: str) -> Any:
        """The subscription as the webhooks left it (any status); 404 for another app's."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Subscription.__table__).where(
                Subscription.id == subscription_id, Subscription.app_id == app_id)).first()
        if row is None:  # another app's subscription reads as one that does not exist
            raise NotFoundError(f"No subscription {subscription_id!r}.", param="subscription")
        return row

    def _row(self, app_id: int, subscription_id: str,
             live: tuple[str, ...] = LIVE) -> Any:
        row = self.state(app_id, subscription_id)
        if row.status not in live:
            raise ConflictError(f"Subscription {subscription_id} is {row.status}; only a "
                                "trialing or active one can change.", code="subscription_ended")
        return row

    def change(self, *, app_id: int, subscription_id: str, plan_id: str,
               actor: Actor | None = None) -> SubscriptionChange:
        """An upgrade at once (prorated), a downgrade at the end of the period. The change is
        Stripe's, so its audit row is written once Stripe has made it (a database failure
        in between leaves a change without its row, and an error in the log naming it)."""
        row = self._row(app_id, subscription_id)
        made = self._change(row, app_id, subscription_id, plan_id)
        try:
            with self.engine.begin() as conn:
                record(conn, actor, "subscription.change", target_type="subscription",
                       target_id=subscription_id, app_id=app_id,
                       before={"plan": f"{row.plan_id}@{row.plan_version}"},
                       after={"plan": made.plan, "action": made.action,
                              "effective_at": made.effective_at})
        except SQLAlchemyError:
            log.error("subscription %s was changed at Stripe (%s to %s) but its audit row "
                      "could not be written", subscription_id, made.action, made.plan)
            raise
        return made

    def _change(self, row: Any, app_id: int, subscription_id: str,
                plan_id: str) -> SubscriptionChange:
        import stripe

        current = self.catalog.get(row.plan_id, row.plan_version)
        target = self.catalog.get(plan_id)
        if target is None:
            raise NotFoundError(f"No plan {plan_id!r}.", param="plan")
        if target.terms.retired or target.terms.price is None:
            raise InvalidRequestError(f"Plan {target.ref} cannot be bought (retired or free; "
                                      "to leave a paid plan, cancel).", param="plan")
        if current is not None and current.ref == target.ref:
            raise ConflictError(f"Subscription {subscription_id} is already on {target.ref}.",
                                code="same_plan")
        upgrade = current is None or monthly_price(target) > monthly_price(current)
        try:
            client = self.client()
            sub = client.v1.subscriptions.retrieve(subscription_id)
            prices = self._prices(client, target)
            self._release_schedule(client, sub)  # this change replaces an earlier scheduled one
            items: list[dict[str, Any]] = []
            for item in sub["items"].data:
                recurring = item.price.recurring
                metered = recurring is not None and recurring.usage_type == "metered"
                items.append({"id": item.id, "deleted": True} if metered
                             else {"id": item.id, "price": prices[0]})
            items += [{"price": p} for p in prices[1:]]  # the new plan's metered overage
            if upgrade:
                params: Any = {"items": items, "proration_behavior": "create_prorations",
                               "metadata": {"mlane_plan": target.ref}}
                client.v1.subscriptions.update(subscription_id, params=params)
                return SubscriptionChange(subscription_id, "upgraded", target.ref, self.clock())
            schedule = client.v1.subscription_schedules.create(
                params={"from_subscription": subscription_id})
            phase = schedule.phases[0]
            phases: Any = [
                {"items": [{"price": i.price, "quantity": i.quantity} if i.quantity
                           else {"price": i.price} for i in phase["items"]],
                 "start_date": phase["start_date"], "end_date": phase["end_date"]},
                {"items": [{"price": prices[0], "quantity": 1}]
                 + [{"price": p} for p in prices[1:]], "proration_behavior": "none",
                 "metadata": {"mlane_plan": target.ref}}]
            client.v1.subscription_schedules.update(schedule.id, params={
                "end_behavior": "release", "phases": phases})
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe could not change the subscription: "
                                       f"{exc.user_message or exc}") from exc
        return SubscriptionChange(subscription_id, "downgrade_scheduled", target.ref,
                                  row.current_period_end)

    def cancel(self, *, app_id: int, subscription_id: str) -> SubscriptionChange:
        """Cancel at the end of the paid period (idempotent); a past-due one too."""
        import stripe

        row = self._row(app_id, subscription_id, (*LIVE, "past_due"))
        try:
            client = self.client()
            # a scheduled downgrade would renew the subscription: the cancel replaces it
            self._release_schedule(client, client.v1.subscriptions.retrieve(subscription_id))
            client.v1.subscriptions.update(subscription_id, params={"cancel_at_period_end": True})
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe could not cancel the subscription: "
                                       f"{exc.user_message or exc}") from exc
        return SubscriptionChange(subscription_id, "cancel_scheduled",
                                  f"{row.plan_id}@{row.plan_version}", row.current_period_end)

    @staticmethod
    def _release_schedule(client: stripe.StripeClient, sub: Any) -> None:
        schedule = getattr(sub, "schedule", None)
        if schedule:
            client.v1.subscription_schedules.release(
                schedule if isinstance(schedule, str) else schedule.id)

    def _prices(self, client: stripe.StripeClient, plan: Plan) -> list[str]:
        keys = [plan.ref, *plan.terms.metered_price_keys(plan.ref)]
        found = {p.lookup_key: p.id for p in client.v1.prices.list(
            params={"lookup_keys": keys, "limit": 10}).data if p.active}
        missing = [k for k in keys if k not in found]
        if missing:
            raise ConflictError(f"Stripe has no active price for {', '.join(missing)}: run "
                                "`meterlane plans sync`.", code="price_not_synced")
        return [found[k] for k in keys]
