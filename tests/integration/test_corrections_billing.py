"""Corrections and money: a voided event's burned credits and allowance are given back, an
amended one is charged the difference; overage already sent to Stripe is cancelled with a
meter event adjustment (the repo's fake Stripe over HTTP), overage not sent yet never goes;
`billing reconcile` agrees after each; a correction racing the original's accounting."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from plans.models import CreditOverage, CreditUse, StripeCustomer
from plans.overage import meter_identifier
from tests.conftest import bearer
from tests.integration.test_stripe_overage import cli, setup, subscribe_alice, track

pytestmark = pytest.mark.integration
__all__ = ["setup"]  # the fixture, shared with the overage tests


def correct(client: Any, key: str, corrects: str, action: str, idem: str,
            **more: Any) -> Any:
    resp = client.post("/v1/meter/corrections", headers=bearer(key), json={
        "idempotency_key": idem, "corrects": corrects, "action": action, **more})
    assert resp.status_code == 201, resp.data
    return resp


def balance(client: Any, key: str) -> int:
    body = client.get("/v1/users/alice/credits", headers=bearer(key))  # accounts first
    assert body.status_code == 200, body.data
    return int(body.get_json()["balance"])


def overage(engine: Engine) -> dict[str, int]:
    """Overage credits standing (not cancelled) and cancelled."""
    with engine.connect() as conn:
        rows = conn.execute(select(CreditOverage.credits, CreditOverage.cancelled_at)).all()
    return {"standing": sum(r[0] for r in rows if r[1] is None),
            "cancelled": sum(r[0] for r in rows if r[1] is not None)}


def sent_for(fake_stripe: str, engine: Engine, usage_event_id: int) -> list[dict[str, Any]]:
    """The meter events Stripe holds for this database's event (the fake Stripe is the
    session's: other tests' databases number their events from 1 too)."""
    with engine.connect() as conn:
        customer = conn.execute(select(StripeCustomer.customer_id)).scalar_one()
    ours = meter_identifier(usage_event_id, customer)
    events = httpx.get(f"{fake_stripe}/_config/meter_events").json()["data"]
    return [e for e in events if e["identifier"] == ours]


def reconciled(env: dict[str, str]) -> Any:
    return cli(env, "billing", "reconcile", "--period", utcnow().strftime("%Y-%m"))


def test_void_after_the_overage_was_sent_cancels_it_with_stripe(
        setup: Any, clean_db: Engine, fake_stripe: str) -> None:
    app, key, env, tag = setup
    client = app.test_client()
    subscribe_alice(client, key, tag)
    assert client.post("/v1/users/alice/credits/grants", headers=bearer(key), json={
        "amount": 20, "source": "promotion", "external_id": "p1"}).status_code == 201
    track(client, key, 150, "u1")  # 100 of allowance, 20 of credits, 30 of overage
    assert balance(client, key) == 0
    sent = cli(env, "billing", "report-overage")
    assert "reported 1 overage" in sent.output, sent.output
    assert reconciled(env).exit_code == 0

    correct(client, key, "u1", "void", "fix-u1")
    assert balance(client, key) == 20  # the burned credits are back
    assert overage(clean_db) == {"standing": 0, "cancelled": 30}
    behind = reconciled(env)  # Stripe still holds the 30 until the cancel goes
    assert behind.exit_code == 1 and "DIFFERENCE" in behind.output, behind.output
    assert cli(env, "billing", "report-overage").exit_code == 0
    with clean_db.connect() as conn:
        row = conn.execute(select(CreditOverage.usage_event_id, CreditOverage.cancel_sent_at,
                                  CreditOverage.cancel_error)).one()
    assert row.cancel_sent_at is not None and row.cancel_error is None
    mine = sent_for(fake_stripe, clean_db, row.usage_event_id)
    assert len(mine) == 1 and mine[0].get("cancelled") is True
    ok = reconciled(env)
    assert ok.exit_code == 0 and "all reconciled" in ok.output, ok.output
    assert "reported 0 overage" in cli(env, "billing", "report-overage").output  # once

    # the allowance the void gave back serves what comes next: no credits, no overage
    track(client, key, 100, "u2")
    assert balance(client, key) == 20
    assert overage(clean_db)["standing"] == 0


def test_amend_charges_the_difference_and_unsent_overage_never_goes(
        setup: Any, clean_db: Engine, fake_stripe: str) -> None:
    app, key, env, tag = setup
    client = app.test_client()
    subscribe_alice(client, key, tag)
    track(client, key, 150, "u1")  # 50 of overage, not sent yet
    assert balance(client, key) == 0
    assert overage(clean_db) == {"standing": 50, "cancelled": 0}
    correct(client, key, "u1", "amend", "fix-u1", usage={"input_tokens": 120})
    balance(client, key)  # accounts the amendment
    assert overage(clean_db) == {"standing": 20, "cancelled": 50}
    sent = cli(env, "billing", "report-overage")
    assert "reported 1 overage" in sent.output, sent.output
    with clean_db.connect() as conn:
        original, amendment = conn.execute(select(CreditOverage.usage_event_id)
                                           .order_by(CreditOverage.usage_event_id)).scalars()
        uses = conn.execute(select(func.sum(CreditUse.credits), func.sum(CreditUse.allowance))
                            ).one()
    # the amendment's overage: a meter event of its own; the original's never sent
    assert [e["payload"]["value"] for e in sent_for(fake_stripe, clean_db, amendment)] == ["20"]
    assert sent_for(fake_stripe, clean_db, original) == []  # nothing to cancel
    assert tuple(uses) == (120, 100)  # the splits add up to what counts now
    ok = reconciled(env)
    assert ok.exit_code == 0 and "all reconciled" in ok.output and " 20 " in ok.output, \
        ok.output


def test_a_cancel_past_stripes_window_is_set_aside_for_an_operator(
        setup: Any, clean_db: Engine) -> None:
    app, key, env, tag = setup
    client = app.test_client()
    subscribe_alice(client, key, tag)
    track(client, key, 130, "u1")
    assert "reported 1 overage" in cli(env, "billing", "report-overage").output
    with clean_db.begin() as conn:  # sent two days ago: Stripe cancels within 24 hours only
        conn.execute(update(CreditOverage).values(
            reported_at=utcnow() - timedelta(days=2),
            report_attempted_at=utcnow() - timedelta(days=2)))
    correct(client, key, "u1", "void", "fix-u1")
    assert cli(env, "billing", "report-overage").exit_code == 0
    with clean_db.connect() as conn:
        error = conn.execute(select(CreditOverage.cancel_error)).scalar_one()
    assert error and "credit the customer" in error
    shown = reconciled(env)
    assert shown.exit_code == 1 and "DIFFERENCE" in shown.output  # never silently even


def together(*steps: Any) -> None:
    """Run the steps at once (each on its own thread, released by one barrier)."""
    gate = threading.Barrier(len(steps))
    errors: list[BaseException] = []

    def run(step: Any) -> None:
        try:
            gate.wait()
            step()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(step,)) for step in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_a_correction_racing_the_originals_accounting(setup: Any, clean_db: Engine) -> None:
    """The void lands before, during or after the accounting of the event it voids; however
    they interleave, what stands at the end is as if the event never happened."""
    app, key, env, tag = setup
    w = app.extensions["wiring"]
    client = app.test_client()
    subscribe_alice(client, key, tag)
    assert client.post("/v1/users/alice/credits/grants", headers=bearer(key), json={
        "amount": 1000, "source": "promotion", "external_id": "p1"}).status_code == 201
    track(client, key, 90, "base")  # 90 of the 100 allowance
    for n in range(8):
        track(client, key, 150, f"r{n}")  # 10 allowance + 140 credits each time
        together(lambda: w.accrual.accrue_all(utcnow()),
                 lambda n=n: correct(app.test_client(), key, f"r{n}", "void", f"fix-r{n}"))
    w.accrual.accrue_all(utcnow())
    assert balance(client, key) == 1000  # every burned credit given back
    assert overage(clean_db)["standing"] == 0
    with clean_db.connect() as conn:
        net = conn.execute(select(func.sum(CreditUse.credits), func.sum(CreditUse.allowance))
                           ).one()
    assert tuple(net) == (90, 90)  # only "base" counts, inside the allowance
    track(client, key, 10, "after")  # the rest of the allowance is still there
    assert balance(client, key) == 1000
    ok = reconciled(env)
    assert ok.exit_code == 0 and "all reconciled" in ok.output, ok.output


def test_an_amendment_burns_the_credits_its_original_gave_back(
        setup: Any, clean_db: Engine) -> None:
    app, key, env, tag = setup
    client = app.test_client()
    subscribe_alice(client, key, tag)
    assert client.post("/v1/users/alice/credits/grants", headers=bearer(key), json={
        "amount": 20, "source": "promotion", "external_id": "p1"}).status_code == 201
    track(client, key, 150, "u1")  # 100 allowance, 20 credits, 30 overage
    assert balance(client, key) == 0
    correct(client, key, "u1", "amend", "fix-u1", usage={"input_tokens": 110})
    assert balance(client, key) == 10  # 100 allowance, 10 of the 20 credits given back
    assert overage(clean_db) == {"standing": 0, "cancelled": 30}
    with clean_db.connect() as conn:
        burned = conn.execute(select(func.sum(CreditUse.credits))).scalar_one()
    assert burned == 110
    ok = reconciled(env)
    assert ok.exit_code == 0 and "all reconciled" in ok.output, ok.output
