"""Billing end to end, as a new user would try it: a real `meterlane serve`, a fake Stripe on
loopback and Stripe's events delivered signed. A catalog with free, pro (monthly, trial,
overage) and team (annual) plans; `plans sync` twice; a user subscribes through Checkout,
uses tokens past the allowance through the openai SDK, buys credits, upgrades, downgrades,
cancels; webhooks replayed and reordered; overage reported and reconciled."""

from __future__ import annotations

import http.client
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
import stripe
from sqlalchemy import func, select

from core.db import utcnow
from plans.models import CreditOverage, RevenueEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, served_engine, start_server, stop
from tests.support.consent import consent_for
from tests.support.services import create_database
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
SECRET = "whsec_e2e_billing"


class Journey:
    def __init__(self, base: str, key: str, env: dict[str, str], stripe_base: str,
                 tag: str) -> None:
        self.base, self.key, self.env, self.tag = base, key, env, tag
        self.stripe = stripe.StripeClient("sk_test_e2e", base_addresses={"api": stripe_base})
        self.engine = served_engine(env)
        self.sent: list[bytes] = []
        self._created = int(time.time()) - 3600  # events happened before we get them

    def http(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=30)
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
            **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, orjson.loads(payload) if payload else None

    def webhook(self, kind: str, obj: dict[str, Any], created: int | None = None) -> bytes:
        """Deliver one event as Stripe does (signed); returns it, to replay later. Events
        are an hour old and one second apart unless `created` says when."""
        self._created += 1
        payload = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event",
                                "type": kind, "created": created or self._created,
                                "data": {"object": obj}}, default=str)
        self.deliver(payload)
        self.sent.append(payload)
        return payload

    def deliver(self, payload: bytes) -> None:
        status, body = self.http("POST", "/v1/stripe/webhook", raw=payload,
                                 headers=stripe_headers(payload, SECRET))
        assert status == 200, body

    def quota(self) -> dict[str, Any]:
        status, body = self.http("GET", "/v1/users/alice/quota")
        assert status == 200, body
        return dict(body)

    def chat(self, max_tokens: int) -> int:
        client = openai.OpenAI(base_url=self.base + "/v1", api_key=self.key, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", user="alice", max_tokens=max_tokens,
            messages=[{"role": "user", "content": "Tell me a long story about a fox"}])
        assert reply.usage is not None
        return reply.usage.total_tokens


@pytest.fixture(scope="module")
def journey(pg_server: str, upstream: FakeUpstream, fake_stripe: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journey]:
    tmp = tmp_path_factory.mktemp("billing")
    tag = uuid.uuid4().hex[:6]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_billing_{worker}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + f"""
[[plans]]
id = "free-{tag}"
default = true
allowance = 200

[[plans]]
id = "pro-{tag}"
name = "Pro"
price = {{ amount = 2000, currency = "usd", interval = "month" }}
trial_days = 14
allowance = 300
overage = {{ price_per_1m_tokens = 100000, spend_cap = 10 }}   # 10 cents buy 100 credits

[[plans]]
id = "team-{tag}"
name = "Team"
price = {{ amount = 30000, currency = "usd", interval = "year" }}   # 25.00 a month: more than pro
allowance = 5000

[[credit_packs]]
id = "pack-{tag}"
credits = 1000
price = {{ amount = 500, currency = "usd" }}

[stripe]
api_base = "{fake_stripe}"
""")
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0",
           "MLANE_STRIPE_API_KEY": "sk_test_e2e", "MLANE_STRIPE_WEBHOOK_SECRET": SECRET}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "billing")
    assert created.returncode == 0, created.stderr
    first = cli(env, "plans", "sync")
    assert first.returncode == 0, first.stderr
    assert f"created     price pro-{tag}@1" in first.stdout
    second = cli(env, "plans", "sync")
    assert "Stripe is in sync: nothing changed" in second.stdout, second.stdout + second.stderr
    proc, base = start_server(env, tmp)
    j = Journey(base, created.stdout.strip().splitlines()[-1], env, fake_stripe, tag)
    try:
        yield j
    finally:
        stop(proc)
        j.engine.dispose()


def test_a_user_subscribes_overspends_tops_up_changes_plan_and_cancels(journey: Journey
                                                                        ) -> None:
    j, tag = journey, journey.tag
    assert j.quota()["plan"]["id"] == f"free-{tag}"

    # 1. Checkout for pro; Stripe creates the subscription and tells us
    consent = consent_for(j.http, "alice", f"pro-{tag}")  # the paywall's step first (CNS-01)
    status, session = j.http("POST", "/v1/checkout/sessions", {
        "user": "alice", "plan": f"pro-{tag}", "success_url": "https://app.example/ok",
        "cancel_url": "https://app.example/back", "consent_id": consent})
    assert status == 201, session
    stripe_session = j.stripe.v1.checkout.sessions.retrieve(session["id"])
    owner = stripe_session.metadata.to_dict()
    prices = {p.lookup_key: p.id for p in j.stripe.v1.prices.list(params={
        "lookup_keys": [f"pro-{tag}@1", f"pro-{tag}@1:overage", f"team-{tag}@1"]}).data}
    sub = j.stripe.v1.subscriptions.create(params={
        "customer": stripe_session.customer, "metadata": owner,
        "items": [{"price": prices[f"pro-{tag}@1"], "quantity": 1},
                  {"price": prices[f"pro-{tag}@1:overage"]}]})
    j.webhook("checkout.session.completed", {**stripe_session.to_dict(), "status": "complete",
                                             "payment_status": "paid", "subscription": sub.id})
    created = j.webhook("customer.subscription.created", j.stripe.v1.subscriptions.retrieve(
        sub.id).to_dict())
    assert j.quota()["plan"]["id"] == f"pro-{tag}"

    # 2. Usage past the allowance (300): overage up to its cap (100 credits), then 402
    used = 0
    refused = None
    for _ in range(20):
        try:
            used += j.chat(60)
        except openai.APIStatusError as exc:
            refused = exc
            break
    assert refused is not None and refused.status_code == 402
    assert 300 < used <= 400
    status, before = j.http("GET", "/v1/users/alice/credits")  # accounts the usage so far
    assert status == 200 and before["balance"] == 0
    # 3. A credit pack: bought through Checkout, granted by its webhook; calls go on
    status, pack = j.http("POST", "/v1/checkout/sessions", {
        "user": "alice", "credit_pack": f"pack-{tag}", "success_url": "https://app.example/ok",
        "cancel_url": "https://app.example/back"})
    assert status == 201, pack
    pack_session = j.stripe.v1.checkout.sessions.retrieve(pack["id"]).to_dict()
    paid = j.webhook("checkout.session.completed", {**pack_session, "status": "complete",
                                                    "payment_status": "paid"},
                     created=int(time.time()))
    j.deliver(paid)  # replayed: granted once
    status, credits = j.http("GET", "/v1/users/alice/credits")
    assert status == 200 and credits["granted"] == 1000, credits
    used += j.chat(60)

    # 4. Upgrade to team at once, downgrade back at period end, cancel at period end
    status, change = j.http("POST", f"/v1/subscriptions/{sub.id}/change",
                            {"plan": f"team-{tag}"})
    assert status == 200 and change["action"] == "upgraded", change
    upgraded = j.webhook("customer.subscription.updated",
                         j.stripe.v1.subscriptions.retrieve(sub.id).to_dict())
    assert j.quota()["plan"]["id"] == f"team-{tag}"
    status, change = j.http("POST", f"/v1/subscriptions/{sub.id}/change",
                            {"plan": f"pro-{tag}"})
    assert status == 200 and change["action"] == "downgrade_scheduled", change
    assert j.quota()["plan"]["id"] == f"team-{tag}"  # until the period ends
    j.deliver(created)   # an old event, late: changes nothing
    j.deliver(upgraded)  # a replay: changes nothing
    assert j.quota()["plan"]["id"] == f"team-{tag}"
    status, change = j.http("POST", f"/v1/subscriptions/{sub.id}/cancel")
    assert status == 200 and change["action"] == "cancel_scheduled"
    ended = {**j.stripe.v1.subscriptions.retrieve(sub.id).to_dict(), "status": "canceled"}
    j.webhook("customer.subscription.deleted", ended)  # the period ended
    assert j.quota()["plan"]["id"] == f"free-{tag}"

    # 5. Money and overage: revenue facts, meter events, reconciliation
    j.webhook("invoice.paid", {"id": f"in_{tag}", "object": "invoice",
                               "customer": stripe_session.customer, "amount_paid": 2000,
                               "currency": "usd"})
    with j.engine.connect() as conn:
        revenue = dict(conn.execute(select(RevenueEvent.kind, func.sum(RevenueEvent.amount))
                                    .group_by(RevenueEvent.kind)).all())
        overage = conn.execute(select(func.coalesce(func.sum(CreditOverage.credits), 0))
                               ).scalar_one()
    assert revenue == {"invoice_paid": 2000, "credit_purchase": 500}
    assert 0 < overage <= 100  # past the allowance, before the credits came
    reported = cli(j.env, "billing", "report-overage")
    assert reported.returncode == 0 and "reported " in reported.stdout, reported.stderr
    reconciled = cli(j.env, "billing", "reconcile", "--period", utcnow().strftime("%Y-%m"))
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "all reconciled" in reconciled.stdout
