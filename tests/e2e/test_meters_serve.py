"""Custom meters through a real `meterlane serve` (two gevent workers): 50 events at once
against a meter limit of 10 are refused past it exactly, on the SQL and the Redis store."""

from __future__ import annotations

import http.client
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from core.db import make_engine
from metering.models import MeterEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.integration.test_meters import METERS
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sql", "redis"])
def served(request: pytest.FixtureRequest, pg_server: str, upstream: FakeUpstream,
           tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_meters_{request.param}_{worker}")
    (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + METERS)
    env = {**os.environ, "MLANE_DATABASE_URL": url,
           "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp_path / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    if request.param == "redis":
        env.update(MLANE_REDIS_URL=request.getfixturevalue("redis_server"),
                   MLANE_REDIS_PREFIX=f"mtr-{uuid.uuid4().hex[:6]}:")
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "e2e")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp_path)
    try:
        yield base, created.stdout.split()[-1], url
    finally:
        stop(proc)


def post(base: str, key: str, body: dict[str, Any]) -> int:
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)
    conn.request("POST", "/v1/meter/events", body=orjson.dumps(body),
                 headers={"Authorization": f"Bearer {key}",
                          "Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def test_fifty_events_at_once_pass_a_limit_of_ten_exactly(served: tuple[str, str, str]
                                                         ) -> None:
    base, key, url = served
    events = [{"user": "zoe", "meter": "web_search_calls", "idempotency_key": f"e{n}"}
              for n in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(lambda body: post(base, key, body), events))
    assert sorted(codes) == [201] * 10 + [402] * 40
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(MeterEvent)) == 10
    finally:
        engine.dispose()
