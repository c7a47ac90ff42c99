"""Limits through the gateway and the metering API, on both stores (SQL on Postgres, Redis),
with a frozen clock so no test straddles a period boundary."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import LimitRefusal, UsageEvent
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
# Frozen at noon tomorrow: Redis expires keys by its own (real) clock, so the frozen "now"
# must not lie in the past, and noon keeps every test far from a day boundary.
NOW = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time(12), tzinfo=UTC)
MIDNIGHT = (NOW.date() + timedelta(days=1)).isoformat() + "T00:00:00Z"

PLANS = """
[[plans]]
id = "free"
default = true
default_max_output_tokens = 50
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 300
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 5

[[plans]]
id = "strict"
on_limit = "reject"
[[plans.limits]]
metric = "tokens"
window = "month"
amount = 100

[[plans]]
id = "narrow"
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100
model = "o3-mini"

[[plans]]
id = "team"
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 200
scope = "app"

[[plans]]
id = "pro"
on_store_failure = "open"
[[plans.limits]]
metric = "tokens"
window = "rolling:5h"
amount = 100000
[[plans.limits]]
metric = "cost_usd"
window = "cycle"
amount = "5"
"""


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sql", "redis"])
def limited(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str,
            upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                              database_url=pg_url)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    clock = Clock()
    wiring = app.extensions["wiring"]
    wiring.limits.clock = wiring.gateway.clock = wiring.metering.clock = clock
    app.clock = clock  # type: ignore[attr-defined]
    yield app
    app.extensions["wiring"].engine.dispose()


class ClosingClient(FlaskClient):
    """Reads each response whole and closes it, as a WSGI server does once it has sent it
    (the gateway settles limits leases then)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture()
def lclient(limited: Any) -> Any:
    limited.test_client_class = ClosingClient
    return limited.test_client()


@pytest.fixture()
def lkeys(limited: Any) -> Keys:
    from core.auth import Role

    service = limited.extensions["wiring"].keys
    return Keys(app=service.create_key(Role.APP, "acme").key,
                other_app=service.create_key(Role.APP, "globex").key,
                admin=service.create_key(Role.ADMIN, None).key,
                finance=service.create_key(Role.FINANCE, "acme").key)


def chat(user: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "user": user,
            "messages": [{"role": "user", "content": "Say hello to the world"}], **extra}


def ledger(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


def quota(client: Any, key: str, user: str = "alice") -> dict[str, Any]:
    resp = client.get(f"/v1/users/{user}/quota", headers=bearer(key))
    assert resp.status_code == 200, resp.data
    return {line["id"]: line for line in resp.get_json()["limits"]}


def test_calls_within_quota_carry_quota_headers_and_count_real_usage(
        lclient: Any, lkeys: Keys, clean_db: Engine) -> None:
    resp = lclient.post(CHAT, json=chat(max_tokens=20), headers=bearer(lkeys.app))
    assert resp.status_code == 200, resp.data
    usage = resp.get_json()["usage"]
    assert resp.headers["X-Meterlane-Quota-Limit"] == "tokens-day"
    assert resp.headers["X-Meterlane-Quota-Reset"] == MIDNIGHT
    assert resp.headers["x-ratelimit-limit-requests"] == "5"
    assert resp.headers["x-ratelimit-remaining-requests"] == "4"
    lines = quota(lclient, lkeys.app)
    assert lines["tokens-day"]["used"] == usage["total_tokens"]  # settled to the real usage
    assert lines["tokens-day"]["remaining"] == 300 - usage["total_tokens"]
    assert lines["requests-minute"]["used"] == 1
    assert lines["requests-minute"]["resets_at"] == f"{NOW.date().isoformat()}T12:01:00Z"


def test_clip_lowers_max_tokens_so_the_quota_is_never_overspent(
        lclient: Any, lkeys: Keys, upstream: FakeUpstream, clean_db: Engine,
        limited: Any) -> None:
    total = 0
    statuses = []
    for minute in range(12):
        limited.clock.now = NOW + timedelta(minutes=minute)
        resp = lclient.post(CHAT, json=chat(max_tokens=70), headers=bearer(lkeys.app))
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            total += resp.get_json()["usage"]["total_tokens"]
    assert 402 in statuses and statuses.count(200) >= 4
    assert total <= 300
    clipped = [r["body"].get("max_tokens") for r in upstream.requests[-statuses.count(200):]]
    assert min(clipped) < 70  # the last call was clipped to what remained
    recorded = sum(r.input_tokens + r.output_tokens for r in ledger(clean_db))
    assert recorded == total <= 300


def test_the_next_call_finds_the_last_answer_settled_at_what_it_cost(
        lclient: Any, lkeys: Keys, upstream: FakeUpstream, limited: Any) -> None:
    """Leases settle after the answer has gone out (a greenlet under gunicorn, here a timer
    that runs the settle 0.2 s late): a call straight after must find the last one counted at
    its real usage, not clipped by its estimate still being held."""
    timers: list[threading.Timer] = []

    def late(job: Any) -> None:
        timers.append(threading.Timer(0.2, job))
        timers[-1].start()

    limited.extensions["wiring"].limits._background = late
    ten = {"words": 10}  # each answer is 10 tokens, far under its max_tokens
    first = lclient.post(CHAT, json=chat(max_tokens=200, fake=ten), headers=bearer(lkeys.app))
    assert first.status_code == 200 and first.get_json()["usage"]["completion_tokens"] == 10
    second = lclient.post(CHAT, json=chat(max_tokens=200, fake=ten), headers=bearer(lkeys.app))
    assert second.status_code == 200, second.data
    sent = upstream.requests[-1]["body"]["max_tokens"]
    for timer in timers:  # no settle outlives the test
        timer.join()
    assert sent == 200  # with the first still held at its estimate: about 85


def test_an_exhausted_quota_is_a_402_naming_the_limit_and_is_recorded(
        lclient: Any, lkeys: Keys, clean_db: Engine, limited: Any) -> None:
    engine = clean_db
    lclient.post("/v1/meter/track", json={"user": "alice", "model": "gpt-4o-mini",
                                          "usage": {"input_tokens": 295, "output_tokens": 0},
                                          "idempotency_key": "t1"}, headers=bearer(lkeys.app))
    resp = lclient.post(CHAT, json=chat(), headers=bearer(lkeys.app))
    assert resp.status_code == 402, resp.data
    err = resp.get_json()["error"]
    assert err["code"] == "quota_exceeded" and err["type"] == "insufficient_quota"
    assert err["limit"]["id"] == "tokens-day" and err["limit"]["used"] == 295
    assert err["limit"]["limit"] == 300
    assert err["limit"]["resets_at"] == MIDNIGHT
    assert int(resp.headers["Retry-After"]) == 12 * 3600
    assert resp.headers["X-Meterlane-Quota-Remaining"] == "5"
    with engine.connect() as conn:
        [refusal] = conn.execute(select(LimitRefusal.__table__)).all()
    assert refusal.limit_id == "tokens-day" and refusal.kind == "quota_exceeded"
    assert refusal.used == 295 and refusal.plan_id == "free"
    rows = ledger(engine)
    assert [r.status for r in rows] == ["ok", "quota_exceeded"]
    assert rows[1].input_tokens == 0 and rows[1].http_status == 402


def test_requests_per_minute_is_a_429_with_retry_after(
        lclient: Any, lkeys: Keys, limited: Any) -> None:
    for _ in range(5):
        assert lclient.post(CHAT, json=chat(max_tokens=1), headers=bearer(lkeys.app)
                            ).status_code == 200
    limited.clock.now = NOW + timedelta(seconds=20)
    resp = lclient.post(CHAT, json=chat(max_tokens=1), headers=bearer(lkeys.app))
    assert resp.status_code == 429
    assert resp.get_json()["error"]["code"] == "rate_limited"
    assert resp.headers["Retry-After"] == "40"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    limited.clock.now = NOW + timedelta(minutes=1)
    assert lclient.post(CHAT, json=chat(max_tokens=1), headers=bearer(lkeys.app)
                        ).status_code == 200


def test_reject_plan_refuses_instead_of_clipping(lclient: Any, lkeys: Keys) -> None:
    put = lclient.put("/v1/users/bob/plan", json={"plan": "strict"}, headers=bearer(lkeys.app))
    assert put.status_code == 200, put.data
    assert lclient.post(CHAT, json=chat("bob", max_tokens=60), headers=bearer(lkeys.app)
                        ).status_code == 200
    resp = lclient.post(CHAT, json=chat("bob", max_tokens=60), headers=bearer(lkeys.app))
    assert resp.status_code == 402  # about 70 used: 60 more cannot fit, and is not clipped
    small = lclient.post(CHAT, json=chat("bob", max_tokens=5), headers=bearer(lkeys.app))
    assert small.status_code == 200


def test_unknown_plan_and_bad_max_tokens_are_clear_errors(lclient: Any, lkeys: Keys) -> None:
    put = lclient.put("/v1/users/bob/plan", json={"plan": "gold"}, headers=bearer(lkeys.app))
    assert put.status_code == 400 and "gold" in put.get_json()["detail"]
    bad = lclient.post(CHAT, json=chat(max_tokens=-5), headers=bearer(lkeys.app))
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "max_tokens"


def test_meter_api_reserve_settle_release_track(lclient: Any, lkeys: Keys,
                                                 clean_db: Engine) -> None:
    h = bearer(lkeys.app)
    resp = lclient.post("/v1/meter/reserve", json={"user": "carol", "model": "gpt-4o-mini",
                                                   "input_tokens": 100,
                                                   "max_output_tokens": 500}, headers=h)
    assert resp.status_code == 201, resp.data
    lease = resp.get_json()
    assert lease["granted_output_tokens"] == 200  # clipped: 300 - 100 prompt
    settle = {"lease_id": lease["lease_id"], "usage": {"input_tokens": 100, "output_tokens": 50}}
    first = lclient.post("/v1/meter/settle", json=settle, headers=h)
    assert first.status_code == 200 and first.get_json()["cost_usd"] == "0.000045"
    again = lclient.post("/v1/meter/settle", json=settle, headers=h)
    assert again.status_code == 200  # idempotent
    other = lclient.post("/v1/meter/settle", json={**settle, "usage": {"input_tokens": 1}},
                         headers=h)
    assert other.status_code == 409 and other.get_json()["code"] == "lease_settled"
    assert lclient.post("/v1/meter/release", json={"lease_id": lease["lease_id"]},
                        headers=h).status_code == 409
    stranger = lclient.post("/v1/meter/settle", json=settle, headers=bearer(lkeys.other_app))
    assert stranger.status_code == 404
    assert quota(lclient, lkeys.app, "carol")["tokens-day"]["used"] == 150
    tracked = {"user": "carol", "model": "my-own-model", "idempotency_key": "job-9",
               "usage": {"input_tokens": 10, "output_tokens": 5}}
    assert lclient.post("/v1/meter/track", json=tracked, headers=h).status_code == 201
    assert lclient.post("/v1/meter/track", json=tracked, headers=h).status_code == 200
    assert quota(lclient, lkeys.app, "carol")["tokens-day"]["used"] == 165
    rows = ledger(clean_db)
    assert [(r.endpoint, r.input_tokens + r.output_tokens, r.priced) for r in rows] == [
        ("meter.settle", 150, True), ("meter.track", 15, False)]


def test_meter_api_rejects_absurd_amounts_and_unknown_leases(lclient: Any, lkeys: Keys) -> None:
    h = bearer(lkeys.app)
    neg = lclient.post("/v1/meter/reserve", json={"user": "c", "model": "m", "input_tokens": -1},
                       headers=h)
    assert neg.status_code == 422
    huge = lclient.post("/v1/meter/track", json={
        "user": "c", "model": "m", "idempotency_key": "k",
        "usage": {"input_tokens": 10**12}}, headers=h)
    assert huge.status_code == 422
    unknown = lclient.post("/v1/meter/settle", json={"lease_id": "ls_1_1_abc", "usage": {
        "input_tokens": 1}}, headers=h)
    assert unknown.status_code == 404
    garbage = lclient.post("/v1/meter/release", json={"lease_id": "nope"}, headers=h)
    assert garbage.status_code == 404


def test_settling_after_expiry_is_a_conflict_and_the_quota_is_whole_again(
        lclient: Any, lkeys: Keys, limited: Any) -> None:
    h = bearer(lkeys.app)
    lease = lclient.post("/v1/meter/reserve", json={"user": "dave", "model": "gpt-4o-mini",
                                                    "input_tokens": 200}, headers=h).get_json()
    assert quota(lclient, lkeys.app, "dave")["tokens-day"]["used"] == 250
    limited.clock.now = NOW + timedelta(seconds=601)  # the lease time is 600 s
    assert quota(lclient, lkeys.app, "dave")["tokens-day"]["used"] == 0
    late = lclient.post("/v1/meter/settle", json={"lease_id": lease["lease_id"], "usage": {
        "input_tokens": 200}}, headers=h)
    assert late.status_code == 409 and late.get_json()["code"] == "lease_expired"
    assert quota(lclient, lkeys.app, "dave")["tokens-day"]["used"] == 0


def test_user_key_sees_its_own_quota(lclient: Any, lkeys: Keys) -> None:
    minted = lclient.post("/v1/users/erin/keys", json={}, headers=bearer(lkeys.app)).get_json()
    me = lclient.get("/v1/me/quota", headers=bearer(minted["key"]))
    assert me.status_code == 200
    body = me.get_json()
    assert body["user"] == "erin" and body["plan"]["id"] == "free"
    assert {line["id"] for line in body["limits"]} == {"tokens-day", "requests-minute"}
    assert lclient.get("/v1/users/erin/quota", headers=bearer(minted["key"])).status_code == 403


def test_cost_limit_and_cycle_window_on_the_pro_plan(lclient: Any, lkeys: Keys) -> None:
    anchor = (NOW - timedelta(days=3)).replace(hour=8)
    anchored = anchor.isoformat()
    put = lclient.put("/v1/users/frank/plan", json={"plan": "pro", "anchored_at": anchored},
                      headers=bearer(lkeys.app))
    assert put.status_code == 200
    assert lclient.post(CHAT, json=chat("frank", max_tokens=10), headers=bearer(lkeys.app)
                        ).status_code == 200
    lines = quota(lclient, lkeys.app, "frank")
    cost = lines["cost_usd-cycle"]
    assert cost["limit"] == "5" and cost["used"] != "0"
    month = anchor.month % 12 + 1
    year = anchor.year + (anchor.month == 12)
    next_start = anchor.replace(year=year, month=month) if anchor.day <= 28 else None
    if next_start is not None:  # (month ends are the window property tests' job)
        assert cost["resets_at"] == next_start.isoformat().replace("+00:00", "Z")
    assert lines["tokens-rolling-5h"]["used"] > 0


def _redis_down(limited: Any) -> Any:
    """Point the app's limits at a Redis that does not answer."""
    import redis

    from metering.redislimits import RedisLimitStore

    wiring = limited.extensions["wiring"]
    live = wiring.limits.store
    dead = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    wiring.limits.store = RedisLimitStore(dead)
    return live


def test_store_down_fails_closed_by_default_and_open_where_the_plan_says(
        lclient: Any, lkeys: Keys, limited: Any, clean_db: Engine) -> None:
    h = bearer(lkeys.app)
    assert lclient.put("/v1/users/olga/plan", json={"plan": "pro"}, headers=h).status_code == 200
    live = _redis_down(limited)
    closed = lclient.post(CHAT, json=chat("alice"), headers=h)
    assert closed.status_code == 503
    assert closed.get_json()["error"]["code"] == "service_unavailable"
    opened = lclient.post(CHAT, json=chat("olga", max_tokens=10), headers=h)
    assert opened.status_code == 200, opened.data
    spent = opened.get_json()["usage"]["total_tokens"]
    rows = ledger(clean_db)
    assert [(r.status, r.limits_pending) for r in rows] == [("limits_unavailable", False),
                                                             ("ok", True)]
    wiring = limited.extensions["wiring"]
    wiring.limits.store = live  # the store is back: the call let through is counted once
    assert wiring.limits.catch_up() == 1
    assert wiring.limits.catch_up() == 0
    assert quota(lclient, lkeys.app, "olga")["tokens-rolling-5h"]["used"] == spent
    assert not any(r.limits_pending for r in ledger(clean_db))


def test_counters_are_rebuilt_from_the_ledger(lclient: Any, lkeys: Keys, limited: Any,
                                              clean_db: Engine) -> None:
    h = bearer(lkeys.app)
    for user in ("ann", "ben", "ann"):
        assert lclient.post(CHAT, json=chat(user, max_tokens=15), headers=h).status_code == 200
    before = {u: quota(lclient, lkeys.app, u) for u in ("ann", "ben")}
    wiring = limited.extensions["wiring"]
    with clean_db.begin() as conn:  # lose every counter (a Redis flush, a wiped table)
        conn.exec_driver_sql("DELETE FROM limit_counters")
    from metering.redislimits import RedisLimitStore

    store = wiring.limits.store
    if isinstance(store, RedisLimitStore):
        for key in store.client.scan_iter(f"{store.prefix}*"):
            store.client.delete(key)
    assert quota(lclient, lkeys.app, "ann")["tokens-day"]["used"] == 0
    assert wiring.limits.rebuild() == 2
    after = {u: quota(lclient, lkeys.app, u) for u in ("ann", "ben")}
    assert after == before
    sums = {}
    for r in ledger(clean_db):
        sums[r.end_user_id] = sums.get(r.end_user_id, 0) + r.input_tokens + r.output_tokens
    assert sorted(sums.values()) == sorted(q["tokens-day"]["used"] for q in after.values())


def test_streams_are_clipped_and_settled_to_their_usage(lclient: Any, lkeys: Keys,
                                                        upstream: FakeUpstream) -> None:
    h = bearer(lkeys.app)
    lclient.post("/v1/meter/track", json={"user": "sam", "model": "gpt-4o-mini",
                                          "usage": {"input_tokens": 260}, "idempotency_key": "x"},
                 headers=h)
    resp = lclient.post(CHAT, json=chat("sam", stream=True, max_tokens=100,
                                        stream_options={"include_usage": True}), headers=h)
    assert resp.status_code == 200
    body = resp.get_data()
    assert upstream.requests[-1]["body"]["max_tokens"] < 40  # 40 left, less the prompt
    assert b"[DONE]" in body
    used = quota(lclient, lkeys.app, "sam")["tokens-day"]["used"]
    assert 260 < used <= 300


def test_an_app_scope_limit_is_one_pool_for_every_user_on_the_plan(
        lclient: Any, lkeys: Keys, clean_db: Engine) -> None:
    h = bearer(lkeys.app)
    for user in ("tia", "tom"):
        assert lclient.put(f"/v1/users/{user}/plan", json={"plan": "team"},
                           headers=h).status_code == 200
    statuses = [lclient.post(CHAT, json=chat(user, max_tokens=30), headers=h).status_code
                for user in ("tia", "tom") * 4]
    assert statuses[:2] == [200, 200] and 402 in statuses
    pooled = quota(lclient, lkeys.app, "tia")["tokens-day-app"]
    assert pooled["used"] == quota(lclient, lkeys.app, "tom")["tokens-day-app"]["used"]
    assert pooled["used"] == sum(r.input_tokens + r.output_tokens for r in ledger(clean_db))
    assert pooled["used"] <= 200


def test_the_quota_shown_is_exactly_what_the_engine_grants_next(lclient: Any,
                                                                 lkeys: Keys) -> None:
    h = bearer(lkeys.app)
    assert lclient.post(CHAT, json=chat("gail", max_tokens=33), headers=h).status_code == 200
    left = quota(lclient, lkeys.app, "gail")["tokens-day"]["remaining"]
    exact = lclient.post("/v1/meter/reserve", json={"user": "gail", "model": "gpt-4o-mini",
                                                    "input_tokens": 10,
                                                    "max_output_tokens": left - 10}, headers=h)
    assert exact.status_code == 201 and exact.get_json()["granted_output_tokens"] == left - 10
    assert quota(lclient, lkeys.app, "gail")["tokens-day"]["remaining"] == 0
    more = lclient.post("/v1/meter/reserve", json={"user": "gail", "model": "gpt-4o-mini",
                                                   "input_tokens": 0, "max_output_tokens": 1},
                        headers=h)
    assert more.status_code == 402
    assert more.get_json()["limit"]["id"] == "tokens-day"  # problem+json names the limit too


def test_the_lease_is_settled_once_the_response_is_sent(limited: Any, lkeys: Keys) -> None:
    raw = limited.test_client()  # a client that leaves the response open, as if still sending
    resp = raw.post(CHAT, json=chat("hal", max_tokens=40), headers=bearer(lkeys.app))
    assert resp.status_code == 200
    real = resp.get_json()["usage"]["total_tokens"]
    closing = ClosingClient(limited, limited.response_class, use_cookies=False)
    held = quota(closing, lkeys.app, "hal")["tokens-day"]["used"]
    assert held > real  # until then the reservation (prompt estimate + 40) stands
    resp.close()
    assert quota(closing, lkeys.app, "hal")["tokens-day"]["used"] == real


def test_limits_rebuild_command(limited: Any, lclient: Any, lkeys: Keys, pg_url: str,
                                tmp_path: Path) -> None:
    from click.testing import CliRunner

    from app import main

    assert lclient.post(CHAT, json=chat("ivy", max_tokens=12), headers=bearer(lkeys.app)
                        ).status_code == 200
    config = limited.extensions["wiring"].config
    env = {"MLANE_DATABASE_URL": pg_url, "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp_path / "cli-var"), "MLANE_REDIS_URL": config.redis_url or "",
           "MLANE_REDIS_PREFIX": config.redis_prefix}
    result = CliRunner().invoke(main, ["limits", "rebuild"], env=env)
    assert result.exit_code == 0, result.output
    assert "rebuilt the counters of 1 end users" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text((tmp_path / "meterlane.toml").read_text().replace(
        'window = "day"', 'window = "dya"', 1))
    refused = CliRunner().invoke(main, ["limits", "rebuild"],
                                 env={**env, "MLANE_CONFIG": str(broken)})
    assert refused.exit_code != 0 and "line " in refused.output and "dya" in refused.output


def test_a_lease_no_limit_applies_to_can_still_be_settled(lclient: Any, lkeys: Keys,
                                                          clean_db: Engine) -> None:
    h = bearer(lkeys.app)
    assert lclient.put("/v1/users/kim/plan", json={"plan": "narrow"},
                       headers=h).status_code == 200
    # narrow limits only o3-mini: nothing applies to this model, yet the lease must settle
    lease = lclient.post("/v1/meter/reserve", json={"user": "kim", "model": "my-own-model",
                                                    "input_tokens": 5}, headers=h).get_json()
    settled = lclient.post("/v1/meter/settle", json={"lease_id": lease["lease_id"], "usage": {
        "input_tokens": 5, "output_tokens": 7}}, headers=h)
    assert settled.status_code == 200, settled.data
    assert [r.output_tokens for r in ledger(clean_db)] == [7]


def test_the_metering_api_answers_503_while_the_store_is_down(lclient: Any, lkeys: Keys,
                                                             limited: Any) -> None:
    h = bearer(lkeys.app)
    lease = lclient.post("/v1/meter/reserve", json={"user": "pam", "model": "gpt-4o-mini",
                                                    "input_tokens": 5}, headers=h).get_json()
    _redis_down(limited)
    for resp in (lclient.get("/v1/users/pam/quota", headers=h),
                 lclient.post("/v1/meter/settle", json={"lease_id": lease["lease_id"],
                                                        "usage": {"input_tokens": 5}}, headers=h),
                 lclient.post("/v1/meter/track", json={"user": "pam", "model": "gpt-4o-mini",
                                                       "idempotency_key": "t",
                                                       "usage": {"input_tokens": 5}}, headers=h)):
        assert resp.status_code == 503, resp.data
        assert resp.headers["Retry-After"] == "1"


def test_every_output_cap_field_is_reserved_and_all_of_them_are_clipped(
        lclient: Any, lkeys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    # on main: 1 token reserved, max_tokens 4000 forwarded as it was
    resp = lclient.post(CHAT, json=chat("uma", max_completion_tokens=1, max_tokens=4000),
                        headers=bearer(lkeys.app))
    assert resp.status_code == 200
    sent = upstream.requests[-1]["body"]
    assert sent["max_tokens"] == sent["max_completion_tokens"] < 300
    [row] = ledger(clean_db)
    assert row.input_tokens + row.output_tokens <= 300


def test_llama_cpp_and_tgi_cap_names_are_reserved_and_clipped_too(
        lclient: Any, lkeys: Keys, upstream: FakeUpstream) -> None:
    # on main: 4 tokens reserved, n_predict 4000 forwarded (llama.cpp reads it first)
    resp = lclient.post(CHAT, json=chat("xia", max_tokens=4, n_predict=4000,
                                        max_new_tokens=4000), headers=bearer(lkeys.app))
    assert resp.status_code == 200
    sent = upstream.requests[-1]["body"]
    assert sent["n_predict"] == sent["max_new_tokens"] == sent["max_tokens"] < 300


def test_best_of_multiplies_what_a_chat_call_reserves(lclient: Any, lkeys: Keys,
                                                      upstream: FakeUpstream) -> None:
    h = bearer(lkeys.app)
    alone = lclient.post(CHAT, json=chat("val", max_tokens=80), headers=h)
    assert alone.status_code == 200
    # 300 a day, about 90 used: one choice of 80 fits, three do not, so the cap is lowered
    resp = lclient.post(CHAT, json=chat("val", max_tokens=80, best_of=3), headers=h)
    assert resp.status_code == 200
    assert upstream.requests[-1]["body"]["max_tokens"] < 80


def test_a_stream_longer_than_its_lease_keeps_its_reservation(
        limited: Any, lkeys: Keys, upstream: FakeUpstream) -> None:
    import time

    wiring = limited.extensions["wiring"]
    wiring.limits.lease_seconds = 3  # renewed every second while the stream runs
    start, t0 = NOW, time.monotonic()
    limited.clock.now = None
    clock = lambda: start + timedelta(seconds=time.monotonic() - t0)  # noqa: E731 - real time
    wiring.limits.clock = wiring.gateway.clock = wiring.metering.clock = clock
    client = limited.test_client()
    h = bearer(lkeys.app)
    resp = client.post(CHAT, json=chat("wes", stream=True, max_tokens=120,
                                       fake={"words": 10, "chunk_delay_ms": 450}),
                       headers=h, buffered=False)
    chunks = iter(resp.response)
    while time.monotonic() - t0 < 3.6:  # past the lease's 3 s, the stream still running
        next(chunks)
    assert time.monotonic() - t0 < 4.8, "the stream ended before the lease would have"
    held = quota(client, lkeys.app, "wes")["tokens-day"]["used"]
    assert held >= 120  # still reserved: on main the sweep had given it back at 3 s
    for _ in chunks:
        pass
    resp.close()
    assert quota(client, lkeys.app, "wes")["tokens-day"]["used"] < held  # settled to usage
