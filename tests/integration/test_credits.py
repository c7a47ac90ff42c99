"""Credits end to end: grants through the API (once per external id), calls past the
allowance burning them, overage up to the spend cap, rollover at the end of a billing cycle;
the balances checked against the ledger, on both limit stores."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from plans.models import CreditGrant, CreditOverage
from tests.conftest import Keys, bearer, config_from_toml
from tests.integration.test_limits_gateway import NOW, Clock, ClosingClient, chat, ledger, quota
from tests.integration.test_plan_terms import tiered_toml
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"

PLANS = """
[[plans]]
id = "basic"
default = true
allowance = 100

[[plans]]
id = "metered"
price = { amount = 1000, currency = "usd", interval = "month" }
allowance = 100
overage = { price_per_1m_tokens = 1000, spend_cap = 1 }   # 1 cent buys 1,000 credits
rollover_cap = 50
credit_multipliers = { frontier = 3 }
"""


@pytest.fixture(params=["sql", "redis"])
def app(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str, upstream: FakeUpstream,
        tmp_path: Path) -> Any:
    from app import create_app

    toml = tiered_toml(upstream.base_url).split("[[plans]]")[0] + PLANS
    config = config_from_toml(toml, tmp_path, database_url=pg_url)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    w = app.extensions["wiring"]
    clock = Clock()
    w.limits.clock = w.gateway.clock = w.metering.clock = w.credits.clock = clock
    app.clock = clock  # type: ignore[attr-defined]
    app.test_client_class = ClosingClient
    yield app
    w.engine.dispose()


def track(client: Any, key: str, user: str, tokens: int, ref: str, model: str = "gpt-4o-mini"
          ) -> None:
    resp = client.post("/v1/meter/track", json={
        "user": user, "model": model, "usage": {"input_tokens": tokens, "output_tokens": 0},
        "idempotency_key": ref}, headers=bearer(key))
    assert resp.status_code in (200, 201), resp.data


def grant(client: Any, key: str, user: str, amount: int, ref: str, **extra: Any) -> Any:
    return client.post(f"/v1/users/{user}/credits/grants", headers=bearer(key), json={
        "amount": amount, "source": "promotion", "external_id": ref, **extra})


def credits(client: Any, key: str, user: str = "alice") -> dict[str, Any]:
    resp = client.get(f"/v1/users/{user}/credits", headers=bearer(key))
    assert resp.status_code == 200, resp.data
    body: dict[str, Any] = resp.get_json()
    return body


def test_credits_carry_calls_past_the_allowance(app: Any, keys: Keys, clean_db: Engine) -> None:
    client = app.test_client()
    track(client, keys.app, "alice", 95, "t1")
    refused = client.post(CHAT, json=chat(max_tokens=10), headers=bearer(keys.app))
    assert refused.status_code == 402
    assert refused.get_json()["error"]["limit"]["id"] == "allowance"

    first = grant(client, keys.app, "alice", 200, "promo-1")
    assert first.status_code == 201 and first.get_json()["remaining"] == 200
    assert grant(client, keys.app, "alice", 200, "promo-1").status_code == 200  # once
    clash = grant(client, keys.app, "alice", 300, "promo-1")
    assert clash.status_code == 409

    served = [client.post(CHAT, json=chat(max_tokens=10), headers=bearer(keys.app))
              for _ in range(3)]
    assert [r.status_code for r in served] == [200, 200, 200]
    used = sum(r.input_tokens + r.output_tokens for r in ledger(clean_db))
    assert used > 100
    body = credits(client, keys.app)
    assert body["granted"] == 200 and body["burned"] == used - 100
    assert body["balance"] == 200 - (used - 100) and body["expired"] == 0
    [only] = body["grants"]
    assert only["remaining"] == body["balance"] and only["state"] == "live"
    line = quota(client, keys.app)["allowance"]
    assert line["included"] == 100 and line["used"] == used
    assert line["remaining"] == body["balance"]  # what the gateway lets through next
    with clean_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(CreditGrant)).scalar_one() == 1
    # another app's key sees none of it
    other = client.get("/v1/users/alice/credits", headers=bearer(keys.other_app)).get_json()
    assert other["granted"] == 0 and other["grants"] == []


def test_bad_grants_are_refused(app: Any, keys: Keys) -> None:
    client = app.test_client()
    past = (NOW - timedelta(days=1)).isoformat()
    for body, field in (({"expires_at": past}, "expires_at"), ({"amount": 0}, "amount"),
                        ({"amount": 1.5}, "amount"), ({"source": "rollover"}, "source"),
                        ({"external_id": "rollover:1:x"}, "external_id"),
                        ({"colour": "red"}, "colour")):
        payload = {"amount": 10, "source": "promotion", "external_id": "x", **body}
        resp = client.post("/v1/users/alice/credits/grants", json=payload,
                           headers=bearer(keys.app))
        assert resp.status_code in (400, 422), (body, resp.data)
        assert field in resp.get_data(as_text=True)
    assert credits(client, keys.app)["grants"] == []


def test_overage_follows_the_credits_up_to_the_spend_cap(app: Any, keys: Keys,
                                                         clean_db: Engine) -> None:
    client = app.test_client()
    assert client.put("/v1/users/bob/plan", json={"plan": "metered"},
                      headers=bearer(keys.app)).status_code == 200
    track(client, keys.app, "bob", 90, "b1")
    grant(client, keys.app, "bob", 20, "promo-b")
    track(client, keys.app, "bob", 10, "b2", model="o3-mini")  # frontier: 30 credits
    body = credits(client, keys.app, "bob")
    assert body["burned"] == 20 and body["balance"] == 0  # 90 + 30 = 120: 20 past the allowance
    track(client, keys.app, "bob", 500, "b3")
    credits(client, keys.app, "bob")
    with clean_db.connect() as conn:
        over = conn.execute(select(func.sum(CreditOverage.credits))).scalar_one()
    assert over == 500  # past the allowance and every credit
    line = quota(client, keys.app, "bob")["allowance"]
    assert line["limit"] == 100 + 20 + 1000  # allowance + credits burned + overage headroom
    assert line["remaining"] == 1120 - 620
    big = client.post(CHAT, json=chat(user="bob", max_tokens=600), headers=bearer(keys.app))
    assert big.status_code == 200
    assert big.get_json()["usage"]["total_tokens"] <= 500  # clipped at the spend cap


def test_unused_allowance_rolls_over_capped_into_the_next_cycle(app: Any, keys: Keys) -> None:
    client = app.test_client()
    anchor = (NOW - timedelta(days=3)).isoformat()
    assert client.put("/v1/users/carol/plan", json={"plan": "metered", "anchored_at": anchor},
                      headers=bearer(keys.app)).status_code == 200
    track(client, keys.app, "carol", 30, "c1")
    assert credits(client, keys.app, "carol")["granted"] == 0
    app.clock.now = NOW + timedelta(days=40)  # 43 days after the anchor: in the 2nd cycle
    body = credits(client, keys.app, "carol")
    rolled = [g for g in body["grants"] if g["source"] == "rollover"]
    assert [g["amount"] for g in rolled] == [50]  # the 1st cycle left 70 unused; capped at 50
    assert rolled[0]["state"] == "live" and body["balance"] == 50
    again = credits(client, keys.app, "carol")  # accounting twice changes nothing
    assert again == body


def test_usage_from_before_the_plan_is_not_charged_to_it(app: Any, keys: Keys,
                                                         clean_db: Engine) -> None:
    client = app.test_client()
    app.clock.now = NOW - timedelta(days=5)
    track(client, keys.app, "erin", 500, "old")  # on the default plan, days ago
    app.clock.now = NOW
    anchor = (NOW - timedelta(days=1)).isoformat()
    assert client.put("/v1/users/erin/plan", json={"plan": "metered", "anchored_at": anchor},
                      headers=bearer(keys.app)).status_code == 200
    track(client, keys.app, "erin", 120, "new")
    credits(client, keys.app, "erin")
    with clean_db.connect() as conn:
        over = conn.execute(select(func.coalesce(func.sum(CreditOverage.credits), 0))
                            ).scalar_one()
    assert over == 20  # only what passed the allowance since the plan began


def test_credits_burned_in_a_cycle_are_not_spent_again_in_the_next(app: Any, keys: Keys) -> None:
    client = app.test_client()
    assert grant(client, keys.app, "fay", 50, "promo-f").status_code == 201
    track(client, keys.app, "fay", 140, "f1")  # 40 past the allowance: burns 40 credits
    app.clock.now = NOW + timedelta(days=40)  # a new cycle, nothing accounted yet
    line = quota(client, keys.app, "fay")["allowance"]
    assert line["used"] == 0 and line["limit"] == 100 + 10  # the 10 credits left, not 50


def test_a_row_that_commits_after_a_higher_id_was_accounted_is_accounted_too(
        app: Any, keys: Keys, clean_db: Engine) -> None:
    """Postgres hands out ids before commit: the ledger writers of two workers commit out of
    id order. On main the accounting read `id > cursor` and moved the cursor past a row still
    uncommitted, which was then never accounted (its overage never reached Stripe)."""
    from sqlalchemy import insert

    from metering.models import UsageEvent

    client, w = app.test_client(), app.extensions["wiring"]
    anchor = (NOW - timedelta(days=1)).isoformat()
    assert client.put("/v1/users/dora/plan", json={"plan": "metered", "anchored_at": anchor},
                      headers=bearer(keys.app)).status_code == 200
    app_id = w.tenancy.get_app("acme")
    user_id = w.tenancy.find_end_user(app_id, "dora")

    def row(key: str, tokens: int) -> dict[str, Any]:
        return {"app_id": app_id, "end_user_id": user_id, "request_id": f"req_{key}",
                "idempotency_key": key, "endpoint": "meter.track",
                "requested_model": "gpt-4o-mini", "upstream": None,
                "upstream_model": "gpt-4o-mini", "stream": False, "input_tokens": tokens,
                "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0,
                "usage_source": "reported", "cost_pico_usd": None, "priced": False,
                "status": "ok", "http_status": 200, "latency_ms": 0, "created_at": NOW,
                "plan_id": "metered", "credits_pending": True}

    slow = clean_db.connect()
    slow_tx = slow.begin()
    slow.execute(insert(UsageEvent).values(row("slow", 80)))  # takes the lower id, waits
    with clean_db.begin() as conn:
        conn.execute(insert(UsageEvent).values(row("fast", 80)))  # the higher id, committed
    w.accrual.accrue(app_id, user_id, NOW)
    slow_tx.commit()
    slow.close()
    w.accrual.accrue(app_id, user_id, NOW)
    with clean_db.connect() as conn:
        over = conn.execute(select(func.coalesce(func.sum(CreditOverage.credits), 0)).where(
            CreditOverage.end_user_id == user_id)).scalar_one()
        left = conn.execute(select(func.count()).select_from(UsageEvent).where(
            UsageEvent.credits_pending.is_(True))).scalar_one()
    assert over == 160 - 100 and left == 0  # both rows past the 100 allowance, on main 0


def test_a_late_event_of_a_closed_cycle_is_accounted_in_the_open_one(
        app: Any, keys: Keys, clean_db: Engine) -> None:
    """Usage reported late (its own `timestamp`) for a cycle already closed: it counts against
    the open cycle's allowance and credits, and its overage is dated at the open cycle's
    start, never into the invoice of the closed one."""
    from datetime import UTC, datetime

    from plans.windows import parse_window, period_of

    client = app.test_client()
    real = datetime.now(UTC)
    anchor = real - timedelta(days=40)
    assert client.put("/v1/users/gus/plan", json={"plan": "metered",
                                                  "anchored_at": anchor.isoformat()},
                      headers=bearer(keys.app)).status_code == 200
    cycle = period_of(parse_window("cycle"), real, anchor)  # the open cycle
    assert cycle.start > real - timedelta(days=15)  # both events below are of the closed one

    def late(tokens: int, days: int, ref: str) -> None:
        resp = client.post("/v1/meter/track", headers=bearer(keys.app), json={
            "user": "gus", "model": "gpt-4o-mini", "idempotency_key": ref,
            "usage": {"input_tokens": tokens},
            "timestamp": (real - timedelta(days=days)).isoformat()})
        assert resp.status_code == 201, resp.data

    late(30, 20, "g1")
    body = credits(client, keys.app, "gus")  # accounts g1, closes its cycle: 70 unused
    assert [g["amount"] for g in body["grants"] if g["source"] == "rollover"] == [50]
    late(200, 15, "g2")  # of the closed cycle: the open one's allowance, rollover, overage
    body = credits(client, keys.app, "gus")
    assert body["burned"] == 50 and body["balance"] == 0
    with clean_db.connect() as conn:
        [(amount, happened)] = conn.execute(select(CreditOverage.credits,
                                                   CreditOverage.happened_at)).all()
    assert amount == 200 - 100 - 50 and happened == cycle.start
