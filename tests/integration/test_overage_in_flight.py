"""A send of unknown fate past Stripe's de-duplication window is checked against Stripe's
meter per customer and minute: what the meter sums beyond those marked sent. Another send
of that minute tried recently and not marked yet may be in the meter or not, so the check
would tell nothing: both reporters (token overage, meter overage) leave the old send for a
later run instead of marking it sent when Stripe never got it (under-billing)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace as Ns
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.models import App, EndUser
from plans.meter_stripe import MeterOverageReporter
from plans.models import CreditOverage, MeterOverage, StripeCustomer
from plans.overage import OverageReporter
from plans.stripe_sync import METER_EVENT, event_name

pytestmark = pytest.mark.integration


def fake_stripe(meter_event: str, summed: float) -> tuple[Any, list[dict[str, Any]]]:
    """A Stripe client whose meter `meter_event` sums `summed` for any customer and minute;
    the meter events sent to it are kept in the list."""
    sent: list[dict[str, Any]] = []
    meters = Ns(list=lambda params: Ns(data=[Ns(id="mtr_1", event_name=meter_event)]),
                event_summaries=Ns(list=lambda meter, params: Ns(
                    data=[Ns(aggregated_value=summed)])))
    client = Ns(v1=Ns(billing=Ns(meters=meters,
                                 meter_events=Ns(create=lambda params: sent.append(params)),
                                 meter_event_adjustments=Ns(create=lambda params: None))))
    return client, sent


def a_customer(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(App).values(id=1, name="acme"))
        conn.execute(insert(EndUser).values(id=1, app_id=1, external_id="u"))
        conn.execute(insert(StripeCustomer).values(customer_id="cus_1", app_id=1,
                                                   end_user_id=1))


def test_meter_overage_of_a_minute_with_a_recent_unmarked_send_is_not_marked_blind(
        clean_db: Engine) -> None:
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
    client, sent = fake_stripe(event_name("search"), 1.0)  # event 2's unit
    reporter = MeterOverageReporter(engine, lambda: client)

    assert reporter.report(batch=1) == 0  # event 1 only: left for a later run
    with engine.connect() as conn:
        rows = conn.execute(select(MeterOverage.meter_event_id, MeterOverage.reported_at,
                                   MeterOverage.report_error)
                            .order_by(MeterOverage.meter_event_id)).all()
    assert [(r.reported_at, r.report_error) for r in rows] == [(None, None)] * 2
    assert sent == []

    # event 2 marked (its sender finished): Stripe's unit is event 2's; event 1 is sent
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).where(MeterOverage.meter_event_id == 2)
                     .values(reported_at=now))
    assert reporter.report(batch=1) == 1
    assert len(sent) == 1 and sent[0]["identifier"].startswith("mlane_mv_1_")


def test_token_overage_of_a_minute_with_a_recent_unmarked_send_is_not_marked_blind(
        clean_db: Engine) -> None:
    engine = clean_db
    a_customer(engine)
    now = utcnow()
    minute = now.replace(second=0, microsecond=0) - timedelta(days=3)
    base = dict(end_user_id=1, plan_id="p", plan_version=1, credits=30, happened_at=minute)
    with engine.begin() as conn:
        conn.execute(insert(CreditOverage).values(
            usage_event_id=1, report_attempted_at=now - timedelta(days=2), **base))
        conn.execute(insert(CreditOverage).values(
            usage_event_id=2, report_attempted_at=now - timedelta(minutes=1), **base))
    client, sent = fake_stripe(METER_EVENT, 30.0)  # event 2's credits
    reporter = OverageReporter(engine, lambda: client)

    assert reporter.report(batch=1) == 0  # event 1 only: left for a later run
    with engine.connect() as conn:
        first = conn.execute(select(CreditOverage).where(
            CreditOverage.usage_event_id == 1)).one()
    assert first.reported_at is None and first.report_error is None and sent == []

    with engine.begin() as conn:  # event 2 marked: Stripe's 30 are its; event 1 is sent
        conn.execute(update(CreditOverage).where(CreditOverage.usage_event_id == 2)
                     .values(reported_at=now))
    assert reporter.report(batch=1) == 1
    assert len(sent) == 1 and sent[0]["identifier"].startswith("mlane_ov_1_")
