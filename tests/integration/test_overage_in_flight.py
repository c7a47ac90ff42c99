"""A send of unknown fate past Stripe's de-duplication window is checked against Stripe's
meter per customer and minute: what the meter sums beyond those marked sent. Another send
of that minute tried recently and not marked yet may be in the meter or not, so the check
would tell nothing: both reporters (token overage, meter overage) leave the old send for a
later run instead of marking it sent when Stripe never got it (under-billing)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.models import App, EndUser
from plans import meter_stripe, overage
from plans.meter_stripe import MeterOverageReporter
from plans.models import CreditOverage, MeterOverage, StripeCustomer
from plans.overage import OverageReporter
from plans.stripe_sync import METER_EVENT, event_name
from tests.conftest import fake_stripe_server

pytestmark = pytest.mark.integration


@pytest.fixture()
def stripe_url() -> Iterator[str]:
    with fake_stripe_server() as url:  # the repo's fake Stripe over HTTP, this test's own
        yield url


def stripe_with_meter(url: str, meter_event: str) -> Any:
    """The official client against the fake, which has the meter `meter_event`."""
    import stripe

    client = stripe.StripeClient("sk_test_meterlane", base_addresses={"api": url})
    client.v1.billing.meters.create(params={
        "display_name": meter_event, "event_name": meter_event,
        "default_aggregation": {"formula": "sum"}})
    return client


def landed(client: Any, meter_event: str, identifier: str, value: str,
           minute: datetime) -> None:
    """A send that reached Stripe (its sender has yet to mark it)."""
    client.v1.billing.meter_events.create(params={
        "event_name": meter_event, "identifier": identifier, "timestamp": int(minute.timestamp()),
        "payload": {"stripe_customer_id": "cus_1", "value": value}})


def identifiers(url: str) -> list[str]:
    return [e["identifier"] for e in httpx.get(f"{url}/_config/meter_events").json()["data"]]


def a_customer(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(App).values(id=1, name="acme"))
        conn.execute(insert(EndUser).values(id=1, app_id=1, external_id="u"))
        conn.execute(insert(StripeCustomer).values(customer_id="cus_1", app_id=1,
                                                   end_user_id=1))


def test_meter_overage_of_a_minute_with_a_recent_unmarked_send_is_not_marked_blind(
        clean_db: Engine, stripe_url: str) -> None:
    engine = clean_db
    a_customer(engine)
    now = utcnow()
    minute = now.replace(second=0, microsecond=0) - timedelta(days=3)
    base = dict(app_id=1, end_user_id=1, meter_id="search", plan_id="p", plan_version=1,
                units_micro=10**6, price_minor="5", currency="usd", happened_at=minute)
    with engine.begin() as conn:
        # 1: tried two days ago, never reached Stripe; 2: the same minute (late events share
        # the cycle's start), tried a minute ago by another reporter: in Stripe's meter
        conn.execute(insert(MeterOverage).values(
            meter_event_id=1, report_attempted_at=now - timedelta(days=2), **base))
        conn.execute(insert(MeterOverage).values(
            meter_event_id=2, report_attempted_at=now - timedelta(minutes=1), **base))
    client = stripe_with_meter(stripe_url, event_name("search"))
    landed(client, event_name("search"), meter_stripe.meter_identifier(2, "cus_1"), "1",
           minute)  # event 2's unit
    reporter = MeterOverageReporter(engine, lambda: client)
    first = meter_stripe.meter_identifier(1, "cus_1")

    assert reporter.report(batch=1) == 0  # event 1 only: left for a later run
    with engine.connect() as conn:
        rows = conn.execute(select(MeterOverage.meter_event_id, MeterOverage.reported_at,
                                   MeterOverage.report_error)
                            .order_by(MeterOverage.meter_event_id)).all()
    assert [(r.reported_at, r.report_error) for r in rows] == [(None, None)] * 2
    assert first not in identifiers(stripe_url)

    # event 2 marked (its sender finished): Stripe's unit is event 2's; event 1 is sent
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).where(MeterOverage.meter_event_id == 2)
                     .values(reported_at=now))
    assert reporter.report(batch=1) == 1
    assert identifiers(stripe_url).count(first) == 1


def two_token_sends(engine: Engine, *, second_refused: str | None = None
                    ) -> tuple[datetime, datetime]:
    """Token overage of one customer's minute three days ago: event 1 tried two days ago
    (never reached Stripe), event 2 a minute ago (unmarked; refused by Stripe when
    `second_refused`). (now, the minute)"""
    a_customer(engine)
    now = utcnow()
    minute = now.replace(second=0, microsecond=0) - timedelta(days=3)
    base = dict(end_user_id=1, plan_id="p", plan_version=1, credits=30, happened_at=minute)
    with engine.begin() as conn:
        conn.execute(insert(CreditOverage).values(
            usage_event_id=1, report_attempted_at=now - timedelta(days=2), **base))
        conn.execute(insert(CreditOverage).values(
            usage_event_id=2, report_attempted_at=now - timedelta(minutes=1),
            report_error=second_refused, **base))
    return now, minute


def test_token_overage_of_a_minute_with_a_recent_unmarked_send_is_not_marked_blind(
        clean_db: Engine, stripe_url: str) -> None:
    engine = clean_db
    now, minute = two_token_sends(engine)
    client = stripe_with_meter(stripe_url, METER_EVENT)
    landed(client, METER_EVENT, overage.meter_identifier(2, "cus_1"), "30",
           minute)  # event 2's credits
    reporter = OverageReporter(engine, lambda: client)
    first_id = overage.meter_identifier(1, "cus_1")

    assert reporter.report(batch=1) == 0  # event 1 only: left for a later run
    with engine.connect() as conn:
        first = conn.execute(select(CreditOverage).where(
            CreditOverage.usage_event_id == 1)).one()
    assert first.reported_at is None and first.report_error is None
    assert first_id not in identifiers(stripe_url)

    with engine.begin() as conn:  # event 2 marked: Stripe's 30 are its; event 1 is sent
        conn.execute(update(CreditOverage).where(CreditOverage.usage_event_id == 2)
                     .values(reported_at=now))
    assert reporter.report(batch=1) == 1
    assert identifiers(stripe_url).count(first_id) == 1


def test_a_recent_send_stripe_refused_does_not_hold_the_minutes_check(
        clean_db: Engine, stripe_url: str) -> None:
    """A send Stripe refused (report_error: never in its meter) is not in flight: the old
    send of the same minute is checked at once, and sent (the meter holds none of it)."""
    engine = clean_db
    two_token_sends(engine, second_refused="No such customer: 'cus_1'")
    client = stripe_with_meter(stripe_url, METER_EVENT)
    assert OverageReporter(engine, lambda: client).report(batch=1) == 1
    assert identifiers(stripe_url) == [overage.meter_identifier(1, "cus_1")]
