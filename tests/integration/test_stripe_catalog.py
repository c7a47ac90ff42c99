"""The catalog in Stripe (`meterlane plans sync`, idempotent by lookup key) and Checkout
Sessions for plans and credit packs, through the official stripe library against a fake
Stripe API on loopback (localstripe plus documented responses: tests/support/fakestripe.py)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import stripe
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine

from plans.models import StripeCustomer
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.support.consent import consent_for, flask_call
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration


def catalog_toml(tag: str) -> str:
    """Plans with ids unique to the test: the fake Stripe lives as long as the session."""
    return f"""
[[plans]]
id = "free-{tag}"
default = true
allowance = 1000

[[plans]]
id = "pro-{tag}"
name = "Pro"
price = {{ amount = 2000, currency = "usd", interval = "month" }}
trial_days = 14
allowance = 100000

[[plans]]
id = "pro-{tag}"
name = "Pro"
version = 2
price = {{ amount = 2500, currency = "usd", interval = "month" }}
allowance = 150000

[[plans]]
id = "team-{tag}"
name = "Team"
price = {{ amount = 19200, currency = "usd", interval = "year" }}
allowance = 500000

[[plans]]
id = "old-{tag}"
price = {{ amount = 900, currency = "usd", interval = "month" }}
retired = true

[[credit_packs]]
id = "small-{tag}"
name = "100k credits"
credits = 100000
price = {{ amount = 500, currency = "usd" }}
"""


@pytest.fixture()
def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture()
def env(tmp_path: Path, pg_url: str, clean_db: Engine, fake_stripe: str, upstream: FakeUpstream,
        tag: str) -> dict[str, str]:
    path = tmp_path / "meterlane.toml"
    path.write_text(gateway_toml(upstream.base_url) + catalog_toml(tag)
                    + f'\n[stripe]\napi_base = "{fake_stripe}"\n')
    return {"MLANE_CONFIG": str(path), "MLANE_DATABASE_URL": pg_url,
            "MLANE_STRIPE_API_KEY": "sk_test_meterlane"}


def client_for(fake_stripe: str) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_meterlane", base_addresses={"api": fake_stripe})


def test_plans_sync_creates_the_catalog_once(env: dict[str, str], fake_stripe: str,
                                             tag: str) -> None:
    from app import main

    runner = CliRunner()
    first = runner.invoke(main, ["plans", "sync"], env=env)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    for expected in (f"created     product mlane_pro-{tag}", f"created     price pro-{tag}@1",
                     f"created     price pro-{tag}@2", f"created     price team-{tag}@1",
                     f"created     product mlane_pack_small-{tag}",
                     f"created     price pack:small-{tag}"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert not any(f"free-{tag}" in line for line in lines)  # a free plan has nothing to sell
    second = runner.invoke(main, ["plans", "sync"], env=env)
    assert second.exit_code == 0, second.output
    assert "Stripe is in sync: nothing changed" in second.output
    stripe_side = client_for(fake_stripe)
    [team] = stripe_side.v1.prices.list(params={"lookup_keys": [f"team-{tag}@1"]}).data
    assert (team.unit_amount, team.currency, team.recurring.interval) == (19200, "usd", "year")
    [old] = stripe_side.v1.prices.list(params={"lookup_keys": [f"old-{tag}@1"]}).data
    assert old.active is False  # retired: kept for its subscribers, sold no more


def test_a_price_that_differs_in_stripe_is_reported_not_overwritten(
        env: dict[str, str], fake_stripe: str, tag: str) -> None:
    from app import main

    stripe_side = client_for(fake_stripe)
    stripe_side.v1.products.create(params={"id": f"mlane_team-{tag}", "name": "Team"})
    stripe_side.v1.prices.create(params={
        "product": f"mlane_team-{tag}", "unit_amount": 15000, "currency": "usd",
        "recurring": {"interval": "year"}, "lookup_key": f"team-{tag}@1"})
    result = CliRunner().invoke(main, ["plans", "sync"], env=env)
    assert result.exit_code == 1
    assert f"conflict    price team-{tag}@1" in result.output
    assert "publish the change as a new version" in result.output


def test_stripe_unreachable_or_unconfigured_is_a_clear_error(env: dict[str, str]) -> None:
    from app import main

    path = Path(env["MLANE_CONFIG"])
    down = path.read_text().replace("api_base = \"http://127.0.0.1:", "api_base = \"http://"
                                    "127.0.0.1:9#")
    path.write_text(down)
    result = CliRunner().invoke(main, ["plans", "sync"], env=env)
    assert result.exit_code == 1 and "The Stripe sync failed" in result.output
    unconfigured = CliRunner().invoke(main, ["plans", "sync"],
                                      env={**env, "MLANE_STRIPE_API_KEY": ""})
    assert unconfigured.exit_code == 1 and "MLANE_STRIPE_API_KEY" in unconfigured.output


@pytest.fixture()
def app(env: dict[str, str], tmp_path: Path, pg_url: str, fake_stripe: str,
        upstream: FakeUpstream, tag: str) -> Any:
    from app import create_app, main

    assert CliRunner().invoke(main, ["plans", "sync"], env=env).exit_code == 0
    config = config_from_toml(Path(env["MLANE_CONFIG"]).read_text(), tmp_path,
                              database_url=pg_url)
    app = create_app(replace(config, stripe_api_key="sk_test_meterlane"))
    yield app
    app.extensions["wiring"].engine.dispose()


def checkout(client: Any, key: str, **body: Any) -> Any:
    return client.post("/v1/checkout/sessions", headers=bearer(key), json={
        "user": "alice", "success_url": "https://app.example/ok",
        "cancel_url": "https://app.example/back", **body})


def test_checkout_for_a_plan_and_for_a_credit_pack(app: Any, tag: str, fake_stripe: str,
                                                   clean_db: Engine) -> None:
    from core.auth import Role

    key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    client = app.test_client()
    refused = checkout(client, key, plan=f"pro-{tag}")  # no consent recorded: CNS-01
    assert refused.status_code == 409 and refused.get_json()["rule"] == "CNS-01"
    consent = consent_for(flask_call(client, key), "alice", f"pro-{tag}")
    plan = checkout(client, key, plan=f"pro-{tag}", consent_id=consent)
    assert plan.status_code == 201, plan.data
    replay = checkout(client, key, plan=f"pro-{tag}", consent_id=consent)
    assert replay.status_code == 409 and "already used" in replay.get_json()["detail"]
    body = plan.get_json()
    assert body["mode"] == "subscription" and body["item"] == f"pro-{tag}@2"  # current version
    assert body["url"].startswith("https://checkout.stripe.com/")
    stripe_side = client_for(fake_stripe)
    session = stripe_side.v1.checkout.sessions.retrieve(body["id"])
    assert session.metadata["mlane_user"] == "alice"
    assert session.subscription_data["metadata"]["mlane_plan"] == f"pro-{tag}@2"
    # CNS-04: Stripe's own consent collection backs ours, and names it
    assert session.consent_collection["terms_of_service"] == "required"
    assert "renews automatically" in session.custom_text["submit"]["message"]
    assert session.metadata["mlane_consent"] == consent
    record = client.get(f"/v1/paywall/consents/{consent}", headers=bearer(key)).get_json()
    assert record["checkout_session_id"] == body["id"]
    pack = checkout(client, key, credit_pack=f"small-{tag}")
    assert pack.status_code == 201 and pack.get_json()["mode"] == "payment"
    pack_session = stripe_side.v1.checkout.sessions.retrieve(pack.get_json()["id"])
    assert pack_session.metadata["mlane_credits"] == "100000"
    assert pack_session.amount_total == 500
    assert pack_session.customer == session.customer  # one Stripe customer per end user
    with clean_db.connect() as conn:
        assert len(conn.execute(select(StripeCustomer.customer_id)).all()) == 1


def test_checkout_refuses_what_cannot_be_bought(app: Any, tag: str) -> None:
    from core.auth import Role

    key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    client = app.test_client()
    for body, status, needle in (({"plan": "gold"}, 404, "No plan"),
                                 ({"plan": f"old-{tag}"}, 400, "retired"),
                                 ({"plan": f"free-{tag}"}, 400, "free"),
                                 ({"credit_pack": "huge"}, 404, "No credit pack"),
                                 ({}, 400, "either a plan or a credit_pack"),
                                 ({"plan": f"pro-{tag}", "credit_pack": f"small-{tag}"}, 400,
                                  "either")):
        resp = checkout(client, key, **body)
        assert resp.status_code == status, (body, resp.data)
        assert needle in resp.get_json()["detail"]


def test_checkout_with_stripe_unreachable_is_a_502(app: Any, tag: str) -> None:
    from core.auth import Role

    w = app.extensions["wiring"]
    key = w.keys.create_key(Role.APP, "acme").key
    dead = replace(w.config, stripe_api_base="http://127.0.0.1:9")
    from plans.stripe_sync import stripe_client

    client = app.test_client()
    consent = consent_for(flask_call(client, key), "alice", f"pro-{tag}")
    live = w.checkout.client
    w.checkout.client = lambda: stripe_client(dead)
    resp = checkout(client, key, plan=f"pro-{tag}", consent_id=consent)
    assert resp.status_code == 502, resp.data
    assert "Stripe could not start the checkout" in resp.get_json()["detail"]
    w.checkout.client = live  # Stripe is back: the consent was not spent by the failure
    assert checkout(client, key, plan=f"pro-{tag}", consent_id=consent).status_code == 201


def test_a_second_plan_checkout_is_refused(app: Any, tag: str, clean_db: Engine) -> None:
    from sqlalchemy import insert

    from core.auth import Role
    from core.db import utcnow
    from plans.models import Subscription

    w = app.extensions["wiring"]
    key = w.keys.create_key(Role.APP, "acme").key
    principal = w.auth.authenticate(key)
    end_user_id = w.tenancy.ensure_end_user(principal.app_id, "alice")
    now = utcnow()
    with clean_db.begin() as conn:  # as the webhooks of a first subscription leave it
        conn.execute(insert(Subscription).values(
            id="sub_live", app_id=principal.app_id, end_user_id=end_user_id,
            plan_id=f"pro-{tag}", plan_version=2, status="active", billing_anchor=now,
            current_period_start=now, current_period_end=None, cancel_at_period_end=False,
            trial_end=None, last_event_at=now, updated_at=now))
    client = app.test_client()
    first = checkout(client, key, plan=f"team-{tag}")  # said before any consent is asked for
    assert first.status_code == 409 and first.get_json()["code"] == "already_subscribed"
    consent = consent_for(flask_call(client, key), "alice", f"team-{tag}")
    resp = checkout(client, key, plan=f"team-{tag}", consent_id=consent)
    assert resp.status_code == 409 and resp.get_json()["code"] == "already_subscribed"
    record = client.get(f"/v1/paywall/consents/{consent}", headers=bearer(key)).get_json()
    assert record["checkout_session_id"] is None  # not spent on a refused checkout
    pack = checkout(app.test_client(), key, credit_pack=f"small-{tag}")
    assert pack.status_code == 201  # credit packs are not subscriptions
