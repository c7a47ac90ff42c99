"""The `overage` job sends both kinds of overage (tokens, [[meters]]): Stripe failing the
first does not hold back the second; the run still ends in an error naming what failed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import insert, select

from core.db import utcnow
from core.jobs import JobContext
from core.models import App, EndUser
from plans.meter_stripe import MeterOverageReporter
from plans.models import CreditOverage, MeterOverage, StripeCustomer
from plans.overage import OverageReporter
from plans.stripe_sync import event_name
from tests.conftest import fake_stripe_server

pytestmark = pytest.mark.integration


@pytest.fixture()
def stripe_url() -> Iterator[str]:
    with fake_stripe_server() as url:  # the repo's fake Stripe over HTTP, this test's own
        yield url


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stripe_at(url: str) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_wa", base_addresses={"api": url},
                               max_network_retries=0)


def test_a_stripe_error_on_token_overage_still_sends_the_meter_overage(
        app: Any, stripe_url: str) -> None:
    from app import scheduled_jobs

    wiring = app.extensions["wiring"]
    engine = wiring.engine
    happened = utcnow() - timedelta(minutes=5)
    with engine.begin() as conn:
        app_id = conn.execute(insert(App).values(name="wa-overage").returning(App.id)).scalar()
        user = conn.execute(insert(EndUser).values(app_id=app_id, external_id="u")
                            .returning(EndUser.id)).scalar()
        conn.execute(insert(StripeCustomer).values(customer_id="cus_1", app_id=app_id,
                                                   end_user_id=user))
        conn.execute(insert(CreditOverage).values(
            usage_event_id=1, end_user_id=user, plan_id="p", plan_version=1, credits=30,
            happened_at=happened))
        conn.execute(insert(MeterOverage).values(
            meter_event_id=1, app_id=app_id, end_user_id=user, meter_id="search",
            plan_id="p", plan_version=1, units_micro=10**6, price_minor="5", currency="usd",
            happened_at=happened))
    nobody = f"http://127.0.0.1:{closed_port()}"  # Stripe away: the connection is refused
    tokens = OverageReporter(engine, lambda: stripe_at(nobody))
    meters = MeterOverageReporter(engine, lambda: stripe_at(stripe_url))
    jobs = scheduled_jobs(replace(wiring.config, stripe_api_key="sk_test_wa"),
                          events=wiring.events, notices=wiring.notices,
                          accrual=wiring.accrual, overage=(tokens, meters),
                          finance=wiring.finance, limits=wiring.limits, ledger=wiring.ledger,
                          idempotency=wiring.idempotency)
    [overage] = [j for j in jobs if j.name == "overage"]

    with pytest.raises(Exception, match="token overage not sent: Stripe is unreachable") \
            as failed:
        overage.run(JobContext(last_success_at=None))
    assert "1 events of [[meters]] overage sent" in str(failed.value)
    sent = httpx.get(f"{stripe_url}/_config/meter_events").json()["data"]
    assert [e["event_name"] for e in sent] == [event_name("search")]
    with engine.connect() as conn:
        assert conn.execute(select(MeterOverage.reported_at)).scalar() is not None
        token = conn.execute(select(CreditOverage)).one()
    assert token.reported_at is None and token.report_attempted_at is not None
