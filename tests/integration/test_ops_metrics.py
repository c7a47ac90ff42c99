"""/metrics' operations gauges through the app (real Postgres, the fake upstream): the spool's
records, the ledger writer's queue, and the key a scrape needs when one is set."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.config import Config
from tests.conftest import Keys, bearer
from tests.integration.test_ledger import app_and_user, record

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_spool_and_the_writer_queue_are_gauges(app: Any, client: Any, keys: Keys) -> None:
    ledger = app.extensions["wiring"].ledger
    for n in range(3):  # what a database outage leaves behind, waiting for a replay
        ledger._spool({"request_id": f"req_spooled{n}"})
    resp = client.post("/v1/chat/completions", headers=bearer(keys.app), json={
        "model": "gpt-4o-mini", "user": "gauged", "messages": [{"role": "user",
                                                                "content": "hi"}]})
    assert resp.status_code == 200
    found = _samples(client.get("/metrics").get_data(as_text=True))
    assert found["meterlane_ledger_spooled[]"] == 3
    assert found["meterlane_ledger_queue_depth[]"] == 0  # the call's row is written
    assert found["meterlane_upstream_in_flight[('upstream', 'cloud')]"] == 0
    ready = client.get("/readyz").get_json()
    assert ready["gauges"]["ledger_spooled"] == 3


def test_a_metrics_key_is_asked_for_when_set(app_config: Config) -> None:
    from app import create_app

    keyed = create_app(replace(app_config, metrics_key="scrape-me"))
    try:
        client = keyed.test_client()
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert orjson.loads(refused.data)["title"] == "Missing or invalid API key"
        assert client.get("/metrics", headers=bearer("nope")).status_code == 401
        assert client.get("/metrics", headers=bearer("scrape-me")).status_code == 200
        assert client.get("/healthz").status_code == 200  # nothing else asks for it
    finally:
        keyed.extensions["wiring"].engine.dispose()


def _waiting_inserts(engine: Engine) -> int:
    """Sessions whose usage insert (or the writer's COPY) waits for a lock (the test's)."""
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND (query LIKE 'INSERT INTO usage_events%' "
            "OR query LIKE 'COPY usage_events%')")).scalar_one())


def test_the_queue_gauge_grows_while_a_write_hangs(app: Any, client: Any,
                                                    clean_db: Engine) -> None:
    """The writer stuck in a write (the table locked by the test): the records queued behind
    it are on the gauge, at a scrape and (in every worker, whoever scrapes) as they queue."""
    wiring = app.extensions["wiring"]
    ledger = wiring.ledger
    app_id, user_id = app_and_user(clean_db)
    lock = clean_db.connect()
    lock.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
    threads = [threading.Thread(target=ledger.record_row, daemon=True,
                                args=(record(app_id, user_id, f"hung{n}").row(),))
               for n in range(3)]
    try:
        threads[0].start()
        deadline = time.monotonic() + 20
        while not _waiting_inserts(clean_db):  # the writer's insert waits for the lock
            assert time.monotonic() < deadline, "the writer never reached the table"
            time.sleep(0.01)
        ledger.stalled_s = 0.0  # the write counts as hung from now on
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 20
        while ledger._queue.qsize() < 2:  # both queued behind the stuck batch
            assert time.monotonic() < deadline, "the records never reached the queue"
            time.sleep(0.001)
        # as they queued (no scrape yet): what another worker's scrape would read
        assert wiring.metrics.registry.get_sample_value("meterlane_ledger_queue_depth") == 3
        found = _samples(client.get("/metrics").get_data(as_text=True))
        assert found["meterlane_ledger_queue_depth[]"] == 3
    finally:
        lock.rollback()
        lock.close()
        for thread in threads:
            thread.join(20)
    found = _samples(client.get("/metrics").get_data(as_text=True))
    assert found["meterlane_ledger_queue_depth[]"] == 0
