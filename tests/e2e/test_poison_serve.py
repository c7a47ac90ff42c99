"""A real `meterlane serve` meets records it cannot write: one spooled before it starts (it
starts and serves, the record in quarantine), and one its writer meets while serving (the
worker keeps serving metered calls, as fast as before)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select, text

from core.db import make_engine, utcnow
from core.tenancy import TenancyService
from metering.models import QuarantinedRecord, UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import MESSAGES, cli, start_server, stop
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


def test_serve_starts_over_a_poisoned_spool_and_keeps_serving_past_a_refused_record(
        pg_server: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    import openai

    url = create_database(pg_server, f"mlane_poison_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
    env = {**os.environ, "MLANE_DATABASE_URL": url,
           "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp_path / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
    engine = make_engine(url)
    tenancy = TenancyService(engine)
    app_id = tenancy.get_app("acme")
    user_id = tenancy.ensure_end_user(app_id, "alice")
    # a record an earlier process spooled, with a NUL no Postgres text column takes
    spool = tmp_path / "var" / "spool"
    spool.mkdir(parents=True)
    (spool / "usage-4242.jsonl").write_bytes(orjson.dumps({
        "app_id": app_id, "end_user_id": user_id, "request_id": "req_old",
        "idempotency_key": "poi\x00son", "endpoint": "chat.completions",
        "requested_model": "gpt-4o-mini", "upstream": "cloud", "upstream_model": "gpt-4o-mini",
        "stream": False, "input_tokens": 5, "cached_input_tokens": 0, "output_tokens": 5,
        "reasoning_tokens": 0, "usage_source": "reported", "cost_pico_usd": 10,
        "priced": True, "status": "ok", "http_status": 200, "error": None, "latency_ms": 1,
        "ttft_ms": None, "created_at": utcnow().isoformat()}) + b"\n")
    # the database will refuse rows of counted usage: a record the writer cannot write
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE usage_events ADD CONSTRAINT no_counted "
                          "CHECK (usage_source <> 'counted')"))
    proc, base = start_server({**env, "MLANE_DATA_DIR": str(tmp_path / "var")}, tmp_path)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

        def call(**extra: object) -> float:
            started = time.perf_counter()
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="alice",
                                           max_tokens=4, **extra)  # type: ignore[call-overload]
            return time.perf_counter() - started

        before = [call() for _ in range(15)]
        call(extra_body={"fake": {"usage": False}})  # counted: the database refuses its row
        after = [call() for _ in range(15)]
        # the same worker, still serving, about as fast (a dead writer made calls hang)
        assert statistics.median(after) < 3 * statistics.median(before) + 0.05
        import urllib.request

        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:  # noqa: S310
            ready = orjson.loads(resp.read())
        assert ready["gauges"]["ledger_quarantined"] == 2
        assert ready["checks"]["ledger_writer"] == "ok"
    finally:
        stop(proc)
    with engine.connect() as conn:
        reasons = conn.execute(select(QuarantinedRecord.source, QuarantinedRecord.reason)).all()
        written = conn.execute(select(UsageEvent.id)).all()
    assert sorted(s for s, _ in reasons) == ["replay", "writer"]
    assert len(written) == 30
    engine.dispose()
