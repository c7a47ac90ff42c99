"""Custom meters ([[meters]]): events recorded once per key, priced exactly, aggregated as each
meter says, and limited by plans on both limit stores (SQL on Postgres, Redis)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from metering.models import LimitRefusal, MeterEvent
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml
from tests.integration.test_limits_gateway import NOW, Clock
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
EVENTS = "/v1/meter/events"

METERS = """
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"
price = "0.01"

[[meters]]
id = "audio_seconds"
unit = "seconds"
aggregation = "sum"
field = "seconds"
price = "0.000123"

[[meters]]
id = "peak_gpus"
unit = "GPUs"
aggregation = "max"
field = "gpus"

[[meters]]
id = "documents"
unit = "documents"
aggregation = "unique_count"
field = "doc_id"
price = "0.5"

[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "meter:web_search_calls"
window = "day"
amount = 10
name = "Web searches a day"

[[plans]]
id = "audio"
on_store_failure = "open"
[[plans.limits]]
metric = "meter:audio_seconds"
window = "month"
amount = "60.5"
"""


@pytest.fixture(params=["sql", "redis"])
def metered(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str,
            upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url) + METERS, tmp_path,
                              database_url=pg_url)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlm-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    clock = Clock()
    wiring = app.extensions["wiring"]
    wiring.limits.clock = wiring.meters.clock = clock
    yield app
    wiring.engine.dispose()


@pytest.fixture()
def mkeys(metered: Any) -> Keys:
    from tests.conftest import make_keys

    return make_keys(metered)


def event(user: str, meter: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"user": user, "meter": meter, "idempotency_key": key, **extra}


def test_events_are_recorded_once_priced_exactly_and_aggregated(metered: Any,
                                                                 mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    first = client.post(EVENTS, json=event("ann", "audio_seconds", "a1", value="12.5"),
                        headers=auth)
    assert first.status_code == 201, first.data
    body = first.get_json()
    assert body["value"] == "12.5" and body["outcome"] == "recorded"
    assert body["cost_usd"] == "0.0015375"  # 12.5 x 0.000123, exact
    again = client.post(EVENTS, json=event("ann", "audio_seconds", "a1", value="12.5"),
                        headers=auth)
    assert again.status_code == 200 and again.get_json()["outcome"] == "duplicate"
    assert again.get_json()["id"] == body["id"]
    reused = client.post(EVENTS, json=event("ann", "web_search_calls", "a1"), headers=auth)
    assert reused.status_code == 409
    for n, extra in enumerate([{"data": {"seconds": "0.25"}}, {"value": 3}]):
        resp = client.post(EVENTS, json=event("ann", "audio_seconds", f"a{n + 2}", **extra),
                           headers=auth)
        assert resp.status_code == 201, resp.data
    for n, gpus in enumerate([2, 8, 4]):
        assert client.post(EVENTS, json=event("ann", "peak_gpus", f"g{n}", data={"gpus": gpus}),
                           headers=auth).status_code == 201
    for n, doc in enumerate(["d1", "d2", "d1", "d3", "d2"]):
        assert client.post(EVENTS, json=event("ann", "documents", f"d{n}",
                                              data={"doc_id": doc}), headers=auth
                           ).status_code == 201
    for n in range(2):
        assert client.post(EVENTS, json=event("ann", "web_search_calls", f"w{n}"),
                           headers=auth).status_code == 201
    totals = client.get("/v1/users/ann/meters?from=2000-01-01T00:00:00Z", headers=auth)
    assert totals.status_code == 200, totals.data
    found = {m["meter"]: m for m in totals.get_json()["meters"]}
    assert found["audio_seconds"]["value"] == "15.75"   # sum
    assert found["audio_seconds"]["cost_usd"] == "0.00193725"
    assert found["peak_gpus"]["value"] == "8"           # max
    assert found["documents"]["value"] == "3"           # unique_count: d1, d2, d3
    assert found["documents"]["events"] == 5
    assert found["web_search_calls"]["value"] == "2"    # count
    assert found["web_search_calls"]["cost_usd"] == "0.02"
    # another app sees none of it
    other = client.get("/v1/users/ann/meters?from=2000-01-01T00:00:00Z",
                       headers=bearer(mkeys.other_app))
    assert all(m["events"] == 0 for m in other.get_json()["meters"])


@pytest.mark.parametrize(("body", "param"), [
    (event("ann", "nope", "k"), "meter"),
    (event("ann", "audio_seconds", "k"), "data.seconds"),
    (event("ann", "audio_seconds", "k", value="1.0000001"), "value"),
    (event("ann", "audio_seconds", "k", value=-1), "value"),
    (event("ann", "web_search_calls", "k", value=5), "value"),
    (event("ann", "documents", "k", data={"doc_id": ""}), "data.doc_id"),
])
def test_bad_events_are_clear_errors(metered: Any, mkeys: Keys, body: dict[str, Any],
                                     param: str) -> None:
    resp = metered.test_client().post(EVENTS, json=body, headers=bearer(mkeys.app))
    assert resp.status_code == 400, resp.data
    assert resp.content_type == "application/problem+json"
    assert param in resp.get_json()["detail"]  # the field at fault is named
    with metered.extensions["wiring"].engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(MeterEvent)) == 0


def test_end_user_keys_cannot_report_meter_events(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    made = client.post("/v1/users/ann/keys", json={}, headers=bearer(mkeys.app))
    assert made.status_code == 201, made.data
    resp = client.post(EVENTS, json=event("ann", "web_search_calls", "k"),
                       headers=bearer(made.get_json()["key"]))
    assert resp.status_code == 403


def test_a_meter_limit_refuses_the_event_that_would_pass_it(metered: Any,
                                                           mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    for n in range(10):
        assert client.post(EVENTS, json=event("bea", "web_search_calls", f"s{n}"),
                           headers=auth).status_code == 201
    refused = client.post(EVENTS, json=event("bea", "web_search_calls", "s10"), headers=auth)
    assert refused.status_code == 402, refused.data
    assert refused.content_type == "application/problem+json"
    problem = refused.get_json()
    assert problem["limit"]["id"] == "meter-web_search_calls-day"
    assert problem["limit"]["used"] == 10 and problem["limit"]["limit"] == 10
    assert "10 of 10 searches per day" in problem["detail"]
    # a repeat of a recorded event is still a duplicate, not a refusal
    assert client.post(EVENTS, json=event("bea", "web_search_calls", "s3"),
                       headers=auth).status_code == 200
    quota = client.get("/v1/users/bea/quota", headers=auth).get_json()
    [line] = [x for x in quota["limits"] if x["metric"] == "meter:web_search_calls"]
    assert (line["used"], line["remaining"], line["limit"], line["unit"]) == (
        10, 0, 10, "searches")
    assert line["name"] == "Web searches a day"
    engine = metered.extensions["wiring"].engine
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(MeterEvent)) == 10
        [metric] = conn.execute(select(LimitRefusal.metric)).scalars().all()
    assert metric == "meter:web_search_calls"
    # the next day counts from zero (the limits and the meters share the frozen clock)
    metered.extensions["wiring"].meters.clock.now = NOW + timedelta(days=1)
    assert client.post(EVENTS, json=event("bea", "web_search_calls", "s11"),
                       headers=auth).status_code == 201


def test_a_decimal_meter_limit_counts_exactly(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    assert client.put("/v1/users/cid/plan", json={"plan": "audio"}, headers=auth
                      ).status_code == 200
    for n, seconds in enumerate(["30.25", "30.25"]):  # 60.5 of 60.5
        assert client.post(EVENTS, json=event("cid", "audio_seconds", f"c{n}", value=seconds),
                           headers=auth).status_code == 201
    over = client.post(EVENTS, json=event("cid", "audio_seconds", "c9", value="0.000001"),
                       headers=auth)
    assert over.status_code == 402
    assert (over.get_json()["limit"]["used"], over.get_json()["limit"]["limit"]) == (
        "60.5", "60.5")  # in the meter's unit, not its micro-units
    quota = client.get("/v1/users/cid/quota", headers=auth).get_json()
    [line] = quota["limits"]
    assert (line["used"], line["remaining"], line["limit"]) == ("60.5", 0, "60.5")
    assert line["unit"] == "seconds" and line["name"] == "Seconds per month"  # no name given


def test_parallel_events_pass_a_limit_exactly(metered: Any, mkeys: Keys) -> None:
    """50 events at once against a limit of 10: exactly 10 are recorded."""
    codes: list[int] = []
    start = threading.Barrier(50)

    def send(n: int) -> None:
        client = metered.test_client()
        start.wait()
        codes.append(client.post(EVENTS, json=event("dan", "web_search_calls", f"p{n}"),
                                 headers=bearer(mkeys.app)).status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 10 + [402] * 40
    with metered.extensions["wiring"].engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(MeterEvent)) == 10


def test_a_batch_records_each_event_on_its_own(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    events = [event("eve", "web_search_calls", f"b{n}") for n in range(11)]
    events.append(event("eve", "audio_seconds", "b-bad", value="x"))
    events.append(event("eve", "web_search_calls", "b0"))
    resp = client.post(f"{EVENTS}/batch", json={"events": events}, headers=bearer(mkeys.app))
    assert resp.status_code == 200, resp.data
    body = resp.get_json()
    assert body["recorded"] == 10 and body["duplicates"] == 1
    assert body["data"][10]["status"] == 402 and body["data"][11]["status"] == 400
    assert body["data"][12]["outcome"] == "duplicate"


def test_finance_reports_meter_costs(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    for n in range(3):  # 3 x 0.01
        assert client.post(EVENTS, json=event("fay", "web_search_calls", f"f{n}"),
                           headers=auth).status_code == 201
    assert client.post(EVENTS, json=event("gus", "audio_seconds", "f9", value="100"),
                       headers=auth).status_code == 201  # 100 x 0.000123
    assert client.post(EVENTS, json=event("gus", "web_search_calls", "x", value=1),
                       headers=bearer(mkeys.other_app)).status_code == 201  # another app's
    day = NOW.date().isoformat()
    summary = client.get(f"/v1/finance/summary?period={day}", headers=bearer(mkeys.finance))
    assert summary.status_code == 200, summary.data
    body = summary.get_json()
    assert body["meter_cost_usd"] == "0.0423" and body["total_cost_usd"] == "0.0423"
    assert body["gross_margin_usd"] == "-0.0423"
    assert body["meter_costs"] == [
        {"meter": "audio_seconds", "events": 1, "cost_usd": "0.0123"},
        {"meter": "web_search_calls", "events": 3, "cost_usd": "0.03"}]
    margins = client.get(f"/v1/finance/margins?period={day}&group_by=model",
                         headers=bearer(mkeys.finance)).get_json()
    rows = {r["key"]: r for r in margins["rows"]}
    assert rows["meter:web_search_calls"]["cost_usd"] == "0.03"
    by_plan = client.get(f"/v1/finance/margins?period={day}&group_by=plan",
                         headers=bearer(mkeys.finance)).get_json()
    assert {r["key"]: r["meter_cost_usd"] for r in by_plan["rows"]} == {"free": "0.0423"}
    other_day = (NOW + timedelta(days=2)).date().isoformat()
    later = client.get(f"/v1/finance/summary?period={other_day}",
                       headers=bearer(mkeys.finance)).get_json()
    assert later["meter_cost_usd"] == "0.00" and later["meter_costs"] == []


def test_store_down_refuses_unless_the_plan_fails_open(metered: Any, mkeys: Keys) -> None:
    from tests.integration.test_limits_gateway import _redis_down

    client = metered.test_client()
    auth = bearer(mkeys.app)
    assert client.put("/v1/users/hal/plan", json={"plan": "audio"}, headers=auth
                      ).status_code == 200
    _redis_down(metered)  # (the SQL store too: a Redis store that does not answer)
    closed = client.post(EVENTS, json=event("ivy", "web_search_calls", "z1"), headers=auth)
    assert closed.status_code == 503 and closed.headers["Retry-After"] == "1"
    opened = client.post(EVENTS, json=event("hal", "audio_seconds", "z2", value=2),
                         headers=auth)
    assert opened.status_code == 201, opened.data
    with metered.extensions["wiring"].engine.connect() as conn:
        assert conn.execute(select(MeterEvent.idempotency_key)).scalars().all() == ["z2"]


def test_meter_events_cross_the_paywall_thresholds(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    for n in range(11):  # 5 of 10 is 50%, 8 is 80%, 10 is 100%; the 11th is refused
        client.post(EVENTS, json=event("jo", "web_search_calls", f"t{n}"), headers=auth)
    listed = client.get("/v1/paywall/events?user=jo", headers=auth).get_json()["data"]
    seen = [(e["trigger"], e["threshold"], e["limit"]["used"]) for e in listed]
    assert seen == [("limit_reached", None, 10), ("threshold_crossed", 100, 10),
                    ("threshold_crossed", 80, 8), ("threshold_crossed", 50, 5)]


def test_meter_counters_are_rebuilt_from_the_meter_events(metered: Any, mkeys: Keys,
                                                          clean_db: Engine) -> None:
    from metering.redislimits import RedisLimitStore

    client = metered.test_client()
    auth = bearer(mkeys.app)
    assert client.put("/v1/users/kim/plan", json={"plan": "audio"}, headers=auth
                      ).status_code == 200
    for n, seconds in enumerate(["10.5", "20"]):
        assert client.post(EVENTS, json=event("kim", "audio_seconds", f"r{n}", value=seconds),
                           headers=auth).status_code == 201
    for n in range(4):
        assert client.post(EVENTS, json=event("lou", "web_search_calls", f"q{n}"),
                           headers=auth).status_code == 201

    def used(user: str) -> Any:
        [line] = client.get(f"/v1/users/{user}/quota", headers=auth).get_json()["limits"]
        return line["used"]

    assert (used("kim"), used("lou")) == ("30.5", 4)
    store = metered.extensions["wiring"].limits.store
    with clean_db.begin() as conn:  # every counter lost (a wiped table, a Redis flush)
        conn.exec_driver_sql("DELETE FROM limit_counters")
    if isinstance(store, RedisLimitStore):
        for key in store.client.scan_iter(f"{store.prefix}*"):
            store.client.delete(key)
    assert (used("kim"), used("lou")) == (0, 0)
    assert metered.extensions["wiring"].limits.rebuild() == 2
    assert (used("kim"), used("lou")) == ("30.5", 4)


def test_a_meter_price_version_prices_the_events_from_its_start(metered: Any,
                                                                mkeys: Keys) -> None:
    client = metered.test_client()
    admin = bearer(mkeys.admin)
    clock = metered.extensions["wiring"].meters.clock
    metered.extensions["wiring"].finance.meter_prices.clock = clock
    start = NOW + timedelta(hours=1)
    made = client.post("/v1/prices/meters", headers=admin, json={
        "meter": "web_search_calls", "price": "0.015", "effective_from": start.isoformat()})
    assert made.status_code == 201, made.data
    assert made.get_json()["price"] == "0.015"
    for body, param in (({"meter": "nope", "price": "1"}, "meter"),
                        ({"meter": "web_search_calls", "price": "0.0000001"}, "price"),
                        ({"meter": "web_search_calls", "price": "1",
                          "effective_from": (NOW - timedelta(days=1)).isoformat()},
                         "effective_from")):
        refused = client.post("/v1/prices/meters", headers=admin, json=body)
        assert refused.status_code in (400, 404), refused.data
        assert param in refused.get_json()["detail"] or refused.status_code == 404
    assert client.post("/v1/prices/meters", headers=bearer(mkeys.finance), json={
        "meter": "web_search_calls", "price": "1"}).status_code == 403
    listed = client.get("/v1/prices/meters?meter=web_search_calls", headers=admin).get_json()
    assert [(v["price"], v["source"]) for v in listed["data"]] == [
        ("0.01", "config"), ("0.015", "api")]
    auth = bearer(mkeys.app)
    before = client.post(EVENTS, json=event("max", "web_search_calls", "v1"), headers=auth)
    clock.now = start
    after = client.post(EVENTS, json=event("max", "web_search_calls", "v2"), headers=auth)
    assert (before.get_json()["cost_usd"], after.get_json()["cost_usd"]) == ("0.01", "0.015")


def test_what_already_happened_is_recorded_and_counted_never_refused(metered: Any,
                                                                     mkeys: Keys) -> None:
    """The gateway's own metering (e.g. the web searches of a relayed call): enforce=False."""
    client = metered.test_client()
    auth = bearer(mkeys.app)
    for n in range(10):
        assert client.post(EVENTS, json=event("ned", "web_search_calls", f"n{n}"),
                           headers=auth).status_code == 201
    meters = metered.extensions["wiring"].meters
    app_id = metered.extensions["wiring"].auth.authenticate(mkeys.app).app_id
    done = meters.record_meter_event(app_id, "ned", "web_search_calls", None, None,
                                     "resp_1:ws_1", enforce=False)
    assert not done.duplicate and done.cost_pico_usd == 10**10
    again = meters.record_meter_event(app_id, "ned", "web_search_calls", None, None,
                                      "resp_1:ws_1", enforce=False)
    assert again.duplicate
    [line] = client.get("/v1/users/ned/quota", headers=auth).get_json()["limits"]
    assert (line["used"], line["remaining"]) == (11, 0)
    assert client.post(EVENTS, json=event("ned", "web_search_calls", "n99"),
                       headers=auth).status_code == 402


def test_a_meter_price_version_is_audited_with_the_price_it_replaces(metered: Any,
                                                                     mkeys: Keys) -> None:
    """before: the price that was to be in force from the new version's start (the config's,
    then the earlier version); a meter with no price has none."""
    client = metered.test_client()
    admin = bearer(mkeys.admin)
    clock = metered.extensions["wiring"].meters.clock
    metered.extensions["wiring"].finance.meter_prices.clock = clock
    for meter, price, hours in (("web_search_calls", "0.015", 1), ("web_search_calls", "0.02", 2),
                                ("peak_gpus", "1.5", 1)):
        made = client.post("/v1/prices/meters", headers=admin, json={
            "meter": meter, "price": price,
            "effective_from": (NOW + timedelta(hours=hours)).isoformat()})
        assert made.status_code == 201, made.data
    trail = client.get("/v1/audit?action=meter_price.create", headers=admin).get_json()
    rows = [(r["target"]["id"], r["before"], r["after"]["price"])
            for r in trail["data"][::-1]]
    one, two = (f"{NOW + timedelta(hours=h):%Y%m%dT%H%M%SZ}" for h in (1, 2))
    assert [(target, (before or {}).get("price"), (before or {}).get("source"), after)
            for target, before, after in rows] == [
        (f"web_search_calls@{one}", "0.01", "config", "0.015"),
        (f"web_search_calls@{two}", "0.015", "api", "0.02"),
        (f"peak_gpus@{one}", None, None, "1.5")]
    assert rows[1][1]["id"] == rows[0][0]  # the version it follows
    assert {r["actor"]["key_id"] for r in trail["data"]} == {mkeys.admin.split("_")[1]}
