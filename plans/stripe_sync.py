"""The plan catalog in Stripe: one product per plan id, one price per priced plan version,
found by lookup key ("pro@2"), so that syncing twice changes nothing. Stripe prices are
immutable, like published plan versions: a price that differs from its version is an
error to fix in the config (publish a new version), never something sync overwrites."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from core.config import Config
from core.errors import DomainError
from plans.catalog import Catalog, Plan
from plans.terms import CreditPack, MeterAllowance, meter_price_key

if TYPE_CHECKING:
    import stripe

PRODUCT_PREFIX = "mlane_"
METER_EVENT = "mlane_overage_credits"


class BillingProviderError(DomainError):
    status, slug, title = 502, "billing-provider-error", "The payment provider failed"


class BillingNotConfiguredError(DomainError):
    status, slug, title = 503, "billing-not-configured", "Billing is not configured"


def stripe_client(config: Config) -> stripe.StripeClient:
    """The official client with the pinned API version (and a test server's address)."""
    import stripe

    if not config.stripe_api_key:
        raise BillingNotConfiguredError("Stripe is not configured: set MLANE_STRIPE_API_KEY.")
    bases: Any = {"api": config.stripe_api_base} if config.stripe_api_base else None
    return stripe.StripeClient(config.stripe_api_key, stripe_version=config.stripe_api_version,
                               base_addresses=bases, max_network_retries=2)


@dataclass(frozen=True)
class SyncChange:
    what: str    # product | price
    key: str     # product id or lookup key
    action: str  # created | updated | unchanged | deactivated | conflict
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:<11} {self.what} {self.key}" + (f" ({self.detail})"
                                                              if self.detail else "")


def product_id(plan_id: str) -> str:
    return f"{PRODUCT_PREFIX}{plan_id}"


def sync(client: stripe.StripeClient, catalog: Catalog) -> list[SyncChange]:
    """Create or update the products and prices of every priced plan version."""
    import stripe

    changes: list[SyncChange] = []
    try:
        meter: str | None = None
        if any(p.terms.overage for p in catalog.plans):
            meter, change = _meter(client)
            changes.append(change)
        for plan_id in dict.fromkeys(p.id for p in catalog.plans):
            versions = [p for p in catalog.plans if p.id == plan_id and p.terms.price]
            if versions:
                current = max(versions, key=lambda p: p.version)
                changes.append(_product(client, current))
                changes.extend(_price(client, plan) for plan in versions)
                changes.extend(_overage_price(client, plan, meter) for plan in versions
                               if plan.terms.overage and meter)
        for pack in catalog.packs:
            changes.extend(_pack(client, pack))
        changes.extend(_sync_meters(client, catalog))
    except stripe.StripeError as exc:
        raise BillingProviderError(f"The Stripe sync failed: {exc.user_message or exc}") \
            from exc
    return changes


def _product(client: stripe.StripeClient, plan: Plan) -> SyncChange:
    import stripe

    pid = product_id(plan.id)
    try:
        product = client.v1.products.retrieve(pid)
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
        client.v1.products.create(params={"id": pid, "name": plan.name,
                                          "metadata": {"mlane_plan": plan.id}})
        return SyncChange("product", pid, "created")
    if product.name != plan.name:
        client.v1.products.update(pid, params={"name": plan.name})
        return SyncChange("product", pid, "updated", f"name {product.name!r} -> {plan.name!r}")
    return SyncChange("product", pid, "unchanged")


def _price(client: stripe.StripeClient, plan: Plan) -> SyncChange:
    price = plan.terms.price
    assert price is not None
    found = client.v1.prices.list(params={"lookup_keys": [plan.ref], "limit": 1}).data
    if found:
        existing = found[0]
        interval = existing.recurring.interval if existing.recurring else None
        if (existing.unit_amount, existing.currency, interval) != (
                price.amount, price.currency, price.interval):
            return SyncChange("price", plan.ref, "conflict",
                              f"Stripe has {existing.unit_amount} {existing.currency}/"
                              f"{interval}; the catalog says {price.amount} {price.currency}/"
                              f"{price.interval}: publish the change as a new version")
        if existing.active == plan.terms.retired:
            client.v1.prices.update(existing.id, params={"active": not plan.terms.retired})
            return SyncChange("price", plan.ref, "deactivated" if plan.terms.retired
                              else "updated", existing.id)
        return SyncChange("price", plan.ref, "unchanged", existing.id)
    created = client.v1.prices.create(params={
        "product": product_id(plan.id), "unit_amount": price.amount, "currency": price.currency,
        "recurring": {"interval": price.interval}, "lookup_key": plan.ref,
        "nickname": f"{plan.name} v{plan.version}",
        "metadata": {"mlane_plan": plan.id, "mlane_version": str(plan.version)}})
    if plan.terms.retired:
        client.v1.prices.update(created.id, params={"active": False})
    return SyncChange("price", plan.ref, "created", created.id)


def _pack(client: stripe.StripeClient, pack: CreditPack) -> list[SyncChange]:
    """A credit pack: its own product and a one-time price (lookup key "pack:<id>"). A pack
    whose price changes gets a new price; the lookup key moves to it."""
    import stripe

    pid = product_id(f"pack_{pack.id}")
    out: list[SyncChange] = []
    try:
        client.v1.products.retrieve(pid)
        out.append(SyncChange("product", pid, "unchanged"))
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
        client.v1.products.create(params={"id": pid, "name": pack.name,
                                          "metadata": {"mlane_pack": pack.id}})
        out.append(SyncChange("product", pid, "created"))
    found = client.v1.prices.list(params={"lookup_keys": [pack.ref], "limit": 1}).data
    if found and (found[0].unit_amount, found[0].currency) == (pack.price.amount,
                                                               pack.price.currency):
        out.append(SyncChange("price", pack.ref, "unchanged", found[0].id))
        return out
    created = client.v1.prices.create(params={
        "product": pid, "unit_amount": pack.price.amount, "currency": pack.price.currency,
        "lookup_key": pack.ref, "transfer_lookup_key": True,
        "metadata": {"mlane_pack": pack.id, "mlane_credits": str(pack.credits)}})
    if found:
        client.v1.prices.update(found[0].id, params={"active": False})
    out.append(SyncChange("price", pack.ref, "updated" if found else "created", created.id))
    return out


def _meter(client: stripe.StripeClient) -> tuple[str, SyncChange]:
    """The one Stripe meter that overage credits are reported to (summed per customer)."""
    for meter in client.v1.billing.meters.list(params={"status": "active", "limit": 100}).data:
        if meter.event_name == METER_EVENT:
            return meter.id, SyncChange("meter", METER_EVENT, "unchanged", meter.id)
    created = client.v1.billing.meters.create(params={
        "display_name": "Meterlane overage credits", "event_name": METER_EVENT,
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"}})
    return created.id, SyncChange("meter", METER_EVENT, "created", created.id)


def overage_key(plan: Plan) -> str:
    return f"{plan.ref}:overage"


def _overage_price(client: stripe.StripeClient, plan: Plan, meter: str) -> SyncChange:
    """The metered price of a plan version's overage: per credit, exact in decimal minor
    units (200 per 1M credits -> "0.0002")."""
    overage, price = plan.terms.overage, plan.terms.price
    assert overage is not None and price is not None
    per_credit = Decimal(overage.price_per_1m) / 1_000_000
    found = client.v1.prices.list(params={"lookup_keys": [overage_key(plan)], "limit": 1}).data
    if found:
        existing = found[0]
        if Decimal(existing.unit_amount_decimal or "0") != per_credit:
            return SyncChange("price", overage_key(plan), "conflict",
                              f"Stripe has {existing.unit_amount_decimal} per credit; the "
                              f"catalog says {per_credit}")
        return SyncChange("price", overage_key(plan), "unchanged", existing.id)
    created = client.v1.prices.create(params={
        "product": product_id(plan.id), "currency": price.currency,
        "unit_amount_decimal": per_credit, "lookup_key": overage_key(plan),
        "recurring": {"interval": price.interval, "usage_type": "metered", "meter": meter},
        "nickname": f"{plan.name} v{plan.version} overage",
        "metadata": {"mlane_plan": plan.id, "mlane_version": str(plan.version)}})
    return SyncChange("price", overage_key(plan), "created", created.id)


def event_name(meter_id: str) -> str:
    """The Stripe meter a [[meters]] meter's overage is reported to."""
    return f"mlane_meter_{meter_id}"


def _sync_meters(client: stripe.StripeClient, catalog: Catalog) -> list[SyncChange]:
    """The Stripe meter of each meter some plan bills overage of, and each plan version's
    metered price of it (the plan's product exists: stripe_sync made it first)."""
    billed = [(plan, m) for plan in catalog.plans if plan.terms.price
              for m in plan.terms.meters if m.overage_price is not None]
    if not billed:
        return []
    active = {m.event_name: m.id for m in client.v1.billing.meters.list(
        params={"status": "active", "limit": 100}).data}
    changes: list[SyncChange] = []
    for meter_id in dict.fromkeys(m.meter for _, m in billed):
        name = event_name(meter_id)
        if name in active:
            changes.append(SyncChange("meter", name, "unchanged", active[name]))
            continue
        active[name] = client.v1.billing.meters.create(params={
            "display_name": f"Meterlane overage: {meter_id}", "event_name": name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"}}).id
        changes.append(SyncChange("meter", name, "created", active[name]))
    changes.extend(_meter_price(client, plan, m, active[event_name(m.meter)]) for plan, m in billed)
    return changes


def _meter_price(client: stripe.StripeClient, plan: Plan, allowance: MeterAllowance,
           meter: str) -> SyncChange:
    """A metered price per unit of the meter, exact in decimal minor units."""
    key = meter_price_key(plan.ref, allowance.meter)
    price = plan.terms.price
    assert price is not None and allowance.overage_price is not None
    found = client.v1.prices.list(params={"lookup_keys": [key], "limit": 1}).data
    if found:
        existing = Decimal(found[0].unit_amount_decimal or "0")
        if existing != allowance.overage_price:
            return SyncChange("price", key, "conflict", f"Stripe has {existing} per unit; the "
                              f"catalog says {allowance.overage_price}: publish the change as "
                              "a new version")
        return SyncChange("price", key, "unchanged", found[0].id)
    created = client.v1.prices.create(params={
        "product": product_id(plan.id), "currency": price.currency,
        "unit_amount_decimal": allowance.overage_price, "lookup_key": key,
        "recurring": {"interval": price.interval, "usage_type": "metered", "meter": meter},
        "nickname": f"{plan.name} v{plan.version} {allowance.meter} overage",
        "metadata": {"mlane_plan": plan.id, "mlane_version": str(plan.version),
                     "mlane_meter": allowance.meter}})
    return SyncChange("price", key, "created", created.id)
