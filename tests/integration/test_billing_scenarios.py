"""The subscription scenario matrix, with a frozen clock: monthly / annual plans x upgrade /
downgrade / cancel x webhooks in order or late, out of order and replayed. Each case checks
the plan the end user ends on and where its windows reset: the allowance monthly from
Stripe's billing anchor (annual plans too), a calendar-month limit on the 1st."""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import Engine

from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.integration.test_limits_gateway import NOW, Clock
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
SECRET = "whsec_matrix"
ANCHOR = NOW - timedelta(days=10, hours=3)  # subscribed 10 days before the frozen "now"

PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "month"
amount = 1000
"""
for plan_id, amount, interval, allowance in (("basic", 1000, "month", 10_000),
                                             ("pro", 2000, "month", 20_000),
                                             ("team", 19200, "year", 50_000),
                                             ("enterprise", 48000, "year", 200_000)):
    PLANS += f"""
[[plans]]
id = "{plan_id}"
price = {{ amount = {amount}, currency = "usd", interval = "{interval}" }}
allowance = {allowance}
[[plans.limits]]
metric = "tokens"
window = "month"
amount = {allowance * 2}
"""

LADDERS = {"monthly": ("basic", "pro"), "annual": ("team", "enterprise")}


def add_months(moment: datetime, months: int) -> datetime:
    month = moment.month - 1 + months
    year, month = moment.year + month // 12, month % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def signed(payload: bytes) -> dict[str, str]:
    return stripe_headers(payload, SECRET)


def sub_event(event_id: str, kind: str, status: str, plan_ref: str, created: int,
              owner: dict[str, str], *, cancel_at_period_end: bool = False) -> bytes:
    anchor = int(ANCHOR.timestamp())
    obj = {"id": "sub_m", "object": "subscription", "customer": "cus_m", "status": status,
           "metadata": owner, "billing_cycle_anchor": anchor,
           "cancel_at_period_end": cancel_at_period_end, "trial_end": None,
           "items": {"object": "list", "data": [{
               "id": "si_m", "current_period_start": anchor,
               "current_period_end": int(add_months(ANCHOR, 1).timestamp()),
               "price": {"id": f"price_{plan_ref}", "lookup_key": plan_ref}}]}}
    return orjson.dumps({"id": event_id, "object": "event", "type": kind, "created": created,
                         "data": {"object": obj}})


@pytest.fixture()
def app(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                              database_url=pg_url)
    app = create_app(replace(config, stripe_webhook_secret=SECRET))
    w = app.extensions["wiring"]
    w.limits.clock = w.gateway.clock = w.metering.clock = w.credits.clock = Clock()
    yield app
    w.engine.dispose()


@pytest.mark.parametrize("interval", ["monthly", "annual"])
@pytest.mark.parametrize("change", ["upgrade", "downgrade", "cancel"])
@pytest.mark.parametrize("delivery", ["in_order", "late_and_replayed"])
def test_subscription_matrix(app: Any, interval: str, change: str, delivery: str) -> None:
    from core.auth import Role

    w = app.extensions["wiring"]
    key = w.keys.create_key(Role.APP, "acme").key
    principal = w.auth.authenticate(key)
    end_user_id = w.tenancy.ensure_end_user(principal.app_id, "alice")
    owner = {"mlane_app_id": str(principal.app_id), "mlane_end_user_id": str(end_user_id)}
    low, high = LADDERS[interval]
    start, then = (low, high) if change == "upgrade" else (high, low)
    events = [sub_event("evt_a", "customer.subscription.created", "active",
                        f"{start}@1", 100, owner)]
    if change == "cancel":
        events.append(sub_event("evt_b", "customer.subscription.updated", "active",
                                f"{start}@1", 200, owner, cancel_at_period_end=True))
        events.append(sub_event("evt_c", "customer.subscription.deleted", "canceled",
                                f"{start}@1", 300, owner))
        expected = "free"
    else:
        events.append(sub_event("evt_b", "customer.subscription.updated", "active",
                                f"{then}@1", 200, owner))
        expected = then
    if delivery == "late_and_replayed":
        events = list(reversed(events)) + events[:1] + events[-1:]
    client = app.test_client()
    for payload in events:
        resp = client.post("/v1/stripe/webhook", data=payload, headers=signed(payload))
        assert resp.status_code == 200, resp.data

    quota = client.get("/v1/users/alice/quota", headers=bearer(key)).get_json()
    assert quota["plan"]["id"] == expected
    lines = {line["id"]: line for line in quota["limits"]}
    first_of_next_month = datetime(NOW.year + NOW.month // 12, NOW.month % 12 + 1, 1,
                                   tzinfo=UTC)
    assert lines["tokens-month"]["resets_at"] == iso(first_of_next_month)  # calendar
    if expected == "free":
        assert "allowance" not in lines
    else:
        # monthly from the billing anchor, for annual plans too
        assert lines["allowance"]["resets_at"] == iso(add_months(ANCHOR, 1))
        assert lines["allowance"]["included"] == {"basic": 10_000, "pro": 20_000,
                                                  "team": 50_000,
                                                  "enterprise": 200_000}[expected]
