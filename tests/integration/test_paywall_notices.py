"""After the checkout: the acknowledgment's content (ACK-01), the reminders of `meterlane notices
run` inside each window (NTC-01 ... NTC-04), and the EU withdrawal with its pro-rata refund
(CXL-04), against the fake Stripe on loopback."""

from __future__ import annotations

from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from core.db import utcnow
from paywall.acknowledge import of_subscription
from paywall.models import Notice
from plans.models import RevenueEvent, Subscription
from tests.support.lifecycle import Clock, World, open_world

pytestmark = pytest.mark.integration
DAY = timedelta(days=1)
world = pytest.fixture(name="world")(open_world)


def acks(w: World, user: str) -> list[dict[str, Any]]:
    return [e["data"] for e in w.sent() if e["type"] == "acknowledgment.sent"
            and e["data"]["user"] == user]


def test_ack_01_a_trial_checkout_is_acknowledged_with_every_required_token(
        world: World) -> None:
    w = world
    sub_id, session = w.subscribe("tina", "trial", "US-CA", email="tina@example.com")
    [ack] = acks(w, "tina")
    assert ack["tokens"]["missing"] == []
    # the first charge: the plan's price when the 30-day trial the plan gives ends
    trial_end = w.stripe.v1.subscriptions.retrieve(sub_id).trial_end
    assert trial_end is not None  # Stripe's, from the trial_period_days the checkout set
    first = datetime.fromisoformat(ack["first_charge_date"])
    assert abs(first.timestamp() - trial_end) < 60  # DSC-03: the date said is Stripe's
    assert first.strftime("%Y-%m-%d") in ack["text"]
    assert ack["first_charge_amount"] == "12.00 USD" and ack["trial_days"] == 30
    assert ack["how_to_cancel"] == "Settings > Subscription > Cancel"
    assert ack["withdrawal_deadline"] is None  # California: no withdrawal right
    # the same Stripe event again: nothing new
    w.webhook("checkout.session.completed", {
        **w.stripe.v1.checkout.sessions.retrieve(session).to_dict(), "status": "complete",
        "subscription": sub_id})
    assert len(acks(w, "tina")) == 1
    # in the EU, with the early-start request: the withdrawal deadline and what it refunds
    sub_eu, _ = w.subscribe("emma", "pro", "EU-FR", early_start=True)
    [eu] = acks(w, "emma")
    assert eu["early_start"] is True and eu["withdrawal_deadline"]
    unused = {"en": "refunds the unused part", "fr": "rembourse donc la part non utilisée",
              "de": "erstattet ein Widerruf den nicht genutzten Teil"}[eu["locale"]]
    assert unused in eu["text"] and eu["tokens"]["missing"] == []


def run_notices(w: World, at: Any) -> list[dict[str, Any]]:
    w.w.notices.clock = Clock(at)
    return list(w.w.notices.run())


def test_ntc_01_a_30_day_trial_is_reminded_inside_its_window_once(world: World
                                                                  ) -> None:
    w = world
    sub_id, _ = w.subscribe("trudy", "trial", "US-CA")
    now = utcnow()
    assert run_notices(w, now + 19 * DAY) == []  # 11 days before the end: too early
    [notice] = run_notices(w, now + 20 * DAY + timedelta(hours=1))  # inside 21-7 days before
    assert notice["notice_type"] == "trial_ending" and notice["on_time"] is True
    assert notice["subscription"] == sub_id and notice["amount"] == "12.00 USD"
    assert notice["first_charge_date"] in notice["text"] and "cancel" in notice["text"]
    assert run_notices(w, now + 21 * DAY) == []  # sent once
    sent = [e for e in w.sent() if e["type"] == "notice.sent"]
    assert [e["data"]["notice_id"] for e in sent] == [notice["notice_id"]]
    # a trial cancelled before its notice is due is not told it will be charged
    other, _ = w.subscribe("tom", "trial", "US-CA")
    status, _ = w.call("POST", f"/v1/subscriptions/{other}/cancel")
    assert status == 200
    w.webhook("customer.subscription.updated",
              w.stripe.v1.subscriptions.retrieve(other).to_dict())
    assert all(n["subscription"] != other for n in run_notices(w, now + 22 * DAY))


def test_ntc_02_and_03_yearly_renewal_and_anniversary_reminders(world: World
                                                                ) -> None:
    w = world
    yearly, _ = w.subscribe("yuri", "annual", "US-CO")
    monthly, _ = w.subscribe("mona", "pro", "US-CA")
    now = utcnow()
    assert run_notices(w, now) == []
    # 11 months on (a monthly subscription's 12th month): nothing yet
    assert run_notices(w, now + 330 * DAY) == []
    # a year on, less 20 days: the yearly plan's renewal, and every subscription's reminder
    at = now + 345 * DAY
    got = {(n["subscription"], n["notice_type"]) for n in run_notices(w, at)}
    assert got == {(monthly, "annual_reminder"), (yearly, "annual_reminder"),
                   (yearly, "renewal_upcoming")}
    assert run_notices(w, at + DAY) == []  # once per subscription year
    with w.w.engine.connect() as conn:
        kinds = conn.execute(select(Notice.notice_type, Notice.occasion, Notice.on_time).where(
            Notice.subscription_id == monthly)).all()
    anniversary = (now + 365 * DAY).strftime("%Y-%m-%d")
    assert [tuple(k) for k in kinds] == [("annual_reminder", anniversary, True)]
    # a cancelled subscription gets none of them (nothing renews)
    w.call("POST", f"/v1/subscriptions/{monthly}/cancel")
    w.webhook("customer.subscription.updated",
              w.stripe.v1.subscriptions.retrieve(monthly).to_dict())
    assert all(n["subscription"] != monthly for n in run_notices(w, now + 710 * DAY))


def test_ntc_02_a_yearly_renewal_is_noticed_30_days_ahead(world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("rene", "annual", "US-CA")
    row = w.w.subscriptions.state(w.w.auth.authenticate(w.key).app_id, sub_id)
    end = row.current_period_end
    w.w.notices.clock = Clock(end - 41 * DAY)
    assert [n for n in w.w.notices.run() if n["notice_type"] == "renewal_upcoming"] == []
    w.w.notices.clock = Clock(end - 29 * DAY)
    [renewal] = [n for n in w.w.notices.run() if n["notice_type"] == "renewal_upcoming"]
    assert renewal["on_time"] is True and renewal["window"] == "25-40 days before"
    assert renewal["amount"] == "96.00 EUR" and "renews on" in renewal["text"]


def test_ntc_04_a_price_change_needs_30_days_and_is_noticed_21_days_ahead(
        world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("pete", "trial", "US-NY")  # on trial@2 (the current version)
    # subscribers of trial@1 move to @2: one is put on @1 through its subscription event
    with w.w.engine.begin() as conn:
        conn.execute(Subscription.__table__.update().where(Subscription.id == sub_id)
                     .values(plan_version=1, status="active"))
    soon = (utcnow() + 3 * DAY).isoformat()
    status, refused = w.call("POST", "/v1/price-changes", {
        "plan": "trial", "to_version": 2, "effective_at": soon}, key=w.admin)
    assert status == 422 and refused["rule"] == "NTC-04", refused
    status, _ = w.call("POST", "/v1/price-changes", {
        "plan": "trial", "to_version": 2, "effective_at": soon})  # an app key: no
    assert status == 403
    effective = utcnow() + 45 * DAY
    status, change = w.call("POST", "/v1/price-changes", {
        "plan": "trial", "to_version": 2, "effective_at": effective.isoformat()}, key=w.admin)
    assert status == 201 and change["from_version"] == 1, change
    assert change["old_price"] == "10.00 USD" and change["new_price"] == "12.00 USD"
    assert [n for n in run_notices(w, utcnow()) if n["notice_type"] == "price_change"] == []
    due = [n for n in run_notices(w, effective - 20 * DAY) if n["notice_type"] ==
           "price_change"]
    assert [(n["subscription"], n["on_time"]) for n in due] == [(sub_id, True)]
    assert "12.00 USD" in due[0]["text"] and "10.00 USD" in due[0]["text"]
    status, bad = w.call("POST", "/v1/price-changes", {
        "plan": "trial", "to_version": 9, "effective_at": effective.isoformat()}, key=w.admin)
    assert status == 404


def test_the_notices_command_sends_what_is_due_once(world: World, tmp_path: Any,
                                                    pg_url: str) -> None:
    w = world
    from app import main
    from plans.models import Subscription

    sub_id, _ = w.subscribe("cora", "trial", "US-CA")
    with w.w.engine.begin() as conn:  # the trial ends in 9 days: its notice is due now
        conn.execute(Subscription.__table__.update().where(Subscription.id == sub_id)
                     .values(trial_end=utcnow() + 9 * DAY))
    w.sent()
    env = {"MLANE_DATABASE_URL": pg_url, "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
           "MLANE_WEBHOOKS_ALLOW_PRIVATE": "1"}
    out = CliRunner().invoke(main, ["notices", "run"], env=env)
    assert out.exit_code == 0, out.output
    assert "trial_ending" in out.output and sub_id in out.output
    assert "sent 1 notices" in out.output
    # delivered by the command itself, signed
    [notice] = [orjson.loads(d.body) for d in w.receiver.deliveries
                if orjson.loads(d.body)["type"] == "notice.sent"]
    assert notice["data"]["subscription"] == sub_id and notice["data"]["on_time"] is True
    again = CliRunner().invoke(main, ["notices", "run"], env=env)
    assert again.exit_code == 0 and "sent 0 notices" in again.output


def test_cxl_04_withdrawal_on_day_5_of_a_yearly_plan_refunds_the_unused_part(
        world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("fleur", "annual", "EU-FR", early_start=True)
    paid = w.pay(sub_id, 9600)
    with w.w.engine.connect() as conn:  # the revenue knows the plan it paid for (finance)
        assert conn.execute(select(RevenueEvent.plan_id).where(
            RevenueEvent.source_id == paid["id"])).scalar() == "annual"
    app_id = w.w.auth.authenticate(w.key).app_id
    with w.w.engine.connect() as conn:
        started = of_subscription(conn, app_id, sub_id).started_at
    w.w.withdrawals.clock = Clock(started + 4 * DAY + timedelta(hours=3))  # on its 5th day
    status, made = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 201, made
    assert (made["days_used"], made["term_days"], made["paid"]) == (5, 365, 9600)
    exact = Fraction(9600) * (1 - Fraction(5, 365))  # 9468.49...
    assert made["refund"] == round(exact) == 9468
    assert made["early_start"] is True and made["refund_ref"].startswith("re_")
    stripe_sub = w.stripe.v1.subscriptions.retrieve(sub_id)
    assert stripe_sub.status == "canceled"
    assert [(r["id"], r["amount"]) for r in w.refunds()
            if r["metadata"].get("mlane_withdrawal") == sub_id] == [(made["refund_ref"], 9468)]
    again = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert again[0] == 200 and again[1]["withdrawal_id"] == made["withdrawal_id"]
    assert len([r for r in w.refunds() if r["metadata"].get("mlane_withdrawal") == sub_id]) == 1
    [event] = [e["data"] for e in w.sent() if e["type"] == "withdrawal.confirmed"]
    assert event["refund"] == 9468 and "received on" in event["text"]
    # without the early-start request: all of it back
    sub_full, _ = w.subscribe("felix", "annual", "EU-FR")
    w.pay(sub_full, 9600)
    status, full = w.call("POST", "/v1/withdrawals", {"subscription": sub_full})
    assert status == 201 and full["refund"] == 9600 and full["early_start"] is False
    # after the 14 days, in California, another app's: refused, nothing changed
    sub_late, _ = w.subscribe("lena", "pro", "EU-DE")
    w.w.withdrawals.clock = Clock(utcnow() + 15 * DAY)
    status, late = w.call("POST", "/v1/withdrawals", {"subscription": sub_late})
    assert status == 409 and late["rule"] == "CXL-04"
    sub_ca, _ = w.subscribe("cali", "pro", "US-CA")
    w.w.withdrawals.clock = utcnow
    status, ca = w.call("POST", "/v1/withdrawals", {"subscription": sub_ca})
    assert status == 409 and ca["code"] == "withdrawal_not_available"
    status, _ = w.call("POST", "/v1/withdrawals", {"subscription": sub_ca}, key=w.other)
    assert status == 404
    assert w.stripe.v1.subscriptions.retrieve(sub_late).status == "active"
    status, _ = w.call("POST", "/v1/withdrawals", {"subscription": 5})
    assert status == 422 or status == 400


def test_cxl_04_a_withdrawal_stopped_by_stripe_resumes_and_refunds_each_invoice_once(
        world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("wanda", "annual", "EU-DE", early_start=True)
    first = w.pay(sub_id, 9600)
    second = w.pay(sub_id, 1000)  # a second invoice (a proration): no single charge has all
    w.fail_next("POST /v1/refunds", 3)  # Stripe fails (the library's retries too)
    status, failed = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 502, failed
    assert w.stripe.v1.subscriptions.retrieve(sub_id).status == "active"  # not ended unpaid
    assert [e for e in w.sent() if e["type"] == "withdrawal.confirmed"] == []
    # later (the subscription may have changed meanwhile): the recorded withdrawal resumes
    w.w.withdrawals.clock = Clock(utcnow() + 3 * DAY)
    status, done = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 201, done
    assert done["paid"] == 10600 and done["days_used"] == 1  # as computed the first time
    by_invoice = {r["metadata"]["mlane_invoice"]: r["amount"] for r in w.refunds()
                  if r["metadata"].get("mlane_withdrawal") == sub_id}
    assert by_invoice == {second["id"]: 1000, first["id"]: done["refund"] - 1000}
    assert sum(by_invoice.values()) == done["refund"] == round(10600 * Fraction(364, 365))
    assert w.stripe.v1.subscriptions.retrieve(sub_id).status == "canceled"
    status, again = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 200 and again["withdrawal_id"] == done["withdrawal_id"]
    assert len([r for r in w.refunds() if r["metadata"].get("mlane_withdrawal") == sub_id]) == 2
    assert len([e for e in w.sent() if e["type"] == "withdrawal.confirmed"]) == 1


def test_cxl_04_an_early_start_request_for_another_offer_does_not_count(world: World) -> None:
    w = world
    from tests.support.consent import publish_offer

    other = publish_offer(w.as_call(), "lite")
    w.consent("otto", other, "EU-FR", "eu_early_start")  # asked for another offer
    sub_id, _ = w.subscribe("otto", "annual", "EU-FR")
    [ack] = acks(w, "otto")
    assert ack["early_start"] is False
    w.pay(sub_id, 9600)
    status, made = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 201 and made["refund"] == 9600  # all of it back


def test_bad_input_on_the_new_routes_is_a_clear_error(world: World) -> None:
    w = world
    for path in ("/v1/compliance/evidence?subscription=%00",
                 "/v1/subscriptions/a%00b/cancel-screen"):
        status, body = w.call("GET", path)
        assert status in (400, 404), (path, body)
    status, body = w.call("POST", "/v1/withdrawals", {"subscription": "sub_\u0000"})
    assert status in (400, 404), body
    status, body = w.call("POST", "/v1/price-changes", {"plan": "trial", "to_version": 2,
                                                       "effective_at": "2027-01-01T00:00:00"},
                          key=w.admin)
    assert status == 422, body  # no time zone
