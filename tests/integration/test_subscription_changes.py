"""Changing a subscription through Meterlane: an upgrade at once with proration, a downgrade
at the end of the period (a subscription schedule), a cancellation at period end; Stripe's
events then set the plan. Against the fake Stripe, through the official library."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.models import OutboxEvent
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
SECRET = "whsec_changes"


@pytest.fixture()
def world(tmp_path: Path, pg_url: str, clean_db: Engine, fake_stripe: str,
          upstream: FakeUpstream) -> Any:
    from app import create_app, main
    from core.auth import Role

    tag = uuid.uuid4().hex[:8]
    toml = gateway_toml(upstream.base_url) + f"""
[[plans]]
id = "free-{tag}"
default = true

[[plans]]
id = "basic-{tag}"
price = {{ amount = 1000, currency = "usd", interval = "month" }}
allowance = 10000

[[plans]]
id = "pro-{tag}"
price = {{ amount = 2000, currency = "usd", interval = "month" }}
allowance = 50000
overage = {{ price_per_1m_tokens = 500, spend_cap = 2000 }}

[stripe]
api_base = "{fake_stripe}"
"""
    path = tmp_path / "meterlane.toml"
    path.write_text(toml)
    env = {"MLANE_CONFIG": str(path), "MLANE_DATABASE_URL": pg_url,
           "MLANE_STRIPE_API_KEY": "sk_test_meterlane"}
    assert CliRunner().invoke(main, ["plans", "sync"], env=env).exit_code == 0
    app = create_app(replace(config_from_toml(toml, tmp_path, database_url=pg_url),
                             stripe_api_key="sk_test_meterlane", stripe_webhook_secret=SECRET))
    w = app.extensions["wiring"]
    key = w.keys.create_key(Role.APP, "acme").key
    other = w.keys.create_key(Role.APP, "globex").key
    principal = w.auth.authenticate(key)
    end_user_id = w.tenancy.ensure_end_user(principal.app_id, "alice")
    client = stripe.StripeClient("sk_test_meterlane", base_addresses={"api": fake_stripe})
    [basic] = client.v1.prices.list(params={"lookup_keys": [f"basic-{tag}@1"]}).data
    customer = client.v1.customers.create(params={"email": "alice@example.com"})
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": basic.id, "quantity": 1}],
        "metadata": {"mlane_app_id": str(principal.app_id),
                     "mlane_end_user_id": str(end_user_id)}})
    yield app, key, other, client, sub.id, tag
    w.engine.dispose()


_created = iter(range(int(time.time()), int(time.time()) + 10_000))


def deliver_current(app: Any, client: stripe.StripeClient, sub_id: str, kind: str,
                    created: int | None = None) -> None:
    """Send what Stripe would: the subscription as it now is, in a signed event (each later
    than the one before)."""
    obj = client.v1.subscriptions.retrieve(sub_id).to_dict()
    payload = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
                            "created": created or next(_created), "data": {"object": obj}},
                           default=str)
    resp = app.test_client().post("/v1/stripe/webhook", data=payload,
                                  headers=stripe_headers(payload, SECRET))
    assert resp.status_code == 200, resp.data


def plan_of(app: Any, key: str) -> str:
    body = app.test_client().get("/v1/users/alice/quota", headers=bearer(key)).get_json()
    return str(body["plan"]["id"])


def test_upgrade_now_downgrade_and_cancel_at_period_end(world: Any) -> None:
    app, key, _other, client, sub_id, tag = world
    deliver_current(app, client, sub_id, "customer.subscription.created")
    assert plan_of(app, key) == f"basic-{tag}"
    web = app.test_client()

    up = web.post(f"/v1/subscriptions/{sub_id}/change", json={"plan": f"pro-{tag}"},
                  headers=bearer(key))
    assert up.status_code == 200, up.data
    assert up.get_json()["action"] == "upgraded"
    stripe_sub = client.v1.subscriptions.retrieve(sub_id)
    keys = sorted(i.price.lookup_key for i in stripe_sub["items"].data)
    assert keys == [f"pro-{tag}@1", f"pro-{tag}@1:overage"]  # with its metered overage
    assert stripe_sub.latest_proration_behavior == "create_prorations"
    deliver_current(app, client, sub_id, "customer.subscription.updated")
    assert plan_of(app, key) == f"pro-{tag}"

    down = web.post(f"/v1/subscriptions/{sub_id}/change", json={"plan": f"basic-{tag}"},
                    headers=bearer(key))
    assert down.status_code == 200, down.data
    body = down.get_json()
    assert body["action"] == "downgrade_scheduled" and body["effective_at"] is not None
    stripe_sub = client.v1.subscriptions.retrieve(sub_id)
    schedule = client.v1.subscription_schedules.retrieve(stripe_sub.schedule)
    now_phase, next_phase = schedule.phases
    assert {i["price"] for i in now_phase["items"]} == {
        i.price.id for i in stripe_sub["items"].data}  # pro until the period ends
    [basic] = client.v1.prices.list(params={"lookup_keys": [f"basic-{tag}@1"]}).data
    assert [i["price"] for i in next_phase["items"]] == [basic.id]
    assert next_phase["proration_behavior"] == "none"
    assert plan_of(app, key) == f"pro-{tag}"  # still pro: the period is paid

    cancel = web.post(f"/v1/subscriptions/{sub_id}/cancel", headers=bearer(key),
                      json={"channel": "settings", "steps": 2})
    assert cancel.status_code == 200 and cancel.get_json()["action"] == "cancel_scheduled"
    canceled = client.v1.subscriptions.retrieve(sub_id)
    assert canceled.cancel_at_period_end is True
    assert canceled.schedule is None  # the scheduled downgrade no longer renews it
    # CXL-05: a confirmation at once, as a record and as an event for the app to pass on
    confirmation = cancel.get_json()["confirmation"]
    assert confirmation["steps_count"] == 2
    assert confirmation["access_until"] == cancel.get_json()["effective_at"]
    assert "no further subscription charges" in confirmation["text"]
    # pro bills overage at the period's end: the confirmation does not promise otherwise
    assert confirmation["no_further_charges"] is False
    assert "billed at the end of the period" in confirmation["text"]
    again = web.post(f"/v1/subscriptions/{sub_id}/cancel", headers=bearer(key))
    assert again.status_code == 200 and again.get_json()["already_cancelled"] is True
    assert again.get_json()["confirmation"]["cancellation_id"] == \
        confirmation["cancellation_id"]  # idempotent: the first confirmation, nothing new
    with app.extensions["wiring"].engine.connect() as conn:
        events = conn.execute(select(OutboxEvent.type, OutboxEvent.body).where(
            OutboxEvent.type == "cancel.confirmed")).all()
    [(kind, sent)] = events
    assert orjson.loads(sent)["data"]["cancellation_id"] == confirmation["cancellation_id"]
    assert orjson.loads(sent)["data"]["user"] == "alice"
    # undone at Stripe (the customer portal), and said so by its webhook: a new cancel is a
    # new cancellation, not the old confirmation
    client.v1.subscriptions.update(sub_id, params={"cancel_at_period_end": False})
    deliver_current(app, client, sub_id, "customer.subscription.updated",
                    created=int(time.time()) + 5)  # after the first cancel was confirmed
    third = web.post(f"/v1/subscriptions/{sub_id}/cancel", headers=bearer(key))
    assert third.status_code == 200 and third.get_json()["already_cancelled"] is False
    assert third.get_json()["confirmation"]["cancellation_id"] != \
        confirmation["cancellation_id"]
    assert client.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is True


def test_changes_that_cannot_be_made_are_refused(world: Any) -> None:
    app, key, other, client, sub_id, tag = world
    deliver_current(app, client, sub_id, "customer.subscription.created")
    web = app.test_client()
    for body, status, code in (({"plan": "gold"}, 404, None),
                               ({"plan": f"free-{tag}"}, 400, None),
                               ({"plan": f"basic-{tag}"}, 409, "same_plan")):
        resp = web.post(f"/v1/subscriptions/{sub_id}/change", json=body, headers=bearer(key))
        assert resp.status_code == status, (body, resp.data)
        if code:
            assert resp.get_json()["code"] == code
    foreign = web.post(f"/v1/subscriptions/{sub_id}/cancel", headers=bearer(other))
    assert foreign.status_code == 404  # another app's subscription does not exist for it
    assert client.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is False
    with app.extensions["wiring"].engine.connect() as conn:
        assert conn.execute(select(OutboxEvent.type)).scalars().all() == []  # nothing changed
    bad = web.post(f"/v1/subscriptions/{sub_id}/cancel", headers=bearer(key),
                   json={"steps": 0})
    assert bad.status_code == 422
    missing = web.post("/v1/subscriptions/sub_nope/cancel", headers=bearer(key))
    assert missing.status_code == 404


def test_two_events_of_one_second_end_in_the_state_stripe_has(world: Any,
                                                              fake_stripe: str) -> None:
    """Stripe stamps events to the second: an `active` and a `past_due` event of the same
    second, delivered in the wrong order, leave the subscription as Stripe has it (on main:
    the last delivered won, and the user kept a paid plan Stripe says is past due)."""
    import urllib.request

    from plans.models import Subscription

    app, key, _other, client, sub_id, tag = world
    deliver_current(app, client, sub_id, "customer.subscription.created")
    assert plan_of(app, key) == f"basic-{tag}"
    active = client.v1.subscriptions.retrieve(sub_id).to_dict()
    req = urllib.request.Request(f"{fake_stripe}/_config/subscriptions/{sub_id}",
                                 data=orjson.dumps({"status": "past_due"}), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()  # noqa: S310 - the fake on loopback
    past_due = client.v1.subscriptions.retrieve(sub_id).to_dict()
    second = next(_created)
    for obj in (past_due, active):  # the newer state first, the older one last
        payload = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event",
                                "type": "customer.subscription.updated", "created": second,
                                "data": {"object": obj}}, default=str)
        resp = app.test_client().post("/v1/stripe/webhook", data=payload,
                                      headers=stripe_headers(payload, SECRET))
        assert resp.status_code == 200, resp.data
    with app.extensions["wiring"].engine.connect() as conn:
        status = conn.execute(select(Subscription.status).where(
            Subscription.id == sub_id)).scalar_one()
    assert status == "past_due"
    assert plan_of(app, key) == f"free-{tag}"  # past due: back on the default plan
