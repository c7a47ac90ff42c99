"""Finance on Postgres: prices in force when a call happens, roll-ups equal to a direct
computation over the raw events (random data), re-runs that change nothing, local GPU hours
allocated without losing a pico, report totals equal to the sum of their rows, bad input."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Engine

from finance.models import GpuHour, RevenueDaily, RollupState, UsageDaily
from metering.models import UsageEvent
from metering.pricing import TokenUsage, cost_pico_usd
from plans.models import RevenueEvent
from tests.conftest import Keys, bearer, config_from_toml, make_keys
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
HOURLY = 1_405_000_000_000  # 1.20 + 0.7 kW x 0.15 + 0.10 USD, in pico-USD


def finance_toml(base_url: str) -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{base_url}"

[[upstreams]]
name = "gpu"
base_url = "{base_url}"
[upstreams.cost]
hardware_per_hour = "1.20"
power_watts = 700
kwh_price = "0.15"
hosting_per_hour = "0.10"
shadow_model = "big"

[[models]]
name = "small"
upstream = "cloud"
upstream_model = "gpt-4o-mini"
[models.price]
input = "0.15"
cached_input = "0.075"
cache_write = "0.30"
output = "0.60"
reasoning = "0.50"
request_fee = "0.0001"

[[models]]
name = "big"
upstream = "cloud"
upstream_model = "gpt-4o"
price = {{ input = "2.50", cached_input = "1.25", output = "10.00" }}

[[models]]
name = "local"
upstream = "gpu"
upstream_model = "gpt-4o-mini"

[[models]]
name = "free-model"
upstream = "cloud"
upstream_model = "gpt-4o-mini"

[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000000000

[[plans]]
id = "pro"
price = {{ amount = 2000, currency = "usd", interval = "month" }}

[[plans]]
id = "team"
price = {{ amount = 9000, currency = "eur", interval = "month" }}

[finance]
usd_per = {{ eur = "1.10" }}
"""


@pytest.fixture()
def fin(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
        tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    from app import create_app

    app = create_app(config_from_toml(finance_toml(upstream.base_url), tmp_path,
                                      database_url=pg_url))
    app.extensions["wiring"].finance.prices.refresh_seconds = 0  # one process: no waiting
    try:
        yield app, make_keys(app)
    finally:
        app.extensions["wiring"].engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def fin_any(request: pytest.FixtureRequest, upstream: FakeUpstream,
            tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    """The finance world on Postgres, and on the embedded SQLite default."""
    from app import create_app
    from core.db import make_engine
    from migrations.schema import upgrade

    if request.param == "postgres":
        request.getfixturevalue("clean_db")
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'finance.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
    app = create_app(config_from_toml(finance_toml(upstream.base_url), tmp_path,
                                      database_url=url))
    app.extensions["wiring"].finance.prices.refresh_seconds = 0  # one process: no waiting
    try:
        yield app, make_keys(app)
    finally:
        app.extensions["wiring"].engine.dispose()


def track(client: Any, key: str, user: str, model: str, **usage: int) -> Any:
    resp = client.post("/v1/meter/track", headers=bearer(key), json={
        "user": user, "model": model, "idempotency_key": uuid.uuid4().hex,
        "usage": {"input_tokens": 1000, **usage}})
    assert resp.status_code == 201, resp.data
    return resp.get_json()


def test_a_price_change_prices_later_calls_and_leaves_earlier_ones(fin: tuple[Any, Keys]
                                                                   ) -> None:
    app, keys = fin
    client, w = app.test_client(), app.extensions["wiring"]
    before = track(client, keys.app, "ana", "small", output_tokens=500, cached_input_tokens=200,
                   cache_write_tokens=100, reasoning_tokens=50)
    # 700 plain + 200 cached + 100 written input, 450 output + 50 reasoning, one request
    assert Decimal(before["cost_usd"]) == (700 * Decimal("0.15") + 200 * Decimal("0.075")
                                           + 100 * Decimal("0.30") + 450 * Decimal("0.60")
                                           + 50 * Decimal("0.50")) / 10**6 + Decimal("0.0001")
    made = client.post("/v1/prices", headers=bearer(keys.admin), json={
        "model": "small", "input": "0.30", "output": "1.20"})
    assert made.status_code == 201, made.data
    after = track(client, keys.app, "ana", "small", output_tokens=500)
    assert Decimal(after["cost_usd"]) == (1000 * Decimal("0.30") + 500 * Decimal("1.20")) / 10**6
    with w.engine.connect() as conn:
        costs = conn.execute(select(UsageEvent.cost_pico_usd).order_by(UsageEvent.id)).scalars()
        assert [Decimal(c) / 10**12 for c in costs] == [Decimal(before["cost_usd"]),
                                                        Decimal(after["cost_usd"])]
    listed = client.get("/v1/prices?model=small", headers=bearer(keys.finance)).get_json()
    assert [v["source"] for v in listed["data"]] == ["config", "api"]
    # a sheet for next month, as CSV; all or nothing
    soon = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    sheet = f"model,effective_from,input,output\nbig,{soon},2.00,8.00\nsmall,{soon},0.10,0.40\n"
    done = client.post("/v1/prices/import?format=csv", data=sheet, headers=bearer(keys.admin))
    assert done.status_code == 201 and len(done.get_json()["data"]) == 2
    again = client.post("/v1/prices/import?format=csv", data=sheet, headers=bearer(keys.admin))
    assert again.status_code == 409
    # bad input: clear errors, nothing changed
    for body in ({"model": "small", "input": 0.1, "output": "1"},   # a float is not exact
                 {"model": "small", "input": "0.1"}):                # no output price
        assert client.post("/v1/prices", headers=bearer(keys.admin), json=body).status_code \
            == 422
    past = client.post("/v1/prices", headers=bearer(keys.admin), json={
        "model": "small", "input": "1", "output": "1",
        "effective_from": "2026-01-01T00:00:00+00:00"})
    assert past.status_code == 400 and "past" in past.get_json()["detail"]
    assert client.post("/v1/prices", headers=bearer(keys.admin), json={
        "model": "nope", "input": "1", "output": "1"}).status_code == 404
    assert client.post("/v1/prices/import?format=csv", data="model,colour\nsmall,red\n",
                       headers=bearer(keys.admin)).status_code == 400
    assert client.post("/v1/prices", headers=bearer(keys.admin), json={
        "model": "small", "input": "99999999999999", "output": "1"}).status_code == 400
    refused = client.post("/v1/prices", headers=bearer(keys.finance), json={
        "model": "small", "input": "1", "output": "1"})
    assert refused.status_code == 403 and "finance key" in refused.get_json()["detail"]
    assert len(client.get("/v1/prices?model=small", headers=bearer(keys.admin))
               .get_json()["data"]) == 3


# -- roll-ups against the raw events ------------------------------------------------------------

MODELS = ("small", "big", "local", "free-model")
DAY0 = datetime(2026, 10, 30, tzinfo=UTC)


def _random_events(rnd: random.Random, app_id: int, users: list[int], n: int,
                   prices: Any) -> list[dict[str, Any]]:
    from metering.pricing import TokenUsage, cost_or_none

    rows = []
    for i in range(n):
        model = rnd.choice(MODELS)
        at = DAY0 + timedelta(seconds=rnd.randrange(3 * 86400))
        inp, out = rnd.randrange(0, 5000), rnd.randrange(0, 2000)
        usage = TokenUsage(input_tokens=inp, cached_input_tokens=rnd.randrange(0, inp + 1),
                           output_tokens=out, reasoning_tokens=rnd.randrange(0, out + 1))
        price = prices.price_at(model, at)
        rows.append({
            "app_id": app_id, "end_user_id": rnd.choice(users), "request_id": f"r{i}",
            "idempotency_key": uuid.uuid4().hex, "endpoint": "chat", "requested_model": model,
            "upstream": "gpu" if model == "local" else "cloud", "upstream_model": model,
            "stream": False, "input_tokens": inp,
            "cached_input_tokens": usage.cached_input_tokens, "output_tokens": out,
            "reasoning_tokens": usage.reasoning_tokens, "cache_write_tokens": 0,
            "usage_source": "reported", "cost_pico_usd": cost_or_none(usage, price),
            "priced": price is not None, "status": "ok", "http_status": 200, "error": None,
            "latency_ms": 1, "ttft_ms": None, "created_at": at, "limits_pending": False,
            "plan_id": rnd.choice(("free", "pro", "team", None))})
    return rows


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.integers(1, 400))
def test_the_rollup_equals_a_direct_computation_over_the_raw_events(
        fin_any: tuple[Any, Keys], rng: int, n: int) -> None:
    app, _ = fin_any
    w = app.extensions["wiring"]
    with w.engine.begin() as conn:
        for table in (UsageEvent, UsageDaily, GpuHour, RollupState):
            conn.execute(delete(table))
    app_id, _ = w.tenancy.ensure_app("acme")
    users = [w.tenancy.ensure_end_user(app_id, f"u{i}") for i in range(6)]
    rnd = random.Random(rng)  # noqa: S311 - test data
    rows = _random_events(rnd, app_id, users, n, w.finance.prices)
    half = len(rows) // 2
    with w.engine.begin() as conn:
        if rows[:half]:
            conn.execute(insert(UsageEvent), rows[:half])
    w.finance.refresh()
    with w.engine.begin() as conn:  # more events later, some in days rolled up already
        if rows[half:]:
            conn.execute(insert(UsageEvent), rows[half:])
    w.finance.refresh()
    # directly: per (user, plan, model, day); an event without a plan counts on the user's
    want: dict[tuple[int, str, str, Any], list[int]] = defaultdict(lambda: [0] * 9)
    hours: dict[datetime, list[tuple[tuple[int, str, str, Any], int]]] = defaultdict(list)
    local_cached: dict[Any, int] = defaultdict(int)
    local_reasoning: dict[Any, int] = defaultdict(int)
    for r in rows:
        key = (r["end_user_id"], r["plan_id"] or "free", r["requested_model"],
               r["created_at"].date())
        t = want[key]
        t[0] += 1 if r["input_tokens"] + r["output_tokens"] > 0 else 0
        t[1] += r["input_tokens"]
        t[2] += r["output_tokens"]
        t[3] += r["cost_pico_usd"] or 0
        t[4] += 0 if r["priced"] or r["upstream"] == "gpu" else 1
        t[5] += r["cached_input_tokens"]
        t[6] += r["reasoning_tokens"]
        if r["upstream"] == "gpu":  # the shadow: local tokens at big's price (no fee: linear)
            t[7] += r["input_tokens"]
            t[8] += r["output_tokens"]
            local_cached[key] += r["cached_input_tokens"]
            local_reasoning[key] += r["reasoning_tokens"]
        if r["upstream"] == "gpu":
            hours[r["created_at"].replace(minute=0, second=0)].append(
                (key, r["input_tokens"] + r["output_tokens"]))
    with w.engine.connect() as conn:
        got = {(r.end_user_id, r.plan_id, r.model, r.day): r for r in conn.execute(
            select(UsageDaily.__table__).where(UsageDaily.app_id == app_id))}
        gpu = {r.hour: r for r in conn.execute(select(GpuHour.__table__))}
    assert set(got) == set(want)
    big = w.finance.prices.price_at("big", DAY0)
    for key, t in want.items():
        r = got[key]
        assert [r.calls, r.input_tokens, r.output_tokens, r.cloud_cost_pico,
                r.unpriced_calls, r.cached_input_tokens, r.reasoning_tokens] == t[:7], key
        assert r.shadow_cost_pico == cost_pico_usd(TokenUsage(
            input_tokens=t[7], cached_input_tokens=local_cached[key], output_tokens=t[8],
            reasoning_tokens=local_reasoning[key]), big), key
    # every hour the GPU served: its whole cost allocated, split by tokens within a pico
    assert set(gpu) == set(hours)
    local_by_key: dict[Any, Fraction] = defaultdict(Fraction)
    for hour, calls in hours.items():
        assert gpu[hour].allocated_pico == gpu[hour].cost_pico == HOURLY
        tokens = sum(t for _, t in calls)
        for key, t in calls:
            local_by_key[key] += Fraction(HOURLY * t, tokens) if tokens else Fraction(
                HOURLY, len(calls))
    assert sum(r.local_cost_pico for r in got.values()) == HOURLY * len(hours)
    for key, exact in local_by_key.items():
        spread_over = len([h for h, calls in hours.items() if any(k == key for k, _ in calls)])
        assert abs(got[key].local_cost_pico - exact) <= spread_over, key


def test_a_rerun_changes_nothing(fin_any: tuple[Any, Keys]) -> None:
    app, _ = fin_any
    w = app.extensions["wiring"]
    app_id, _ = w.tenancy.ensure_app("acme")
    users = [w.tenancy.ensure_end_user(app_id, f"u{i}") for i in range(4)]
    rows = _random_events(random.Random(3), app_id, users, 300, w.finance.prices)  # noqa: S311
    with w.engine.begin() as conn:
        conn.execute(insert(UsageEvent), rows)
    first = w.finance.refresh()
    assert first is not None and len(first.days) == 3

    def snapshot() -> tuple[list[Any], list[Any]]:
        with w.engine.connect() as conn:
            return (sorted(tuple(r) for r in conn.execute(select(UsageDaily.__table__))),
                    sorted(tuple(r) for r in conn.execute(select(GpuHour.__table__))))

    before = snapshot()
    again = w.finance.refresh()
    assert again is not None and again.days == []  # nothing new: nothing recomputed
    for day in first.days:  # and recomputing every day anyway gives the same rows
        w.finance.rollups.rollup_day(day)
    assert snapshot() == before


def test_reports_add_up_and_bad_input_is_a_clear_error(fin: tuple[Any, Keys]) -> None:
    from finance.seed import seed

    app, keys = fin
    client, w = app.test_client(), app.extensions["wiring"]
    now = datetime(2026, 11, 20, tzinfo=UTC)
    result = seed(w.engine, w.config, w.plans.catalog, w.tenancy, w.finance.prices,
                  users=40, days=25, app="acme", now=now)
    assert result.events > 500 and result.invoices > 0
    summary = client.get("/v1/finance/summary?period=2026-11",
                         headers=bearer(keys.finance)).get_json()
    cost = Decimal(summary["cloud_cost_usd"]) + Decimal(summary["local_cost_usd"])
    assert Decimal(summary["inference_cost_usd"]) == cost
    assert Decimal(summary["gross_margin_usd"]) == Decimal(summary["revenue_usd"]) - cost
    # the ledger, read directly: calls and cloud cost of November
    nov = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    with w.engine.connect() as conn:
        calls, cloud, users = conn.execute(select(
            func.count(), func.coalesce(func.sum(UsageEvent.cost_pico_usd), 0),
            func.count(func.distinct(UsageEvent.end_user_id))).where(
            UsageEvent.created_at >= nov[0], UsageEvent.created_at < nov[1])).one()
        revenue = conn.execute(select(func.sum(RevenueDaily.amount), RevenueDaily.currency)
                               .where(RevenueDaily.day >= nov[0].date(),
                                      RevenueDaily.day < nov[1].date())
                               .group_by(RevenueDaily.currency)).all()
    assert summary["calls"] == calls and summary["active_users_monthly"] == users
    assert Decimal(summary["cloud_cost_usd"]) == Decimal(cloud) / 10**12
    want_revenue = sum(Decimal(a) / 100 * (Decimal("1.10") if c == "eur" else 1)
                       for a, c in revenue)
    assert Decimal(summary["revenue_usd"]) == want_revenue
    for group in ("plan", "model", "user", "day"):
        body = client.get(f"/v1/finance/margins?period=2026-11&group_by={group}",
                          headers=bearer(keys.finance)).get_json()
        rows, totals = body["rows"], body["totals"]
        assert Decimal(totals["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in rows) == cost
        assert totals["calls"] == sum(r["calls"] for r in rows) == calls
        if group != "model":
            assert Decimal(totals["revenue_usd"]) == sum(Decimal(r["revenue_usd"])
                                                         for r in rows)
            assert Decimal(totals["margin_usd"]) == sum(Decimal(r["margin_usd"]) for r in rows)
        # the same rows a page at a time, in the same order (least profitable first too)
        for order in ("key", "margin"):
            url = f"/v1/finance/margins?period=2026-11&group_by={group}&order={order}"
            whole = client.get(url, headers=bearer(keys.finance)).get_json()["rows"]
            walked, after = [], None
            while True:
                page = client.get(url + "&limit=2" + (f"&starting_after={after}" if after
                                                       else ""),
                                  headers=bearer(keys.finance)).get_json()
                walked += [r["key"] for r in page["rows"]]
                if not page["has_more"]:
                    break
                after = page["rows"][-1]["key"]
            assert walked == [r["key"] for r in whole], (group, order)
    csv_body = client.get("/v1/finance/margins?period=2026-11&group_by=plan&format=csv",
                          headers=bearer(keys.finance))
    assert csv_body.mimetype == "text/csv" and csv_body.text.splitlines()[-1].startswith("TOTAL")
    worst = client.get("/v1/finance/users/least-profitable?period=2026-11&limit=3",
                       headers=bearer(keys.finance)).get_json()["rows"]
    margins = [Decimal(r["margin_usd"]) for r in worst]
    assert len(worst) == 3 and margins == sorted(margins)
    local = client.get("/v1/finance/local?period=2026-11", headers=bearer(keys.admin)).get_json()
    [gpu] = local["upstreams"]
    # what the GPU hours allocated is what this app's users were charged (one app uses it),
    # and the full cost is every hour since it first served, at its hourly price
    assert Decimal(gpu["allocated_usd"]) == Decimal(summary["local_cost_usd"]) > 0
    assert Decimal(gpu["cost_usd"]) == gpu["hours"] * Decimal(HOURLY) / 10**12
    assert gpu["hours"] >= gpu["hours_serving"] > 0
    # the GPU serves every app: its figures are for operator-wide keys only
    assert client.get("/v1/finance/local?period=2026-11",
                      headers=bearer(keys.finance)).status_code == 403
    # bad input
    for path, status in (("/v1/finance/summary?period=2026-13", 400),
                         ("/v1/finance/summary?period=9999-12", 400),
                         ("/v1/finance/summary?period=2026-11-09..2026-11-01", 400),
                         ("/v1/finance/summary?period=november", 400),
                         ("/v1/finance/summary", 422),
                         ("/v1/finance/margins?period=2026-11&group_by=country", 422),
                         ("/v1/finance/margins?period=2026-11&group_by=plan&format=xml", 422)):
        resp = client.get(path, headers=bearer(keys.finance))
        assert resp.status_code == status, (path, resp.data)
        assert resp.mimetype == "application/problem+json"
    assert client.get("/v1/finance/summary?period=2026-11",
                      headers=bearer(keys.app)).status_code == 403
    assert client.get("/v1/finance/summary?period=2026-11",
                      headers=bearer(keys.admin)).status_code == 400  # which app?
    other = client.get("/v1/finance/summary?period=2026-11&app=globex",
                       headers=bearer(keys.admin)).get_json()
    assert other["calls"] == 0  # another app's figures are its own
    with w.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RevenueEvent)).scalar() == \
            result.invoices



def test_a_batch_of_reported_calls_is_recorded_once_each(fin_any: tuple[Any, Keys]) -> None:
    app, keys = fin_any
    client, w = app.test_client(), app.extensions["wiring"]
    events = [{"user": f"u{i % 3}", "model": "small", "idempotency_key": f"batch-{i}",
               "usage": {"input_tokens": 100 + i, "output_tokens": 10}} for i in range(250)]
    first = client.post("/v1/meter/track/batch", headers=bearer(keys.app),
                        json={"events": events})
    assert first.status_code == 201, first.data
    body = first.get_json()
    assert (body["tracked"], body["duplicates"]) == (250, 0)
    assert Decimal(body["data"][0]["cost_usd"]) == (100 * Decimal("0.15") + 10 * Decimal(
        "0.60")) / 10**6 + Decimal("0.0001")
    # a retry that mixes new events around one recorded before: each classified right, the
    # new ones counted into the limits once (on SQLite too, whose batch insert is not atomic)
    mixed = [{**events[0], "idempotency_key": f"new-{i}"} for i in range(3)]
    again = client.post("/v1/meter/track/batch", headers=bearer(keys.app),
                        json={"events": mixed[:2] + [events[7]] + mixed[2:]})
    assert again.status_code == 201
    assert [d["outcome"] for d in again.get_json()["data"]] == [
        "tracked", "tracked", "duplicate", "tracked"]
    used = client.get("/v1/users/u0/quota", headers=bearer(keys.app)).get_json()["limits"][0]
    want = sum(100 + i + 10 for i in range(250) if i % 3 == 0) + 3 * 110
    assert used["used"] == want
    with w.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(UsageEvent)).scalar() == 253
        assert not conn.execute(select(func.count()).select_from(UsageEvent).where(
            UsageEvent.limits_pending)).scalar()  # all counted: none left to catch up
        plans = set(conn.execute(select(UsageEvent.plan_id)).scalars())
    assert plans == {"free"}  # each row knows the plan its user was on
    for bad, status in (({"events": []}, 422), ({"events": [events[0]] * 2}, 400),
                        ({"events": [{**events[0], "usage": {"input_tokens": -1}}]}, 422),
                        ({"events": events * 5}, 422)):
        resp = client.post("/v1/meter/track/batch", headers=bearer(keys.app), json=bad)
        assert resp.status_code == status, resp.data
    other = client.post("/v1/meter/track/batch", headers=bearer(keys.finance),
                        json={"events": events[:1]})
    assert other.status_code == 403
    user_key = client.post("/v1/users/u0/keys", headers=bearer(keys.app), json={})
    if user_key.status_code == 201:  # an end user's key reports one call at a time
        resp = client.post("/v1/meter/track/batch", json={"events": events[:1]},
                           headers=bearer(user_key.get_json()["key"]))
        assert resp.status_code == 403


def test_a_month_in_progress_counts_revenue_to_today_and_says_it_is_partial(
        fin: tuple[Any, Keys]) -> None:
    """Invoices are spread over the days they pay for; a month in progress sets the revenue
    earned to today against the cost to today (on main: the whole month's revenue against a
    few days of cost, a 96.9 % margin), and says it is partial."""
    from finance.seed import seed

    app, keys = fin
    client, w = app.test_client(), app.extensions["wiring"]
    now = datetime(2026, 11, 20, 15, tzinfo=UTC)
    seed(w.engine, w.config, w.plans.catalog, w.tenancy, w.finance.prices,
         users=30, days=40, app="acme", now=now)
    w.finance.reports.clock = lambda: now
    nov = client.get("/v1/finance/summary?period=2026-11", headers=bearer(keys.finance)
                     ).get_json()  # (rolls up first)
    with w.engine.connect() as conn:
        def revenue(first: date, end: date) -> Decimal:
            rows = conn.execute(select(func.sum(RevenueDaily.amount), RevenueDaily.currency)
                                .where(RevenueDaily.day >= first, RevenueDaily.day < end)
                                .group_by(RevenueDaily.currency)).all()
            return sum((Decimal(a) / 100 * (Decimal("1.10") if c == "eur" else 1)
                        for a, c in rows), Decimal(0))
        to_today = revenue(date(2026, 11, 1), date(2026, 11, 21))
        whole = revenue(date(2026, 11, 1), date(2026, 12, 1))
        october = revenue(date(2026, 10, 1), date(2026, 11, 1))
    assert whole > to_today > 0  # invoices paid this month run past today
    assert nov["partial"] is True and nov["through"] == "2026-11-20"
    assert Decimal(nov["revenue_usd"]) == to_today
    days = client.get("/v1/finance/margins?period=2026-11&group_by=day",
                      headers=bearer(keys.finance)).get_json()
    assert max(r["key"] for r in days["rows"]) <= "2026-11-20"
    octo = client.get("/v1/finance/summary?period=2026-10", headers=bearer(keys.finance)
                      ).get_json()
    assert octo["partial"] is False and octo["through"] == "2026-10-31"
    assert Decimal(octo["revenue_usd"]) == october
