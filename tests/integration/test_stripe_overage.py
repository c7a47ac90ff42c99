"""Overage reported to Stripe as meter events (keyed by our event id, stamped with when the
usage happened), never twice, and `meterlane billing reconcile` comparing the ledger, what
was reported and what Stripe's meter summed."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from plans.models import CreditOverage
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.support.consent import consent_for, flask_call
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration


@pytest.fixture()
def setup(tmp_path: Path, pg_url: str, clean_db: Engine, fake_stripe: str,
          upstream: FakeUpstream) -> Any:
    from app import create_app, main
    from core.auth import Role

    tag = uuid.uuid4().hex[:8]
    toml = gateway_toml(upstream.base_url) + f"""
[[plans]]
id = "free-{tag}"
default = true
allowance = 1000

[[plans]]
id = "metered-{tag}"
price = {{ amount = 1000, currency = "usd", interval = "month" }}
allowance = 100
overage = {{ price_per_1m_tokens = 1000, spend_cap = 100 }}

[stripe]
api_base = "{fake_stripe}"
"""
    path = tmp_path / "meterlane.toml"
    path.write_text(toml)
    env = {"MLANE_CONFIG": str(path), "MLANE_DATABASE_URL": pg_url,
           "MLANE_STRIPE_API_KEY": "sk_test_meterlane"}
    first = CliRunner().invoke(main, ["plans", "sync"], env=env)
    assert first.exit_code == 0, first.output
    assert "created     meter mlane_overage_credits" in first.output or \
        "unchanged   meter mlane_overage_credits" in first.output
    assert f"created     price metered-{tag}@1:overage" in first.output
    again = CliRunner().invoke(main, ["plans", "sync"], env=env)
    assert "Stripe is in sync: nothing changed" in again.output, again.output
    app = create_app(replace(config_from_toml(toml, tmp_path, database_url=pg_url),
                             stripe_api_key="sk_test_meterlane"))
    key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    yield app, key, env, tag
    app.extensions["wiring"].engine.dispose()


def track(client: Any, key: str, tokens: int, ref: str) -> None:
    resp = client.post("/v1/meter/track", headers=bearer(key), json={
        "user": "alice", "model": "gpt-4o-mini",
        "usage": {"input_tokens": tokens, "output_tokens": 0}, "idempotency_key": ref})
    assert resp.status_code in (200, 201), resp.data


def cli(env: dict[str, str], *args: str) -> Any:
    from app import main

    return CliRunner().invoke(main, list(args), env=env)


def test_overage_is_reported_once_and_reconciles(setup: Any, clean_db: Engine) -> None:
    app, key, env, tag = setup
    client = app.test_client()
    # a checkout creates alice's Stripe customer; the subscription puts her on the plan
    consent = consent_for(flask_call(client, key), "alice", f"metered-{tag}")
    started = client.post("/v1/checkout/sessions", headers=bearer(key), json={
        "user": "alice", "plan": f"metered-{tag}", "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no", "consent_id": consent})
    assert started.status_code == 201, started.data
    assert client.put("/v1/users/alice/plan", json={"plan": f"metered-{tag}"},
                      headers=bearer(key)).status_code == 200
    track(client, key, 80, "u1")
    track(client, key, 70, "u2")  # 50 past the allowance: overage
    period = utcnow().strftime("%Y-%m")

    sent = cli(env, "billing", "report-overage")
    assert sent.exit_code == 0 and "reported 1 overage meter events" in sent.output, sent.output
    assert "reported 0 overage" in cli(env, "billing", "report-overage").output
    ok = cli(env, "billing", "reconcile", "--period", period)
    assert ok.exit_code == 0, ok.output
    assert "all reconciled" in ok.output and " 50 " in ok.output

    # sent but not marked (a crash between the two): sent again, and Stripe keeps one
    with clean_db.begin() as conn:
        conn.execute(update(CreditOverage).values(reported_at=None))
    assert "reported 1 overage" in cli(env, "billing", "report-overage").output
    assert cli(env, "billing", "reconcile", "--period", period).exit_code == 0

    track(client, key, 30, "u3")  # more overage, not reported yet
    behind = cli(env, "billing", "reconcile", "--period", period)
    assert behind.exit_code == 1 and "DIFFERENCE" in behind.output
    assert " 80 " in behind.output and " 50 " in behind.output  # ledger 80, reported 50
    cli(env, "billing", "report-overage")
    assert cli(env, "billing", "reconcile", "--period", period).exit_code == 0


def test_reconcile_refuses_a_bad_period(setup: Any) -> None:
    _app, _key, env, _tag = setup
    for bad in ("2026-13", "November", "2026-1"):
        result = cli(env, "billing", "reconcile", "--period", bad)
        assert result.exit_code == 1 and "month like 2026-11" in result.output


def test_an_overage_stripe_refuses_is_set_aside_and_the_rest_still_go(
        setup: Any, clean_db: Engine) -> None:
    from datetime import timedelta

    app, key, env, tag = setup
    client = app.test_client()
    client.post("/v1/checkout/sessions", headers=bearer(key), json={
        "user": "alice", "plan": f"metered-{tag}", "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no",
        "consent_id": consent_for(flask_call(client, key), "alice", f"metered-{tag}")})
    client.put("/v1/users/alice/plan", json={"plan": f"metered-{tag}"}, headers=bearer(key))
    track(client, key, 130, "u1")
    track(client, key, 20, "u2")
    client.get("/v1/users/alice/credits", headers=bearer(key))  # accounts: 30 + 20 overage
    with clean_db.begin() as conn:  # the first is older than Stripe takes (35 days)
        first = conn.execute(select(func.min(CreditOverage.usage_event_id))).scalar_one()
        conn.execute(update(CreditOverage).where(CreditOverage.usage_event_id == first)
                     .values(happened_at=utcnow() - timedelta(days=40)))
    sent = cli(env, "billing", "report-overage")
    assert sent.exit_code == 0 and "reported 1 overage" in sent.output, sent.output
    with clean_db.connect() as conn:
        refused = conn.execute(select(CreditOverage.report_error).where(
            CreditOverage.usage_event_id == first)).scalar_one()
    assert refused and "35" in refused
    assert "reported 0 overage" in cli(env, "billing", "report-overage").output  # set aside
    # still too old: refused again when retried, and kept aside again
    again = cli(env, "billing", "report-overage", "--retry-refused")
    assert again.exit_code == 0 and "reported 0 overage" in again.output
    with clean_db.connect() as conn:
        assert conn.execute(select(CreditOverage.report_error).where(
            CreditOverage.usage_event_id == first)).scalar_one()
