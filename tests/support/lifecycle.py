"""A world for the subscription lifecycle (issue 5, parts 4-6): the app over Flask's test client
on real Postgres and Redis, the fake Stripe on loopback (through the official library), Stripe's
events delivered signed, and the app's webhooks delivered to a receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import stripe
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from tests.conftest import bearer, config_from_toml, gateway_toml, make_keys
from tests.support.consent import MANIFEST, Call, publish_offer
from tests.support.receiver import Receiver
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

SECRET = "whsec_lifecycle"
PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 60

[[plans]]
id = "pro"
name = "Pro"
price = { amount = 2000, currency = "eur", interval = "month" }
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 200000

[[plans]]
id = "lite"
name = "Lite"
price = { amount = 900, currency = "eur", interval = "month" }

[[plans]]
id = "annual"
name = "Annual"
price = { amount = 9600, currency = "eur", interval = "year" }

[[plans]]
id = "trial"
name = "Trial"
price = { amount = 1000, currency = "usd", interval = "month" }
trial_days = 30

[[plans]]
id = "trial"
version = 2
name = "Trial"
price = { amount = 1200, currency = "usd", interval = "month" }
trial_days = 30
"""


def signed_by(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The documented check (HMAC-SHA256 of "t.body" with the endpoint secret), written here
    from the README, not with Meterlane's code."""
    parts = dict(p.split("=", 1) for p in headers["meterlane-signature"].split(","))
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + body,
                   hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"])


@dataclass
class World:
    app: Any
    key: str
    other: str
    admin: str
    stripe_base: str
    receiver: Receiver
    secret: str
    stripe: stripe.StripeClient = field(init=False)
    _created: int = 0

    def __post_init__(self) -> None:
        self.stripe = stripe.StripeClient("sk_test_lifecycle",
                                          base_addresses={"api": self.stripe_base})

    @property
    def w(self) -> Any:
        return self.app.extensions["wiring"]

    def call(self, method: str, path: str, body: Any = None, key: str | None = None
             ) -> tuple[int, Any]:
        resp = self.app.test_client().open(path, method=method, json=body,
                                           headers=bearer(key or self.key))
        try:
            return resp.status_code, resp.get_json()
        finally:
            resp.close()

    def as_call(self) -> Call:
        return lambda method, path, body: self.call(method, path, body)

    def webhook(self, kind: str, obj: dict[str, Any]) -> None:
        """One Stripe event, signed as Stripe signs it (now, and never before the last one)."""
        self._created = max(self._created, int(time.time()))
        payload = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event",
                                "type": kind, "created": self._created,
                                "data": {"object": obj}}, default=str)
        resp = self.app.test_client().post("/v1/stripe/webhook", data=payload,
                                           headers=stripe_headers(payload, SECRET))
        assert resp.status_code == 200, resp.data

    def chat(self, user: str) -> tuple[int, Any]:
        resp = self.app.test_client().post("/v1/chat/completions", headers=bearer(self.key),
                                           json={"model": "gpt-4o-mini", "user": user,
                                                 "max_tokens": 25, "messages": [
                                                     {"role": "user", "content": "Hi"}]})
        try:
            return resp.status_code, resp.get_json()
        finally:
            resp.close()  # a server closes every response: that settles the limits lease

    def exhaust(self, user: str) -> dict[str, Any]:
        """Calls through the gateway until the quota is spent; returns the 402's paywall."""
        for _ in range(20):
            status, body = self.chat(user)
            if status == 402:
                return dict(body["error"]["paywall"])
            assert status == 200, body
        raise AssertionError("the quota was never spent")

    def consent(self, user: str, offer_id: str, jurisdiction: str | None,
                kind: str = "auto_renewal", locale: str | None = None) -> str:
        """The user agrees to the offer as served to their jurisdiction."""
        where = f"&jurisdiction={jurisdiction}" if jurisdiction else ""
        status, served = self.call("GET", f"/v1/paywall/offers?user={user}{where}"
                                   + (f"&locale={locale}" if locale else ""))
        assert status == 200, served
        [offer] = [o for o in served["data"] if o["offer"] == offer_id]
        status, made = self.call("POST", "/v1/paywall/consents", {
            "user": user, "type": kind, "offer": offer_id, "version": offer["version"],
            "content_hash": offer["content_hash"], "rendered_price": offer["price"],
            "disclosure_sha256": hashlib.sha256(offer["disclosure"].encode()).hexdigest(),
            **({"jurisdiction": jurisdiction} if jurisdiction else {}),
            "locale": offer["locale"],
            "render_manifest": {**MANIFEST, "cta_label": offer["cta_label"]},
            "ip": "203.0.113.9", "user_agent": "Mozilla/5.0 (lifecycle)"})
        assert status == 201, made
        return str(made["consent_id"])

    def subscribe(self, user: str, plan: str, jurisdiction: str | None,
                  email: str = "kunde@example.com", early_start: bool = False,
                  offer_id: str | None = None) -> tuple[str, str]:
        """Offer, consent, checkout, and Stripe's events for the completed checkout: returns
        (subscription id, checkout session id)."""
        offer_id = offer_id or publish_offer(self.as_call(), plan)
        if early_start:
            self.consent(user, offer_id, jurisdiction, "eu_early_start")
        consent = self.consent(user, offer_id, jurisdiction)
        status, session = self.call("POST", "/v1/checkout/sessions", {
            "user": user, "plan": plan, "success_url": "https://app.example/ok",
            "cancel_url": "https://app.example/back", "consent_id": consent})
        assert status == 201, session
        s = self.stripe.v1.checkout.sessions.retrieve(session["id"])
        meta = s.metadata.to_dict()
        prices = {p.lookup_key: p.id for p in self.stripe.v1.prices.list(
            params={"lookup_keys": [meta["mlane_plan"]]}).data}
        data = s.subscription_data.to_dict() if s.subscription_data else {}
        sub = self.stripe.v1.subscriptions.create(params={
            "customer": s.customer, "metadata": meta,
            "items": [{"price": prices[meta["mlane_plan"]], "quantity": 1}],
            **({"trial_period_days": int(data["trial_period_days"])}
               if data.get("trial_period_days") else {})})
        self.webhook("checkout.session.completed", {
            **s.to_dict(), "status": "complete", "payment_status": "paid",
            "subscription": sub.id, "customer_details": {"email": email}})
        self.webhook("customer.subscription.created",
                     self.stripe.v1.subscriptions.retrieve(sub.id).to_dict())
        return sub.id, s.id

    def pay(self, sub_id: str, amount: int, currency: str = "eur") -> dict[str, Any]:
        """Stripe invoices the subscription and a card pays it; invoice.paid is delivered."""
        customer = self.stripe.v1.subscriptions.retrieve(sub_id).customer
        intent = self.stripe.v1.payment_intents.create(params={
            "amount": amount, "currency": currency, "customer": str(customer),
            "payment_method": "pm_card_visa", "confirm": True})
        req = urllib.request.Request(
            f"{self.stripe_base}/_config/invoices/pay", method="POST",
            data=orjson.dumps({"subscription": sub_id, "amount": amount,
                               "payment_intent": intent.id}),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            invoice: dict[str, Any] = orjson.loads(resp.read())
        self.webhook("invoice.paid", invoice)
        return invoice

    def refunds(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.stripe_base}/_config/refunds", timeout=10) as resp:
            return list(orjson.loads(resp.read())["data"])

    def fail_next(self, route: str, times: int) -> None:
        """The fake Stripe answers the next `times` requests to `route` with a 500."""
        req = urllib.request.Request(
            f"{self.stripe_base}/_config/fail", method="POST",
            data=orjson.dumps({"route": route, "times": times}),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()

    def sent(self) -> list[dict[str, Any]]:
        """Deliver what is due; every webhook the receiver got, signature checked."""
        self.w.events.deliver_due()
        out = []
        for d in self.receiver.deliveries:
            assert signed_by(self.secret, d.headers, d.body), d.headers
            out.append(orjson.loads(d.body))
        return out


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def open_world(clean_db: Engine, pg_url: str, upstream: FakeUpstream, fake_stripe: str,
          tmp_path: Path) -> Iterator[World]:
    """A fixture (each test module names it): the world of one test."""
    from app import create_app, main

    toml = gateway_toml(upstream.base_url) + PLANS + f'\n[stripe]\napi_base = "{fake_stripe}"\n'
    (tmp_path / "meterlane.toml").write_text(toml)
    synced = CliRunner().invoke(main, ["plans", "sync"], env={
        "MLANE_CONFIG": str(tmp_path / "meterlane.toml"), "MLANE_DATABASE_URL": pg_url,
        "MLANE_STRIPE_API_KEY": "sk_test_lifecycle"})
    assert synced.exit_code == 0, synced.output
    config = replace(config_from_toml(toml, tmp_path, database_url=pg_url,
                                      webhooks_allow_private=True),
                     stripe_api_key="sk_test_lifecycle", stripe_webhook_secret=SECRET,
                     stripe_collect_terms_consent=False)
    app = create_app(config)
    keys = make_keys(app)
    with Receiver() as receiver:
        status = app.test_client().put("/v1/webhooks", json={"url": receiver.url},
                                       headers={"Authorization": f"Bearer {keys.app}"})
        assert status.status_code in (200, 201)
        secret = status.get_json()["secret"]
        try:
            yield World(app, keys.app, keys.other_app, keys.admin, fake_stripe, receiver,
                        secret)
        finally:
            app.extensions["wiring"].engine.dispose()
