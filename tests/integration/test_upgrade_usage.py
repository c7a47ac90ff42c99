"""Whether used allowance carries over on an upgrade is a plan setting: with
upgrade_carries_usage = false the new plan's allowance starts afresh in the current cycle;
by default the usage so far counts against it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.integration.test_billing_scenarios import SECRET, signed, sub_event
from tests.integration.test_limits_gateway import Clock
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration

PLANS = """
[[plans]]
id = "free"
default = true

[[plans]]
id = "basic"
price = { amount = 1000, currency = "usd", interval = "month" }
allowance = 1000

[[plans]]
id = "plus"
price = { amount = 2000, currency = "usd", interval = "month" }
allowance = 2000
overage = { price_per_1m_tokens = 100, spend_cap = 1 }   # 1 cent buys 10,000 credits

[[plans]]
id = "fresh"
price = { amount = 2000, currency = "usd", interval = "month" }
allowance = 2000
overage = { price_per_1m_tokens = 100, spend_cap = 1 }   # 1 cent buys 10,000 credits
upgrade_carries_usage = false
"""


@pytest.fixture(params=["sql", "redis", "sqlite"])
def app(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str, upstream: FakeUpstream,
        tmp_path: Path) -> Any:
    import uuid

    from app import create_app

    # "sqlite": the embedded default (SQLite ledger and SQL limit store), where a write on a
    # second connection inside the webhook's transaction would wait on its own lock
    url = pg_url
    if request.param == "sqlite":
        from core.db import make_engine
        from migrations.schema import upgrade

        url = f"sqlite:///{tmp_path / 'm.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
    config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                              database_url=url)
    config = replace(config, stripe_webhook_secret=SECRET)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    w = app.extensions["wiring"]
    clock = Clock()
    w.limits.clock = w.gateway.clock = w.metering.clock = w.credits.clock = clock
    w.billing.clock = clock
    yield app
    w.engine.dispose()


@pytest.mark.parametrize(("target", "remaining"), [("plus", 2000 - 800 + 10_000),
                                                 ("fresh", 2000 + 10_000)])
def test_an_upgrade_carries_usage_unless_the_plan_says_not(
        app: Any, target: str, remaining: int, clean_db: Engine) -> None:
    from core.auth import Role

    w = app.extensions["wiring"]
    key = w.keys.create_key(Role.APP, "acme").key
    principal = w.auth.authenticate(key)
    end_user_id = w.tenancy.ensure_end_user(principal.app_id, "alice")
    owner = {"mlane_app_id": str(principal.app_id), "mlane_end_user_id": str(end_user_id)}
    client = app.test_client()

    def deliver(payload: bytes) -> None:
        resp = client.post("/v1/stripe/webhook", data=payload, headers=signed(payload))
        assert resp.status_code == 200, resp.data

    deliver(sub_event("evt_1", "customer.subscription.created", "active", "basic@1", 100,
                      owner))
    tracked = client.post("/v1/meter/track", headers=bearer(key), json={
        "user": "alice", "model": "gpt-4o-mini", "idempotency_key": "t1",
        "usage": {"input_tokens": 800, "output_tokens": 0}})
    assert tracked.status_code in (200, 201), tracked.data
    deliver(sub_event("evt_2", "customer.subscription.updated", "active", f"{target}@1", 200,
                      owner))
    lines = {line["id"]: line for line in client.get(
        "/v1/users/alice/quota", headers=bearer(key)).get_json()["limits"]}
    allowance = lines["allowance"]
    assert allowance["included"] == 2000 and allowance["used"] == 800
    assert allowance["remaining"] == remaining
    # the accounting agrees: what the new allowance does not cover is the only overage
    client.post("/v1/meter/track", headers=bearer(key), json={
        "user": "alice", "model": "gpt-4o-mini", "idempotency_key": "t2",
        "usage": {"input_tokens": 1500, "output_tokens": 0}})
    from sqlalchemy import func, select

    from plans.models import CreditOverage

    client.get("/v1/users/alice/credits", headers=bearer(key))  # accounts the usage
    with w.engine.connect() as conn:
        over = conn.execute(select(func.coalesce(func.sum(CreditOverage.credits), 0))
                            ).scalar_one()
    # basic's 1000 covered the first 800; then 1500 more against the new plan's allowance
    assert over == (800 + 1500 - 2000 if target == "plus" else 0)
