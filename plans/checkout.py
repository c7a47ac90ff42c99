"""Stripe Checkout Sessions for a plan (a subscription, with the plan's trial) or a credit
pack (a one-time payment). The session carries the end user in its metadata, so that the
webhooks that follow (checkout.session.completed, customer.subscription.*) find them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.errors import ConflictError, InvalidRequestError, NotFoundError
from plans.billing import META_APP, META_USER
from plans.catalog import Catalog
from plans.models import StripeCustomer, Subscription
from plans.stripe_sync import BillingProviderError
from plans.terms import format_minor

if TYPE_CHECKING:
    import stripe


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str
    mode: str
    item: str  # the plan version ("pro@2") or the pack ("pack:small")


class CheckoutService:
    def __init__(self, engine: Engine, catalog: Catalog,
                 client: Callable[[], stripe.StripeClient], *,
                 collect_terms_consent: bool = True) -> None:
        self.engine = engine
        # Stripe's own terms-of-service consent on its page (CNS-04); Stripe refuses it until
        # the account has a terms URL ([stripe] collect_terms_consent = false turns it off).
        self.collect_terms_consent = collect_terms_consent
        self.catalog = catalog
        self.client = client  # built on first use: no Stripe key, no billing

    def ensure_not_subscribed(self, end_user_id: int) -> None:
        """A second subscription is refused: the live one is changed instead."""
        with self.engine.connect() as conn:
            live = conn.execute(select(Subscription.id).where(
                Subscription.end_user_id == end_user_id,
                Subscription.status.in_(("trialing", "active", "past_due")))).first()
        if live is not None:
            raise ConflictError(f"The end user already has subscription {live[0]}: change "
                                f"it (POST /v1/subscriptions/{live[0]}/change) instead.",
                                code="already_subscribed")

    def create(self, *, app_id: int, end_user_id: int, user: str, plan_id: str | None,
               pack_id: str | None, success_url: str, cancel_url: str,
               consent: dict[str, Any] | None = None) -> CheckoutSession:
        """`consent`: the user's recorded auto-renewal consent (the paywall's), which Stripe's
        own consent collection then backs with a second record (CNS-04)."""
        import stripe

        meta = {META_APP: str(app_id), META_USER: str(end_user_id), "mlane_user": user}
        if consent is not None:
            meta["mlane_consent"] = consent["consent_id"]
        params: dict[str, Any]
        if (plan_id is None) == (pack_id is None):
            raise InvalidRequestError("Name either a plan or a credit_pack.", param="plan")
        if plan_id is not None:
            plan = self.catalog.get(plan_id)
            if plan is None:
                raise NotFoundError(f"No plan {plan_id!r}.", param="plan")
            if plan.terms.retired:
                raise InvalidRequestError(f"Plan {plan.ref} is retired.", param="plan")
            if plan.terms.price is None:
                raise InvalidRequestError(f"Plan {plan.ref} is free: there is nothing to buy.",
                                          param="plan")
            self.ensure_not_subscribed(end_user_id)
            ref, mode = plan.ref, "subscription"
            meta["mlane_plan"] = ref
            # overage is billed by a metered price on the same subscription
            extra_prices = plan.terms.metered_price_keys(ref)
            subscription: dict[str, Any] = {"metadata": dict(meta)}
            if plan.terms.trial_days:
                subscription["trial_period_days"] = plan.terms.trial_days
            params = {"subscription_data": subscription}
            if consent is not None:
                price = format_minor(plan.terms.price.amount, plan.terms.price.currency)
                if self.collect_terms_consent:  # needs a terms URL in Stripe's Dashboard
                    params["consent_collection"] = {"terms_of_service": "required"}
                params["custom_text"] = {"submit": {"message": (
                    f"By subscribing you agree that {plan.name} renews automatically at {price} "
                    f"per {plan.terms.price.interval} until you cancel; cancel any time "
                    "before the next billing date.")[:1200]}}
                subscription["description"] = f"{plan.name}: {price} per " \
                    f"{plan.terms.price.interval}, renews until cancelled"
        else:
            assert pack_id is not None
            pack = self.catalog.pack(pack_id)
            if pack is None:
                raise NotFoundError(f"No credit pack {pack_id!r}.", param="credit_pack")
            ref, mode = pack.ref, "payment"
            extra_prices = []
            meta["mlane_credits"] = str(pack.credits)
            params = {}
        try:
            client = self.client()
            keys = [ref] + extra_prices
            prices = {p.lookup_key: p for p in client.v1.prices.list(
                params={"lookup_keys": keys, "limit": 10}).data if p.active}
            missing = [k for k in keys if k not in prices]
            if missing:
                raise ConflictError(f"Stripe has no active price for {', '.join(missing)}: "
                                    "run `meterlane plans sync`.", code="price_not_synced")
            items: list[dict[str, Any]] = [{"price": prices[ref].id, "quantity": 1}]
            items += [{"price": prices[k].id} for k in keys[1:]]  # metered: no quantity
            customer = self._customer(client, app_id, end_user_id, user)
            create: Any = {  # a TypedDict in stripe's stubs; built from plain values here
                "mode": mode, "customer": customer, "client_reference_id": f"{app_id}:"
                f"{end_user_id}", "line_items": items,
                "success_url": success_url, "cancel_url": cancel_url, "metadata": meta,
                **params}
            # One consent, one session: a retry after an unclear failure gets the same one.
            # (with the request's own hash: a retry with other URLs is another request)
            digest = hashlib.sha256(orjson.dumps(create, option=orjson.OPT_SORT_KEYS)
                                    ).hexdigest()[:16]
            options: Any = {"idempotency_key": f"mlane-checkout-{consent['consent_id']}-"
                            f"{digest}"} if consent is not None else {}
            session = client.v1.checkout.sessions.create(params=create, options=options)
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe could not start the checkout: "
                                       f"{exc.user_message or exc}") from exc
        return CheckoutSession(session.id, session.url or "", mode, ref)

    def _customer(self, client: stripe.StripeClient, app_id: int, end_user_id: int,
                  user: str) -> str:
        with self.engine.connect() as conn:
            known = conn.execute(select(StripeCustomer.customer_id).where(
                StripeCustomer.end_user_id == end_user_id)).scalar_one_or_none()
        if known is not None:
            return str(known)
        customer = client.v1.customers.create(params={
            "metadata": {META_APP: str(app_id), META_USER: str(end_user_id), "mlane_user": user}})
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(StripeCustomer).values(
                    customer_id=customer.id, app_id=app_id, end_user_id=end_user_id))
        except IntegrityError:  # a checkout at the same moment linked one first: use it
            with self.engine.connect() as conn:
                return str(conn.execute(select(StripeCustomer.customer_id).where(
                    StripeCustomer.end_user_id == end_user_id)).scalar_one())
        return str(customer.id)
