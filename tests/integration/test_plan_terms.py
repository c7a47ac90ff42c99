"""Plan terms through the gateway (model tiers, the allowance counted in credits with tier
multipliers) on both limit stores, plan versions an end user keeps, and published versions
that may not change."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.config import ConfigError
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.integration.test_limits_gateway import Clock, ClosingClient, chat, ledger, quota
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"

PLANS = """
[[plans]]
id = "free"
default = true
tiers = ["small"]
allowance = 300

[[plans]]
id = "pro"
price = { amount = 2000, currency = "usd", interval = "month" }
allowance = 1000
credit_multipliers = { frontier = 5 }

[[plans]]
id = "pro"
version = 2
price = { amount = 2500, currency = "usd", interval = "month" }
allowance = 5000
credit_multipliers = { frontier = 5 }

[[plans]]
id = "legacy"
allowance = 10
retired = true
"""


def tiered_toml(base_url: str) -> str:
    """The shared gateway config with gpt-4o-mini in tier "small" and o3-mini in "frontier"."""
    toml = gateway_toml(base_url)
    toml = toml.replace('name = "gpt-4o-mini"\n', 'name = "gpt-4o-mini"\ntier = "small"\n')
    toml = toml.replace('name = "o3-mini"\n', 'name = "o3-mini"\ntier = "frontier"\n')
    assert toml.count("tier = ") == 2
    return toml + PLANS


@pytest.fixture(params=["sql", "redis"])
def tiered(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str,
           upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config = config_from_toml(tiered_toml(upstream.base_url), tmp_path, database_url=pg_url)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    wiring = app.extensions["wiring"]
    wiring.limits.clock = wiring.gateway.clock = wiring.metering.clock = Clock()
    app.test_client_class = ClosingClient
    yield app
    wiring.engine.dispose()


@pytest.fixture()
def tkeys(tiered: Any) -> Keys:
    return make_keys(tiered)


def put_plan(client: Any, key: str, user: str, plan: str) -> Any:
    return client.put(f"/v1/users/{user}/plan", json={"plan": plan}, headers=bearer(key))


def test_a_model_outside_the_plans_tiers_is_refused_before_it_is_called(
        tiered: Any, tkeys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    client = tiered.test_client()
    before = len(upstream.requests)
    resp = client.post(CHAT, json=chat(model="o3-mini"), headers=bearer(tkeys.app))
    assert resp.status_code == 403, resp.data
    err = resp.get_json()["error"]
    assert err["code"] == "model_not_in_plan" and err["param"] == "model"
    assert "tier 'frontier'" in err["message"] and "'free'" in err["message"]
    assert len(upstream.requests) == before  # never forwarded
    assert client.post(CHAT, json=chat(), headers=bearer(tkeys.app)).status_code == 200
    # on a plan without a tier list, every tier is allowed
    assert put_plan(client, tkeys.app, "alice", "pro").status_code == 200
    assert client.post(CHAT, json=chat(model="o3-mini"), headers=bearer(tkeys.app)
                       ).status_code == 200


def test_the_allowance_counts_credits_with_the_tiers_multiplier(
        tiered: Any, tkeys: Keys, clean_db: Engine) -> None:
    client = tiered.test_client()
    # pro@2 is the current version: a user put on "pro" now gets it
    resp = put_plan(client, tkeys.app, "alice", "pro")
    assert resp.status_code == 200 and resp.get_json()["plan"] == "pro"
    small = client.post(CHAT, json=chat(max_tokens=10), headers=bearer(tkeys.app))
    big = client.post(CHAT, json=chat(model="o3-mini", max_tokens=10), headers=bearer(tkeys.app))
    assert small.status_code == big.status_code == 200
    small_tokens = small.get_json()["usage"]["total_tokens"]
    big_tokens = big.get_json()["usage"]["total_tokens"]
    line = quota(client, tkeys.app)["allowance"]
    assert line["limit"] == 5000 and line["metric"] == "credits" and line["window"] == "cycle"
    assert line["used"] == small_tokens + 5 * big_tokens
    rows = ledger(clean_db)
    assert sum(r.input_tokens + r.output_tokens for r in rows) == small_tokens + big_tokens


def test_an_exhausted_allowance_is_a_402_naming_it(tiered: Any, tkeys: Keys) -> None:
    client = tiered.test_client()
    track = client.post("/v1/meter/track", json={
        "user": "bob", "model": "gpt-4o-mini", "usage": {"input_tokens": 295, "output_tokens": 0},
        "idempotency_key": "t1"}, headers=bearer(tkeys.app))
    assert track.status_code in (200, 201), track.data
    resp = client.post(CHAT, json=chat(user="bob"), headers=bearer(tkeys.app))
    assert resp.status_code == 402, resp.data
    err = resp.get_json()["error"]
    assert err["code"] == "quota_exceeded" and err["limit"]["id"] == "allowance"
    assert err["limit"]["used"] == 295 and err["limit"]["limit"] == 300


def test_a_subscriber_keeps_the_version_they_bought(tiered: Any, tkeys: Keys,
                                                    clean_db: Engine) -> None:
    from sqlalchemy import update

    from plans.models import EndUserPlan

    client = tiered.test_client()
    assert put_plan(client, tkeys.app, "carol", "pro").status_code == 200
    with clean_db.begin() as conn:  # as if carol had bought pro when version 1 was current
        conn.execute(update(EndUserPlan).values(plan_version=1))
    tiered.extensions["wiring"].plans._cache.forget()
    client.post(CHAT, json=chat(user="carol", max_tokens=5), headers=bearer(tkeys.app))
    assert quota(client, tkeys.app, "carol")["allowance"]["limit"] == 1000


def test_a_retired_or_unknown_plan_takes_no_new_users(tiered: Any, tkeys: Keys) -> None:
    client = tiered.test_client()
    retired = put_plan(client, tkeys.app, "dave", "legacy")
    assert retired.status_code == 400 and "retired" in retired.get_json()["detail"]
    unknown = put_plan(client, tkeys.app, "dave", "gold")
    assert unknown.status_code == 400 and "pro@2" in unknown.get_json()["detail"]


def test_published_versions_are_immutable(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
                                          tmp_path: Path) -> None:
    from app import create_app, main

    toml = tiered_toml(upstream.base_url)
    path = tmp_path / "meterlane.toml"
    path.write_text(toml)
    env = {"MLANE_CONFIG": str(path), "MLANE_DATABASE_URL": pg_url}
    runner = CliRunner()
    checked = runner.invoke(main, ["plans", "check"], env=env)
    assert checked.exit_code == 0, checked.output
    assert "pro@2" in checked.output and "4 not yet published" in checked.output
    first = runner.invoke(main, ["plans", "publish"], env=env)
    assert first.exit_code == 0 and "4 plan versions published" in first.output
    again = runner.invoke(main, ["plans", "publish"], env=env)
    assert again.exit_code == 0 and "nothing to publish" in again.output
    # a new version may be added; a published one may be renamed but not repriced
    path.write_text(toml.replace('id = "pro"\nprice = { amount = 2000,',
                                 'id = "pro"\nname = "Pro classic"\nprice = { amount = 2000,')
                    + '\n[[plans]]\nid = "pro"\nversion = 3\nallowance = 9000\n')
    assert runner.invoke(main, ["plans", "publish"], env=env).output.startswith("published pro@3")
    path.write_text(toml.replace("amount = 2000,", "amount = 1900,"))
    changed = runner.invoke(main, ["plans", "check"], env=env)
    assert changed.exit_code == 1 and "[changed]" in changed.output
    assert "published versions changed: pro@1" in changed.output
    refused = runner.invoke(main, ["plans", "publish"], env=env)
    assert refused.exit_code == 1 and "pro@1" in refused.output
    with clean_db.connect() as conn:  # each version published is an audited CLI action
        trail = conn.execute(text("SELECT action, actor_role, target_id FROM audit_events "
                                  "ORDER BY id")).all()
    assert [(a, r) for a, r, _t in trail] == [("plan.publish", "cli")] * 5
    assert trail[-1][2] == "pro@3"
    with pytest.raises(ConfigError, match="pro@1"):
        create_app(config_from_toml(toml.replace("amount = 2000,", "amount = 1900,"), tmp_path,
                                    database_url=pg_url))
