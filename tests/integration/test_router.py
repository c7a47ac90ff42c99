"""The router against upstreams on loopback that fail, slow down, fill up and recover: aliases
resolved by plan tiers, difficulty and price; local first with cloud overflow; circuit
breakers; the decision in the ledger; and the savings report read back against the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import Keys, bearer, config_from_toml, make_keys
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
COOLDOWN = 30
# pico-USD per token of each priced model (USD per 1M tokens x 10**6)
PRICES = {"gpt-4o-mini": (150_000, 600_000), "o3-mini": (1_100_000, 4_400_000)}


def router_toml(local: str, cloud: str) -> str:
    return f"""
[[upstreams]]
name = "gpu"
base_url = "{local}"
timeout = 1
max_concurrency = 1
breaker_failures = 2
breaker_cooldown = {COOLDOWN}

[[upstreams]]
name = "cloud"
base_url = "{cloud}"

[[models]]
name = "llama-local"
upstream = "gpu"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
tokenizer = "cl100k_base"
level = 1

[[models]]
name = "gpt-4o-mini"
upstream = "cloud"
price = {{ input = "0.15", output = "0.60" }}

[[models]]
name = "o3-mini"
upstream = "cloud"
tier = "premium"
level = 3
max_tokens_param = "max_completion_tokens"
price = {{ input = "1.10", output = "4.40" }}

[[aliases]]
name = "auto"
models = ["o3-mini", "gpt-4o-mini", "llama-local"]

[[plans]]
id = "pro"
default = true
tiers = ["standard", "premium"]
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100000
[[plans.limits]]
metric = "requests"
window = "day"
amount = 1
model = "o3-mini"

[[plans]]
id = "free"
tiers = ["standard"]
aliases = {{ fast = ["gpt-4o-mini"] }}

[[plans]]
id = "reasoner"
tiers = ["premium"]
aliases = {{ fast = ["gpt-4o-mini"] }}
"""


@pytest.fixture(scope="module")
def local() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def routed(clean_db: Engine, pg_url: str, local: FakeUpstream, cloud: FakeUpstream,
           tmp_path: Path) -> Iterator[tuple[Any, Keys, Clock]]:
    from app import create_app

    local.behaviour, cloud.behaviour = {}, {}
    local.clear()
    cloud.clear()
    config = config_from_toml(router_toml(local.base_url, cloud.base_url), tmp_path,
                              database_url=pg_url)
    app = create_app(config)
    clock = Clock()
    app.extensions["wiring"].gateway.router.clock = clock
    try:
        yield app, make_keys(app), clock
    finally:
        local.behaviour, cloud.behaviour = {}, {}
        app.extensions["wiring"].engine.dispose()


def ask(client: Any, key: str, user: str = "ann", model: str = "auto", *, hold: bool = False,
        **extra: Any) -> Any:
    """One call; read and closed (a server closes every response: that settles the limits
    lease) unless `hold` keeps a stream open."""
    body = {"model": model, "user": user, "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            **extra}
    resp = client.post(CHAT, json=body, headers=bearer(key))
    if not hold:
        resp.get_data()
        resp.close()
    return resp


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


def test_difficulty_and_price_pick_the_model(routed: tuple[Any, Keys, Clock],
                                             local: FakeUpstream, cloud: FakeUpstream,
                                             clean_db: Engine) -> None:
    app, keys, _ = routed
    client = app.test_client()
    assert ask(client, keys.app).status_code == 200  # simple: the local model, no list price
    assert local.requests[-1]["body"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert ask(client, keys.app, tools=[tool]).status_code == 200  # moderate: gpt-4o-mini
    assert cloud.requests[-1]["body"]["model"] == "gpt-4o-mini"
    code = "Fix this:\n```python\ndef f(x):\n    return x +\n```"
    assert ask(client, keys.app, tools=[tool], messages=[
        {"role": "user", "content": code}]).status_code == 200  # tools and code: hard
    sent = cloud.requests[-1]["body"]
    assert sent["model"] == "o3-mini" and sent["max_completion_tokens"] == 4
    assert "max_tokens" not in sent
    # o3-mini's one call a day is spent: the next hard call goes to the next candidate
    assert ask(client, keys.app, reasoning_effort="high").status_code == 200
    served = [(r.route_alias, r.requested_model, r.route_reason.split(";")[0])
              for r in rows(clean_db)]
    assert served == [("auto", "llama-local", "level 1"),
                      ("auto", "gpt-4o-mini", "level 2 (tools)"),
                      ("auto", "o3-mini", "level 3 (tools, code)"),
                      ("auto", "gpt-4o-mini", "level 3 (reasoning effort high)")]
    assert "o3-mini skipped: Quota 'requests-day-o3-mini'" in rows(clean_db)[-1].route_reason


def test_plan_tiers_and_plan_aliases(routed: tuple[Any, Keys, Clock], cloud: FakeUpstream,
                                     clean_db: Engine) -> None:
    app, keys, _ = routed
    client = app.test_client()
    for user, plan in (("fay", "free"), ("rex", "reasoner")):
        assert client.put(f"/v1/users/{user}/plan", json={"plan": plan},
                          headers=bearer(keys.app)).status_code == 200
    # free may not call o3-mini: a hard call gets the most capable model it may call
    assert ask(client, keys.app, "fay", reasoning_effort="high").status_code == 200
    [row] = rows(clean_db)
    assert row.requested_model == "gpt-4o-mini"
    assert "most capable allowed" in row.route_reason
    # the plan's own alias
    assert ask(client, keys.app, "fay", model="fast").status_code == 200
    assert rows(clean_db)[-1].route_alias == "fast"
    # an alias with no model the plan allows
    denied = ask(client, keys.app, "rex", model="fast")
    assert denied.status_code == 403
    assert denied.get_json()["error"]["code"] == "model_not_in_plan"
    # another plan's alias, and a name nobody defines
    assert ask(client, keys.app, "ann", model="fast").status_code == 404
    missing = ask(client, keys.app, model="nope")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "model_not_found"


def test_fallback_before_the_first_byte_then_the_circuit_opens_and_recovers(
        routed: tuple[Any, Keys, Clock], local: FakeUpstream, cloud: FakeUpstream,
        clean_db: Engine) -> None:
    app, keys, clock = routed
    client = app.test_client()
    local.behaviour = {"status": 503}
    for _ in range(2):  # two failures in a row open the circuit
        resp = ask(client, keys.app)
        assert resp.status_code == 200
        assert resp.get_json()["model"] == "gpt-4o-mini"
    assert local.request_count and len(local.requests) == 2
    first = rows(clean_db)[0]
    assert first.requested_model == "gpt-4o-mini"
    assert "llama-local failed: HTTP 503" in first.route_reason
    # open: the local upstream is not even tried
    assert ask(client, keys.app).status_code == 200
    assert len(local.requests) == 2
    assert "llama-local skipped: circuit open" in rows(clean_db)[-1].route_reason
    # the local server recovers; after the cooldown the circuit half-opens and closes again
    local.behaviour = {}
    clock.now += COOLDOWN + 1
    assert ask(client, keys.app).get_json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert len(local.requests) == 3
    assert rows(clean_db)[-1].requested_model == "llama-local"
    # one ledger row per call, and the quota counts only what served calls used: the
    # reservations of the failed attempts were given back
    ledger = rows(clean_db)
    assert len(ledger) == 4
    used = client.get("/v1/users/ann/quota", headers=bearer(keys.app)).get_json()["limits"]
    assert used[0]["used"] == sum(r.input_tokens + r.output_tokens for r in ledger)


def test_a_local_server_taken_down_and_brought_back(routed: tuple[Any, Keys, Clock],
                                                    local: FakeUpstream,
                                                    clean_db: Engine) -> None:
    app, keys, clock = routed
    client = app.test_client()
    local.stop()
    try:
        for _ in range(3):
            assert ask(client, keys.app).status_code == 200
        reasons = [r.route_reason for r in rows(clean_db)]
        assert "llama-local failed: Could not connect" in reasons[0]
        assert "llama-local skipped: circuit open" in reasons[2]
    finally:
        local.start()
    clock.now += COOLDOWN + 1
    assert ask(client, keys.app).status_code == 200
    assert rows(clean_db)[-1].requested_model == "llama-local"


def test_a_slow_local_server_times_out_and_the_call_overflows(
        routed: tuple[Any, Keys, Clock], local: FakeUpstream, clean_db: Engine) -> None:
    app, keys, _ = routed
    local.behaviour = {"delay_ms": 3000}  # the gpu upstream's read timeout is 1 s
    resp = ask(app.test_client(), keys.app)
    assert resp.status_code == 200 and resp.get_json()["model"] == "gpt-4o-mini"
    assert "llama-local failed: Timed out" in rows(clean_db)[-1].route_reason


def test_a_saturated_local_upstream_overflows_to_the_cloud(
        routed: tuple[Any, Keys, Clock], local: FakeUpstream, clean_db: Engine) -> None:
    app, keys, _ = routed
    client = app.test_client()
    router = app.extensions["wiring"].gateway.router
    held = ask(client, keys.app, user="sam", stream=True, hold=True)  # gpu's one slot, held
    assert held.status_code == 200
    assert router.in_flight == 1 and router.alone()  # (a lone call's reserve holds the worker)
    overflow = ask(client, keys.app)
    assert overflow.get_json()["model"] == "gpt-4o-mini"
    assert b"[DONE]" in held.get_data()  # the stream ends: the slot is free again
    held.close()
    assert ask(client, keys.app).get_json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert router.in_flight == 0  # every call that took a slot gave it back, the skipped one too
    overflowed, *others = rows(clean_db)  # the held stream is written when it ends
    assert overflowed.requested_model == "gpt-4o-mini"
    assert overflowed.route_reason == ("level 1; llama-local cheapest able; llama-local "
                                       "skipped: saturated (1 calls in flight); served by "
                                       "gpt-4o-mini")
    assert [r.requested_model for r in others] == ["llama-local", "llama-local"]


def test_every_candidate_down_is_a_clear_503(routed: tuple[Any, Keys, Clock],
                                             local: FakeUpstream, cloud: FakeUpstream,
                                             clean_db: Engine) -> None:
    app, keys, _ = routed
    client = app.test_client()
    local.behaviour = cloud.behaviour = {"status": 502}
    resp = ask(client, keys.app)
    assert resp.status_code == 502  # the last candidate's own error, after two fallbacks
    for _ in range(2):
        ask(client, keys.app)
    seen = len(local.requests), len(cloud.requests)
    down = ask(client, keys.app)  # every circuit is open now: nothing is tried
    assert (len(local.requests), len(cloud.requests)) == seen
    assert down.status_code == 503
    error = down.get_json()["error"]
    assert error["code"] == "no_model_available"
    assert "llama-local skipped: circuit open" in error["message"]
    assert int(down.headers["Retry-After"]) <= COOLDOWN + 1
    last = rows(clean_db)[-1]
    assert last.status == "upstream_unavailable" and last.http_status == 503
    assert "served by" not in last.route_reason
    savings = client.get("/v1/usage/routing", headers=bearer(keys.app)).get_json()
    assert savings["aliases"] == []  # failed calls served nothing: no savings claimed


def test_the_savings_report_matches_the_ledger(routed: tuple[Any, Keys, Clock],
                                               clean_db: Engine) -> None:
    app, keys, _ = routed
    client = app.test_client()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for i in range(3):
        assert ask(client, keys.app, user=f"u{i}").status_code == 200
        assert ask(client, keys.app, user=f"u{i}", tools=[tool]).status_code == 200
    assert ask(client, keys.app, model="gpt-4o-mini").status_code == 200  # not routed
    report = client.get("/v1/usage/routing", headers=bearer(keys.app)).get_json()
    ledger = [r for r in rows(clean_db) if r.route_alias == "auto"]
    # the baseline is each call's tokens at o3-mini's price: the priciest model pro allows
    baseline = sum(r.input_tokens * PRICES["o3-mini"][0] + r.output_tokens * PRICES["o3-mini"][1]
                   for r in ledger)
    cost = sum(r.cost_pico_usd or 0 for r in ledger)
    [auto] = report["aliases"]
    assert auto["calls"] == 6 and auto["unpriced_calls"] == 3
    assert _pico(auto["baseline_usd"]) == baseline and _pico(auto["cost_usd"]) == cost
    assert _pico(auto["saved_usd"]) == baseline - cost > 0
    assert {s["model"]: s["calls"] for s in auto["served"]} == {"gpt-4o-mini": 3,
                                                               "llama-local": 3}
    assert _pico(report["saved_usd"]) == baseline - cost
    other = client.get("/v1/usage/routing", headers=bearer(keys.other_app)).get_json()
    assert other["aliases"] == []  # one tenant never sees another's
    bad = client.get("/v1/usage/routing?group_by=model", headers=bearer(keys.app))
    assert bad.status_code == 422 and bad.mimetype == "application/problem+json"


def _pico(usd: str) -> int:
    from decimal import Decimal

    return int(Decimal(usd) * 10**12)
