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


def subscribe_alice(client: Any, key: str, tag: str) -> None:
    """alice checks out the metered plan (a Stripe customer: the overage's destination) and
    is on it."""
    client.post("/v1/checkout/sessions", headers=bearer(key), json={
        "user": "alice", "plan": f"metered-{tag}", "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no",
        "consent_id": consent_for(flask_call(client, key), "alice", f"metered-{tag}")})
    client.put("/v1/users/alice/plan", json={"plan": f"metered-{tag}"}, headers=bearer(key))


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
    subscribe_alice(client, key, tag)
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


def test_reconcile_checks_the_raw_ledger_and_reports_a_planted_gap(
        setup: Any, clean_db: Engine) -> None:
    """The gap the id cursor left (a call committed late, passed over by the accounting):
    reconcile against the accounted table alone said "all reconciled". It now reads the
    ledger, names the call, and `credits accrue --repair` accounts it."""
    from metering.models import UsageEvent
    from plans.models import CreditUse

    app, key, env, tag = setup
    client = app.test_client()
    subscribe_alice(client, key, tag)
    track(client, key, 90, "g1")
    track(client, key, 40, "g2")  # 30 past the allowance
    period = utcnow().strftime("%Y-%m")
    cli(env, "billing", "report-overage")
    first = cli(env, "billing", "reconcile", "--period", period)
    assert first.exit_code == 0, first.output

    # the skip: a call whose mark is cleared without its accounting
    track(client, key, 25, "g3")
    with clean_db.begin() as conn:
        skipped = conn.execute(select(UsageEvent.id).where(
            UsageEvent.idempotency_key.like("%g3"))).scalar_one()
        conn.execute(update(UsageEvent).where(UsageEvent.id == skipped)
                     .values(credits_pending=False))
    cli(env, "billing", "report-overage")
    gap = cli(env, "billing", "reconcile", "--period", period)
    assert gap.exit_code == 1, gap.output
    assert "UNACCOUNTED" in gap.output and f"usage events {skipped}" in gap.output, gap.output
    assert f"credits accrue --repair {period}" in gap.output

    repaired = cli(env, "credits", "accrue", "--repair", period)
    assert repaired.exit_code == 0 and "marked 1 unaccounted" in repaired.output, repaired.output
    assert "accounted 1 usage events" in repaired.output
    assert "reported 1 overage" in cli(env, "billing", "report-overage").output
    ok = cli(env, "billing", "reconcile", "--period", period)
    assert ok.exit_code == 0 and "all reconciled" in ok.output, ok.output
    assert " 55 " in ok.output  # 30 + 25 of overage, every figure agreeing
    assert "marked 0 unaccounted" in cli(env, "credits", "accrue", "--repair", period).output

    # an accounting that lost its overage row, and one with other tokens than the ledger's
    with clean_db.begin() as conn:
        conn.execute(CreditOverage.__table__.delete().where(
            CreditOverage.usage_event_id == skipped))
    lost = cli(env, "billing", "reconcile", "--period", period)
    assert lost.exit_code == 1 and "MISMATCH" in lost.output, lost.output
    assert f"e.g. usage events {skipped}" in lost.output
    with clean_db.begin() as conn:
        conn.execute(CreditOverage.__table__.insert().values(
            usage_event_id=skipped, end_user_id=conn.execute(select(UsageEvent.end_user_id)
                                                            .where(UsageEvent.id == skipped))
            .scalar_one(), plan_id=f"metered-{tag}", plan_version=1, credits=25,
            happened_at=conn.execute(select(UsageEvent.created_at)
                                     .where(UsageEvent.id == skipped)).scalar_one(),
            reported_at=utcnow()))
    assert cli(env, "billing", "reconcile", "--period", period).exit_code == 0
    with clean_db.begin() as conn:
        conn.execute(update(CreditUse).where(CreditUse.usage_event_id == skipped)
                     .values(tokens=24))
    assert "MISMATCH" in cli(env, "billing", "reconcile", "--period", period).output


def test_overage_of_a_rebuilt_database_on_the_same_stripe_account_is_billed(
        setup: Any, clean_db: Engine, tmp_path: Path, pg_url: str) -> None:
    """A second database on one Stripe account (another deployment, or this one rebuilt)
    numbers its usage events from 1 again. Keyed by our event id alone, Stripe took its
    overage for repeats of the first one's and dropped it."""
    from sqlalchemy import text

    from app import create_app
    from core.auth import Role
    from tests.conftest import _tables

    app, key, env, tag = setup

    def bill(app: Any, key: str) -> Any:
        client = app.test_client()
        client.post("/v1/checkout/sessions", headers=bearer(key), json={
            "user": "alice", "plan": f"metered-{tag}", "success_url": "https://a.example/ok",
            "cancel_url": "https://a.example/no",
            "consent_id": consent_for(flask_call(client, key), "alice", f"metered-{tag}")})
        client.put("/v1/users/alice/plan", json={"plan": f"metered-{tag}"},
                   headers=bearer(key))
        track(client, key, 130, "r1")  # 30 past the allowance
        assert "reported 1 overage" in cli(env, "billing", "report-overage").output
        return cli(env, "billing", "reconcile", "--period", utcnow().strftime("%Y-%m"))

    first = bill(app, key)
    assert first.exit_code == 0 and " 30 " in first.output, first.output
    with clean_db.begin() as conn:  # the database rebuilt: ids start again from 1
        conn.execute(text(f"TRUNCATE {_tables()} RESTART IDENTITY CASCADE"))
    assert cli(env, "plans", "sync").exit_code == 0
    rebuilt = create_app(replace(config_from_toml(Path(env["MLANE_CONFIG"]).read_text(),
                                                  tmp_path, database_url=pg_url),
                                 stripe_api_key="sk_test_meterlane"))
    try:
        second = bill(rebuilt, rebuilt.extensions["wiring"].keys.create_key(
            Role.APP, "acme").key)
    finally:
        rebuilt.extensions["wiring"].engine.dispose()
    assert second.exit_code == 0 and " 30 " in second.output, second.output
