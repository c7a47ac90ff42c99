"""The ledger never loses a record: a database outage spools to disk, replay drains it once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine, make_url

from core.db import make_engine, utcnow
from core.tenancy import TenancyService
from metering.ledger import LedgerWriter
from metering.models import UsageEvent
from metering.records import CallRecord

pytestmark = pytest.mark.integration


def record(app_id: int, user_id: int, key: str) -> CallRecord:
    return CallRecord(
        app_id=app_id, end_user_id=user_id, request_id=f"req_{key}", idempotency_key=key,
        endpoint="chat.completions", requested_model="m", upstream="u", upstream_model="m",
        stream=False, input_tokens=11, cached_input_tokens=2, output_tokens=7,
        reasoning_tokens=0, usage_source="reported", cost_pico_usd=123_456, priced=True,
        status="ok", http_status=200, error=None, latency_ms=5, ttft_ms=None,
        created_at=utcnow())


def app_and_user(engine: Engine) -> tuple[int, int]:
    tenancy = TenancyService(engine)
    app_id, _ = tenancy.ensure_app("acme")
    return app_id, tenancy.ensure_end_user(app_id, "alice")


def keys_in_ledger(engine: Engine) -> list[tuple[str, int, Any]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(
            UsageEvent.idempotency_key, UsageEvent.cost_pico_usd, UsageEvent.created_at))]


def test_outage_spools_and_replay_writes_each_record_once(clean_db: Engine,
                                                          tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    down = make_engine(clean_db.url.set(port=9).render_as_string(hide_password=False))
    spool = tmp_path / "spool"
    outage = LedgerWriter(down, spool)
    first, second = record(app_id, user_id, "k1"), record(app_id, user_id, "k2")
    assert outage.record(first) == "spooled"
    assert outage.record(second) == "spooled"
    assert keys_in_ledger(clean_db) == []
    assert list(spool.glob("usage-*.jsonl"))

    healthy = LedgerWriter(clean_db, spool)
    assert healthy.record(first) == "written"  # one of them made it in another way
    assert healthy.replay() == 1  # the duplicate is skipped, the other one is written
    rows = sorted(keys_in_ledger(clean_db))
    assert [(k, c) for k, c, _ in rows] == [("k1", 123_456), ("k2", 123_456)]
    assert rows[1][2] == second.created_at
    assert list(spool.iterdir()) == []
    assert healthy.replay() == 0


def test_duplicate_idempotency_key_is_reported_not_raised(clean_db: Engine,
                                                          tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path)
    assert writer.record(record(app_id, user_id, "same")) == "written"
    assert writer.record(record(app_id, user_id, "same")) == "duplicate"
    assert len(keys_in_ledger(clean_db)) == 1


def test_two_calls_racing_on_one_client_key_are_both_kept(clean_db: Engine,
                                                          tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path)
    first = record(app_id, user_id, "client-key")
    second = replace(first, request_id="req_other")
    assert writer.record(first) == "written"
    assert writer.record(second) == "written"
    assert writer.record(second) == "duplicate"
    keys = sorted(k for k, _, _ in keys_in_ledger(clean_db))
    assert keys == ["client-key", "client-key#req_other"]


def test_readyz_checks_redis_when_configured(app_config: Any, redis_server: str) -> None:
    from app import create_app

    ok = create_app(replace(app_config, redis_url=redis_server)).test_client().get("/readyz")
    assert ok.status_code == 200 and ok.get_json()["checks"]["redis"] == "ok"
    down = create_app(replace(app_config, redis_url="redis://127.0.0.1:9/0"))
    resp = down.test_client().get("/readyz")
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["checks"]["redis"].startswith("error")


def test_database_gone_is_503_in_both_envelopes(pg_server: str, upstream: Any,
                                                tmp_path: Path) -> None:
    from app import create_app
    from core.auth import Role
    from migrations.schema import upgrade
    from tests.conftest import config_from_toml, gateway_toml
    from tests.support.services import create_database, libpq_url

    name = f"mlane_gone_{tmp_path.name[-12:].replace('-', '_')}"
    url = create_database(pg_server, name)
    name = make_url(url).database or name  # with $MLANE_TEST_DB_PREFIX before it
    upgrade(make_engine(url))
    app = create_app(config_from_toml(gateway_toml(upstream.base_url), tmp_path,
                                      database_url=url))
    key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    with psycopg.connect(libpq_url(pg_server), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # type: ignore[arg-type]
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    resp = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "user": "u"},
                       headers=headers)
    assert resp.status_code == 503, resp.data
    assert resp.get_json()["error"]["type"] == "service_unavailable"
    usage = client.get("/v1/usage", headers=headers)
    assert usage.status_code == 503 and usage.mimetype == "application/problem+json"
    app.extensions["wiring"].engine.dispose()


def test_sqlite_rows_read_back_as_utc_and_fall_in_usage_ranges(tmp_path: Path) -> None:
    from datetime import timedelta

    from metering.store import UsageQuery, UsageStore
    from migrations.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(engine)
    app_id, user_id = app_and_user(engine)
    rec = record(app_id, user_id, "k1")
    assert LedgerWriter(engine, tmp_path).record(rec) == "written"
    [(key, cost, created_at)] = keys_in_ledger(engine)
    assert (key, cost, created_at) == ("k1", 123_456, rec.created_at)
    store = UsageStore(engine)
    inside = UsageQuery(app_id, None, rec.created_at - timedelta(seconds=1),
                        rec.created_at + timedelta(seconds=1), group_by="day")
    totals, [day] = store.totals(inside)
    assert totals.requests == 1 and day.key == rec.created_at.strftime("%Y-%m-%d")
    after = UsageQuery(app_id, None, rec.created_at + timedelta(microseconds=1),
                       rec.created_at + timedelta(seconds=1))
    assert store.totals(after)[0].requests == 0
    engine.dispose()


def test_a_record_spooled_by_an_older_version_is_replayed(clean_db: Engine,
                                                          tmp_path: Path) -> None:
    """A spool written before the router's columns existed still replays after an upgrade."""
    import orjson

    app_id, user_id = app_and_user(clean_db)
    spool = tmp_path / "spool"
    spool.mkdir()
    old = {k: v for k, v in record(app_id, user_id, "old").row().items()
           if k not in ("route_alias", "route_reason", "baseline_cost_pico_usd")}
    old["created_at"] = old["created_at"].isoformat()
    (spool / "usage-1.jsonl").write_bytes(orjson.dumps(old) + b"\n")
    assert LedgerWriter(clean_db, spool).replay() == 1
    assert [k for k, _, _ in keys_in_ledger(clean_db)] == ["old"]


def test_a_reported_call_spooled_then_retried_is_recorded_once(clean_db: Engine,
                                                               tmp_path: Path) -> None:
    """A call the app reported itself is the same call by its key alone: spooled during an
    outage, then reported again (another request id) before the spool was replayed, it is
    in the ledger once (a proxied call racing on a key keeps both: the test above)."""
    app_id, user_id = app_and_user(clean_db)
    down = make_engine(clean_db.url.set(port=9).render_as_string(hide_password=False))
    spool = tmp_path / "spool"
    reported = replace(record(app_id, user_id, "job-9"), endpoint="meter.track")
    assert LedgerWriter(down, spool).record(reported, dedupe=True) == "spooled"
    healthy = LedgerWriter(clean_db, spool)
    assert healthy.record(replace(reported, request_id="req_retry"), dedupe=True) == "written"
    assert healthy.replay() == 0
    assert [k for k, _, _ in keys_in_ledger(clean_db)] == ["job-9"]
    # many at once: each answered, in order, after the last is settled
    batch = [record(app_id, user_id, f"b{i}") for i in range(5)]
    assert healthy.record_many([batch[0], *batch, record(app_id, user_id, "b9")],
                               dedupe=True) == ["written", "duplicate", "written", "written",
                                                "written", "written", "written"]


def _served_app(pg_server: str, upstream: Any, tmp_path: Path, **overrides: Any
                ) -> tuple[Any, str, str]:
    """An app on its own database (keys cached for a minute, as a server keeps them), its key
    and the database's name."""
    from app import create_app
    from core.auth import Role
    from migrations.schema import upgrade
    from tests.conftest import config_from_toml, gateway_toml
    from tests.support.services import create_database

    name = f"mlane_away_{tmp_path.name[-12:].replace('-', '_')}"
    url = create_database(pg_server, name)
    name = make_url(url).database or name  # with $MLANE_TEST_DB_PREFIX before it
    upgrade(make_engine(url))
    app = create_app(config_from_toml(gateway_toml(upstream.base_url), tmp_path,
                                      database_url=url, key_cache_seconds=60, **overrides))
    key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    return app, key, name


def _ledger_by_user(app: Any) -> dict[str, list[Any]]:
    from core.models import EndUser

    with app.extensions["wiring"].engine.connect() as conn:
        rows = conn.execute(select(EndUser.external_id, UsageEvent.status,
                                   UsageEvent.http_status, UsageEvent.endpoint,
                                   UsageEvent.input_tokens + UsageEvent.output_tokens)
                            .join(EndUser, EndUser.id == UsageEvent.end_user_id)).all()
    found: dict[str, list[Any]] = {}
    for user, *rest in rows:
        found.setdefault(user, []).append(tuple(rest))
    return found


def test_calls_during_an_outage_each_get_their_row_once_it_is_back(
        pg_server: str, upstream: Any, tmp_path: Path) -> None:
    """One row per call, refused or not: with connections to the database refused, a call
    for a user this process knows is served (its row spooled); one for a user it has never
    seen is refused 503, in each API's envelope, and its row is spooled with the user's name.
    The replay, once the database is back, writes every one of them (and creates the user)."""
    from psycopg import sql

    from tests.support.services import libpq_url

    app, key, name = _served_app(pg_server, upstream, tmp_path)
    seen = len(upstream.requests)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json={**chat, "user": "known"},
                       headers=headers).status_code == 200
    ident = sql.Identifier(name)
    with psycopg.connect(libpq_url(pg_server), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s", (name,))
        served = client.post("/v1/chat/completions", json={**chat, "user": "known"},
                             headers=headers)
        refused = client.post("/v1/chat/completions", json={**chat, "user": "newbie"},
                              headers=headers)
        refused_messages = client.post(
            "/v1/messages", headers={**headers, "X-Meterlane-User": "newbie-2"},
            json={"model": "gpt-4o-mini", "max_tokens": 5,
                  "messages": [{"role": "user", "content": "hi"}]})
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
    assert served.status_code == 200, served.data
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.get_json()["error"]["type"] == "service_unavailable"
    assert refused_messages.status_code == 503
    assert refused_messages.get_json()["type"] == "error"  # Anthropic's envelope
    assert len(upstream.requests) == seen + 2  # the refused calls never reached it
    before = _ledger_by_user(app)
    assert list(before) == ["known"] and len(before["known"]) == 1

    assert app.extensions["wiring"].ledger.replay() == 3
    after = _ledger_by_user(app)
    assert after["known"][1][:3] == ("ok", 200, "chat.completions")
    assert after["newbie"] == [("database_unavailable", 503, "chat.completions", 0)]
    assert after["newbie-2"] == [("database_unavailable", 503, "messages", 0)]
    assert app.extensions["wiring"].ledger.replay() == 0
    app.extensions["wiring"].engine.dispose()


def test_a_pool_with_no_free_connection_is_a_503_with_the_calls_row(
        pg_server: str, upstream: Any, tmp_path: Path) -> None:
    """Every connection of the pool busy past its timeout: a 503 with Retry-After in both
    envelopes (it was a 500), and the refused call's row is written once one is free."""
    app, key, _name = _served_app(pg_server, upstream, tmp_path, db_pool_size=1,
                                  db_max_overflow=0, db_pool_timeout=0.2)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    engine, seen = app.extensions["wiring"].engine, len(upstream.requests)
    assert client.get("/v1/usage", headers=headers).status_code == 200  # key cached
    with engine.connect():  # the pool's one connection, held
        refused = client.post("/v1/chat/completions", headers=headers, json={
            "model": "gpt-4o-mini", "user": "newbie",
            "messages": [{"role": "user", "content": "hi"}]})
        usage = client.get("/v1/usage", headers=headers)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.get_json()["error"]["code"] == "service_unavailable"
    assert usage.status_code == 503 and usage.mimetype == "application/problem+json"
    assert len(upstream.requests) == seen
    assert app.extensions["wiring"].ledger.replay() == 1
    assert _ledger_by_user(app) == {
        "newbie": [("database_unavailable", 503, "chat.completions", 0)]}
    engine.dispose()
