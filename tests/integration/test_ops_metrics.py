"""/metrics' operations gauges through the app (real Postgres, the fake upstream): the spool's
records, the ledger writer's queue, and the key a scrape needs when one is set."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.config import Config
from tests.conftest import Keys, bearer

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
