"""Allowances and overage of [[meters]] meters: usage past a plan's allowance of a meter and
under its hard limit is billed as overage, sent to Stripe through a Stripe Billing Meter of
that meter exactly once, shown on the user's meters and in finance's revenue; a late event's
overage is billed in the open cycle."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from core.db import utcnow
from plans.meter_stripe import meter_identifier
from plans.models import EndUserPlan, MeterOverage, StripeCustomer
from tests.conftest import bearer, config_from_toml, fake_stripe_server, gateway_toml
from tests.integration.test_stripe_overage import subscribe_alice
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
EVENTS = "/v1/meter/events"
STRIPE_METER = "mlane_meter_web_search_calls"


def plans_toml(tag: str, stripe_url: str) -> str:
    return f"""
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"
price = "0.004"

[[plans]]
id = "free-{tag}"
default = true

[[plans]]
id = "metered-{tag}"
price = {{ amount = 1000, currency = "usd", interval = "month" }}
[[plans.limits]]
metric = "meter:web_search_calls"
window = "cycle"
amount = 20
[plans.meters.web_search_calls]
included = 10
overage_price = "2"

[stripe]
api_base = "{stripe_url}"
"""


@pytest.fixture()
def billed(tmp_path: Path, pg_url: str, clean_db: Engine, upstream: FakeUpstream
           ) -> Iterator[tuple[Any, str, dict[str, str], str, str]]:
    """alice subscribed to a plan with 10 web searches a cycle, 2 cents each past them, and
    at most 20; a fake Stripe of this test's own."""
    from app import create_app, main
    from core.auth import Role

    tag = uuid.uuid4().hex[:8]
    with fake_stripe_server() as stripe_url:
        toml = gateway_toml(upstream.base_url) + plans_toml(tag, stripe_url)
        (tmp_path / "meterlane.toml").write_text(toml)
        env = {**os.environ, "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
               "MLANE_DATABASE_URL": pg_url, "MLANE_STRIPE_API_KEY": "sk_test_meterlane",
               "MLANE_DATA_DIR": str(tmp_path / "var")}
        synced = CliRunner().invoke(main, ["plans", "sync"], env=env)
        assert synced.exit_code == 0, synced.output
        assert f"created     meter {STRIPE_METER}" in synced.output
        assert f"created     price metered-{tag}@1:meter:web_search_calls" in synced.output
        again = CliRunner().invoke(main, ["plans", "sync"], env=env)
        assert "Stripe is in sync: nothing changed" in again.output, again.output
        app = create_app(replace(config_from_toml(toml, tmp_path, database_url=pg_url),
                                 stripe_api_key="sk_test_meterlane"))
        wiring = app.extensions["wiring"]
        key = wiring.keys.create_key(Role.APP, "acme").key
        subscribe_alice(app.test_client(), key, tag)
        try:
            yield app, key, env, stripe_url, tag
        finally:
            wiring.engine.dispose()


def search(client: Any, key: str, ref: str, **extra: Any) -> Any:
    return client.post(EVENTS, headers=bearer(key), json={
        "user": "alice", "meter": "web_search_calls", "idempotency_key": ref, **extra})


def stripe_events(stripe_url: str) -> list[dict[str, Any]]:
    return [e for e in httpx.get(f"{stripe_url}/_config/meter_events").json()["data"]
            if e["event_name"] == STRIPE_METER]


def cli(env: dict[str, str], *args: str) -> Any:
    from app import main

    return CliRunner().invoke(main, list(args), env=env)


def report(env: dict[str, str]) -> str:
    result = cli(env, "billing", "report-overage")
    assert result.exit_code == 0, result.output
    return str(result.output)


def allowance_of(client: Any, key: str) -> dict[str, Any]:
    body = client.get("/v1/users/alice/meters", headers=bearer(key)).get_json()
    [meter] = [m for m in body["meters"] if m["meter"] == "web_search_calls"]
    return dict(meter["allowance"])


def test_overage_between_allowance_and_limit_reaches_stripe_once(billed: Any) -> None:
    app, key, env, stripe_url, tag = billed
    client = app.test_client()
    codes = [search(client, key, f"s{n}").status_code for n in range(25)]
    assert codes == [201] * 20 + [402] * 5  # the hard limit still refuses past 20
    shown = allowance_of(client, key)
    assert (shown["included"], shown["used"], shown["remaining"], shown["overage"]) == (
        "10", "20", "0", "10")
    assert shown["overage_price"] == "2" and shown["overage_amount"] == "20"  # cents
    assert shown["currency"] == "usd"

    assert "reported 10 overage events of [[meters]]" in report(env)
    assert "reported 0 overage events of [[meters]]" in report(env)  # nothing twice
    sent = stripe_events(stripe_url)
    assert len(sent) == 10 and sum(Decimal(e["payload"]["value"]) for e in sent) == 10
    engine = app.extensions["wiring"].engine
    with engine.connect() as conn:
        customer = conn.execute(select(StripeCustomer.customer_id)).scalar_one()
        rows = conn.execute(select(MeterOverage)).all()
    assert {e["identifier"] for e in sent} == {
        meter_identifier(r.meter_event_id, customer) for r in rows}
    assert all(e["payload"]["stripe_customer_id"] == customer for e in sent)

    # sent but never marked (a crash between the two): sent again, Stripe keeps one each
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).values(reported_at=None))
    assert "reported 10 overage events of [[meters]]" in report(env)
    assert len(stripe_events(stripe_url)) == 10
    ok = cli(env, "billing", "reconcile", "--period", utcnow().strftime("%Y-%m"))
    assert ok.exit_code == 0, ok.output
    assert f"{customer:<24} web_search_calls             10         10         10  ok" \
        in ok.output

    # overage accounted and not yet sent: the reconciliation says so, and fails
    assert search(client, key, "s-more").status_code == 402  # (the limit: nothing new)
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).where(MeterOverage.meter_event_id == rows[0]
                                                .meter_event_id).values(reported_at=None))
    behind = cli(env, "billing", "reconcile", "--period", utcnow().strftime("%Y-%m"))
    assert behind.exit_code == 1 and "10          9         10  DIFFERENCE" in behind.output


def test_finance_counts_meter_overage_as_revenue(billed: Any) -> None:
    from core.auth import Role

    app, key, _env, _stripe, tag = billed
    client = app.test_client()
    for n in range(13):  # 3 past the allowance: 6 cents
        assert search(client, key, f"f{n}").status_code == 201
    finance = app.extensions["wiring"].keys.create_key(Role.FINANCE, "acme").key
    period = utcnow().strftime("%Y-%m")
    body = client.get(f"/v1/finance/summary?period={period}", headers=bearer(finance))
    assert body.status_code == 200, body.data
    summary = body.get_json()
    assert summary["meter_revenue_usd"] == "0.06"
    assert summary["meter_revenues"] == [{"meter": "web_search_calls", "revenue_usd": "0.06"}]
    assert summary["meter_cost_usd"] == "0.052"  # 13 x 0.004
    assert Decimal(summary["revenue_usd"]) >= Decimal("0.06")
    by_plan = client.get(f"/v1/finance/margins?period={period}&group_by=plan",
                         headers=bearer(finance)).get_json()
    [row] = [r for r in by_plan["rows"] if r["key"] == f"metered-{tag}"]
    assert row["meter_revenue_usd"] == "0.06" and row["meter_cost_usd"] == "0.052"
    assert Decimal(row["margin_usd"]) == Decimal(row["revenue_usd"]) - Decimal(
        row["cost_usd"])
    by_user = client.get(f"/v1/finance/margins?period={period}&group_by=user",
                         headers=bearer(finance)).get_json()
    [alice] = [r for r in by_user["rows"] if r["key"] == "alice"]
    assert alice["meter_revenue_usd"] == "0.06"


def test_a_late_events_overage_is_billed_in_the_open_cycle(billed: Any) -> None:
    app, key, env, stripe_url, _tag = billed
    engine = app.extensions["wiring"].engine
    now = utcnow()
    # alice has been subscribed for 40 days: the open cycle began about 10 days ago
    anchor = now - timedelta(days=40)
    with engine.begin() as conn:
        conn.execute(update(EndUserPlan).values(anchored_at=anchor))
    client = app.test_client()
    for n in range(10):
        assert search(client, key, f"l{n}").status_code == 201
    cycle_start = datetime.fromisoformat(allowance_of(client, key)["cycle_start"])
    assert cycle_start > anchor and now - cycle_start < timedelta(days=32)
    # a search done in the closed cycle, reported only now: past this cycle's allowance
    late = (cycle_start - timedelta(days=3)).isoformat()
    assert search(client, key, "late", timestamp=late).status_code == 201
    with engine.connect() as conn:
        [row] = conn.execute(select(MeterOverage)).all()
    assert row.happened_at == cycle_start  # not in the closed cycle's invoice
    assert allowance_of(client, key)["overage"] == "1"
    assert "reported 1 overage events of [[meters]]" in report(env)
    [sent] = stripe_events(stripe_url)
    assert sent["timestamp"] == int(cycle_start.timestamp())
    assert sent["timestamp"] >= int(cycle_start.astimezone(UTC).timestamp())


def test_concurrent_events_split_the_allowance_exactly(billed: Any) -> None:
    app, key, _env, _stripe, _tag = billed
    start = threading.Barrier(20)
    codes: list[int] = []

    def send(n: int) -> None:
        client = app.test_client()
        start.wait()
        codes.append(search(client, key, f"c{n}").status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 20
    with app.extensions["wiring"].engine.connect() as conn:
        units = conn.execute(select(func.sum(MeterOverage.units_micro))).scalar_one()
        events = conn.execute(select(func.count()).select_from(MeterOverage)).scalar_one()
    assert (units, events) == (10 * 10**6, 10)  # neither allowance given twice nor lost
    shown = allowance_of(app.test_client(), key)
    assert (shown["used"], shown["overage"]) == ("20", "10")


def test_sends_of_unknown_fate_past_stripes_window_are_checked_not_repeated(
        billed: Any) -> None:
    app, key, env, stripe_url, _tag = billed
    client = app.test_client()
    for n in range(12):
        assert search(client, key, f"u{n}").status_code == 201
    assert "reported 2 overage events of [[meters]]" in report(env)
    engine = app.extensions["wiring"].engine
    long_ago = utcnow() - timedelta(days=2)
    # both sends landed but were never marked (a crash), and Stripe de-duplicates them no
    # longer: Stripe's meter is asked, and they are marked without a second send
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).values(reported_at=None,
                                                 report_attempted_at=long_ago))
    httpx.post(f"{stripe_url}/_config/clock", json={"seconds": 86400})
    assert "reported 2 overage events of [[meters]]" in report(env)
    assert len(stripe_events(stripe_url)) == 2
    # a third whose first try was cut off before it reached Stripe: Stripe has none of it
    # beyond what is marked, so it is sent now
    assert search(client, key, "u12").status_code == 201
    with engine.begin() as conn:
        conn.execute(update(MeterOverage).where(MeterOverage.reported_at.is_(None))
                     .values(report_attempted_at=long_ago))
    assert "reported 1 overage events of [[meters]]" in report(env)
    assert len(stripe_events(stripe_url)) == 3
    assert "reported 0 overage events of [[meters]]" in report(env)


def test_an_allowance_without_overage_price_is_a_hard_stop(
        tmp_path: Path, pg_url: str, clean_db: Engine, upstream: FakeUpstream) -> None:
    from app import create_app
    from core.auth import Role

    toml = gateway_toml(upstream.base_url) + """
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"

[[plans]]
id = "free"
default = true
[plans.meters.web_search_calls]
included = 3
"""
    app = create_app(config_from_toml(toml, tmp_path, database_url=pg_url))
    try:
        key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
        client = app.test_client()
        codes = [search(client, key, f"h{n}").status_code for n in range(4)]
        assert codes == [201, 201, 201, 402]
        refused = search(client, key, "h9").get_json()
        assert refused["limit"]["id"] == "allowance-web_search_calls", refused
        shown = allowance_of(client, key)
        assert (shown["used"], shown["overage"], shown["overage_price"]) == ("3", "0", None)
        with app.extensions["wiring"].engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(MeterOverage)).scalar() == 0
    finally:
        app.extensions["wiring"].engine.dispose()


def test_the_allowance_splits_on_the_embedded_sqlite_database_too(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    from app import create_app
    from core.auth import Role

    toml = gateway_toml(upstream.base_url) + plans_toml("lite", "http://127.0.0.1:9")
    config = config_from_toml(toml, tmp_path, database_url=f"sqlite:///{tmp_path / 'm.db'}")
    app = create_app(config)
    wiring = app.extensions["wiring"]
    try:
        key = wiring.keys.create_key(Role.APP, "acme").key
        client = app.test_client()
        assert client.put("/v1/users/alice/plan", json={"plan": "metered-lite"},
                          headers=bearer(key)).status_code == 200
        codes = [search(client, key, f"q{n}").status_code for n in range(21)]
        assert codes == [201] * 20 + [402]
        shown = allowance_of(client, key)
        assert (shown["used"], shown["overage"], shown["overage_amount"]) == ("20", "10", "20")
    finally:
        wiring.engine.dispose()


def test_report_overage_takes_the_overage_jobs_lock(billed: Any) -> None:
    """A cron's `billing report-overage` never runs beside a worker's `overage` job: while
    the job's lock is held, it says so, sends nothing and exits with status 1."""
    from core.worker import lock_factory

    app, key, env, stripe_url, _tag = billed
    client = app.test_client()
    for n in range(12):
        assert search(client, key, f"u{n}").status_code == 201
    wiring = app.extensions["wiring"]
    held = lock_factory(wiring.engine, wiring.config.data_dir)("overage")  # a worker's run
    assert held.acquire()
    try:
        refused = cli(env, "billing", "report-overage")
        assert refused.exit_code == 1
        assert "the overage job is running" in refused.output
        assert stripe_events(stripe_url) == []
    finally:
        held.release()
    assert "reported 2 overage events of [[meters]]" in report(env)
    assert len(stripe_events(stripe_url)) == 2
