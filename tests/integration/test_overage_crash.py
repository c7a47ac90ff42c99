"""A crash between sending an overage meter event and marking it sent: a real
`meterlane billing report-overage` process killed (SIGKILL) while Stripe holds its request.
Stripe drops a repeated identifier for 24 hours only; past that, the next run asks Stripe's
meter event summaries whether the send landed, and never sends it twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.db import utcnow
from plans.models import CreditOverage, StripeCustomer
from plans.overage import OverageReporter, meter_identifier
from tests.conftest import config_from_toml, fake_stripe_server, gateway_toml
from tests.integration.test_stripe_overage import subscribe_alice, track
from tests.support.polling import wait_for
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
DAY = timedelta(hours=25)


@pytest.fixture()
def billed(tmp_path: Path, pg_url: str, clean_db: Engine, upstream: FakeUpstream
           ) -> Iterator[tuple[Any, dict[str, str], str]]:
    """alice on a metered plan with 30 credits of overage accounted and not reported; a
    fake Stripe of this test's own (its clock is moved)."""
    from app import create_app, main
    from core.auth import Role

    tag = uuid.uuid4().hex[:8]
    with fake_stripe_server() as stripe_url:
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
api_base = "{stripe_url}"
"""
        (tmp_path / "meterlane.toml").write_text(toml)
        env = {**os.environ, "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
               "MLANE_DATABASE_URL": pg_url, "MLANE_STRIPE_API_KEY": "sk_test_meterlane",
               "MLANE_DATA_DIR": str(tmp_path / "var")}
        synced = CliRunner().invoke(main, ["plans", "sync"], env=env)
        assert synced.exit_code == 0, synced.output
        app = create_app(replace(config_from_toml(toml, tmp_path, database_url=pg_url),
                                 stripe_api_key="sk_test_meterlane"))
        key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
        client = app.test_client()
        subscribe_alice(client, key, tag)
        track(client, key, 130, "u1")  # 30 past the allowance
        app.extensions["wiring"].accrual.accrue_all(utcnow())
        try:
            yield app, env, stripe_url
        finally:
            app.extensions["wiring"].engine.dispose()


def meter_events(stripe_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{stripe_url}/_config/meter_events").json())


def crash_mid_send(env: dict[str, str], stripe_url: str, *, taken: bool) -> None:
    """Run `billing report-overage` in a process of its own and kill it (SIGKILL) while
    Stripe holds its meter event request, having taken the event or not."""
    httpx.post(f"{stripe_url}/_config/meter_events/hang", json={"taken": taken})
    proc = subprocess.Popen([sys.executable, "-m", "app", "billing", "report-overage"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: meter_events(stripe_url)["hanging"] == 1 or proc.poll() is not None)
        assert proc.poll() is None, "the report ended instead of waiting on Stripe"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def overage_row(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(CreditOverage)).one()


def later_reporter(app: Any, ahead: timedelta) -> OverageReporter:
    """The app's overage reporter, with a clock `ahead` of now."""
    wiring = app.extensions["wiring"]
    return OverageReporter(wiring.engine, wiring.overage.client,
                           clock=lambda: utcnow() + ahead)


def events_of(stripe_url: str, identifier: str) -> list[dict[str, Any]]:
    return [e for e in meter_events(stripe_url)["data"] if e["identifier"] == identifier]


def test_a_send_that_landed_unmarked_is_checked_past_the_window_and_not_sent_again(
        billed: tuple[Any, dict[str, str], str]) -> None:
    app, env, stripe_url = billed
    engine = app.extensions["wiring"].engine
    crash_mid_send(env, stripe_url, taken=True)
    row = overage_row(engine)
    assert row.reported_at is None and row.report_attempted_at is not None  # the crash
    with engine.connect() as conn:
        customer = conn.execute(select(StripeCustomer.customer_id)).scalar_one()
    identifier = meter_identifier(row.usage_event_id, customer)
    assert len(events_of(stripe_url, identifier)) == 1

    # a day later: Stripe no longer de-duplicates that identifier
    httpx.post(f"{stripe_url}/_config/clock", json={"seconds": DAY.total_seconds()})
    assert later_reporter(app, DAY).report() == 1  # found in Stripe's meter, marked
    assert len(events_of(stripe_url, identifier)) == 1  # not sent twice
    assert overage_row(engine).reported_at is not None
    assert later_reporter(app, DAY).report() == 0

    # what a blind re-send would have done: Stripe takes the repeat, and bills it twice
    app.extensions["wiring"].overage.client().v1.billing.meter_events.create(params={
        "event_name": "mlane_overage_credits", "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": "30"},
        "timestamp": int(row.happened_at.timestamp())})
    assert len(events_of(stripe_url, identifier)) == 2


def test_a_send_that_never_landed_is_sent_once_past_the_window(
        billed: tuple[Any, dict[str, str], str]) -> None:
    app, env, stripe_url = billed
    engine = app.extensions["wiring"].engine
    crash_mid_send(env, stripe_url, taken=False)
    row = overage_row(engine)
    assert row.reported_at is None and row.report_attempted_at is not None
    assert meter_events(stripe_url)["data"] == []

    httpx.post(f"{stripe_url}/_config/clock", json={"seconds": DAY.total_seconds()})
    assert later_reporter(app, DAY).report() == 1  # Stripe's meter had none: sent now
    assert later_reporter(app, DAY).report() == 0
    sent = meter_events(stripe_url)["data"]
    assert len(sent) == 1 and sent[0]["payload"]["value"] == "30"
    assert overage_row(engine).reported_at is not None


def test_a_send_that_landed_unmarked_inside_the_window_is_sent_again_and_dropped(
        billed: tuple[Any, dict[str, str], str]) -> None:
    app, env, stripe_url = billed
    crash_mid_send(env, stripe_url, taken=True)
    assert later_reporter(app, timedelta(hours=1)).report() == 1  # Stripe: "already exists"
    assert len(meter_events(stripe_url)["data"]) == 1
    assert overage_row(app.extensions["wiring"].engine).reported_at is not None
