"""Limits end to end: a real `meterlane serve` (2 gunicorn workers) driven from several
processes through the openai SDK; workers killed mid-call; Redis restarted mid-run."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, served_engine, start_server, stop
from tests.support.burst import one_call, run_bursts
from tests.support.services import create_database, start_redis
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
QUOTA = 10_000
# The kill test waits for a lease to expire: its server's leases are short. The burst runs
# on a server with long ones: 500 calls of one user queue on the SQL store's lock for
# seconds, and a lease that expires while its call waits has its reservation returned early
# (leases are not renewed; the default lease_seconds is 600).
LEASE_SECONDS = 5
BURST_LEASE_SECONDS = 120
PLANS = f"""
[[plans]]
id = "burst"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = {QUOTA}
[[plans.limits]]
metric = "tokens"
window = "month"
amount = {QUOTA * 5}
[[plans.limits]]
metric = "tokens"
window = "rolling:5h"
amount = {QUOTA * 4}
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 100000
"""


@dataclass
class Served:
    base: str
    key: str
    engine: Engine
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    tmp: Path

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=10)
        conn.request("GET", path, headers={"Authorization": f"Bearer {self.key}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return orjson.loads(resp.read())

    def used(self, user: str, limit: str = "tokens-day") -> int:
        lines = self.get(f"/v1/users/{user}/quota")["limits"]
        return int(next(line["used"] for line in lines if line["id"] == limit))

    def ledger_tokens(self, user: str) -> int:
        with self.engine.connect() as conn:
            total = conn.execute(select(func.coalesce(func.sum(
                UsageEvent.input_tokens + UsageEvent.output_tokens), 0)).where(
                UsageEvent.end_user_id == _user_id(conn, user))).scalar_one()
        return int(total)

    def ledger_rows(self, user: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(UsageEvent).where(
                UsageEvent.end_user_id == _user_id(conn, user))).scalar_one())


def _user_id(conn: Any, user: str) -> int:
    from core.models import EndUser

    return int(conn.execute(select(EndUser.id).where(EndUser.external_id == user)).scalar_one())


def _serve(request: pytest.FixtureRequest, pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory, lease_seconds: int) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}-{lease_seconds}")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server,
                          f"mlane_e2e_limits_{request.param}_{lease_seconds}_{worker}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + PLANS
                                        + f"\n[limits]\nlease_seconds = {lease_seconds}\n")
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    stop_redis = None
    if request.param == "redis":
        # A Redis of this module's own, so the test can restart it.
        redis_url, stop_redis = start_redis(tmp)
        env.update(MLANE_REDIS_URL=redis_url, MLANE_REDIS_PREFIX=f"e2e-{uuid.uuid4().hex[:6]}:")
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "limits")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    engine = served_engine(env)
    served = Served(base, created.stdout.strip().splitlines()[-1], engine, proc, env, tmp)
    try:
        yield served
    finally:
        stop(served.proc)
        engine.dispose()
        if stop_redis:
            stop_redis()


@pytest.fixture(scope="module", params=["redis", "sql"])
def served(request: pytest.FixtureRequest, pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(request, pg_server, upstream, tmp_path_factory, BURST_LEASE_SECONDS)


@pytest.fixture(scope="module", params=["redis", "sql"])
def served_short(request: pytest.FixtureRequest, pg_server: str, upstream: FakeUpstream,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server whose leases expire after LEASE_SECONDS."""
    yield from _serve(request, pg_server, upstream, tmp_path_factory, LEASE_SECONDS)


def test_500_parallel_calls_from_4_processes_never_overspend(served: Served) -> None:
    started = datetime.now(UTC)
    results = run_bursts(served.base, served.key, "heavy", processes=4, per_process=125,
                         max_tokens=60)
    if datetime.now(UTC).month != started.month or datetime.now(UTC).date() != started.date():
        pytest.skip("the burst straddled a UTC day boundary: a new day's quota began mid-run")
    statuses = [status for status, _ in results]
    assert len(results) == 500 and set(statuses) <= {200, 402}, set(statuses)
    assert statuses.count(402) > 0  # the quota ran out during the burst
    reported = sum(tokens for _, tokens in results)
    recorded = served.ledger_tokens("heavy")
    assert recorded == reported  # every call the clients saw is in the ledger
    assert recorded <= QUOTA  # zero overspend with clip
    assert recorded > QUOTA - 100  # and the quota was used, not wasted by leaked leases
    for limit in ("tokens-day", "tokens-month", "tokens-rolling-5h"):
        # Counters equal the ledger's sums once the last leases are settled: the server
        # settles each just after its response has gone out.
        assert settled_to(served, "heavy", limit, recorded) == recorded
    assert served.ledger_rows("heavy") == 500  # refusals are recorded too


def settled_to(served: Served, user: str, limit: str, expected: int) -> int:
    """The counter, read until it shows `expected` (or 10 s pass)."""
    deadline = time.monotonic() + 10
    used = served.used(user, limit)
    while used != expected and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for the settles that follow the last responses
        used = served.used(user, limit)
    return used


def _workers(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True,
                         check=False)
    return [int(pid) for pid in out.stdout.split()]


def test_a_killed_worker_leaks_no_quota(served_short: Served) -> None:
    served = served_short
    """kill -9 every worker while calls hold leases; after the lease time the quota is whole."""
    body = {"model": "gpt-4o-mini", "user": "victim", "max_tokens": 500, "stream": True,
            "messages": [{"role": "user", "content": "hi"}], "fake": {"chunk_delay_ms": 200}}

    def held_call() -> None:
        conn = http.client.HTTPConnection(served.base.split("//")[1], timeout=30)
        conn.request("POST", "/v1/chat/completions", body=orjson.dumps(body),
                     headers={"Authorization": f"Bearer {served.key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        try:
            resp.read(64)  # the stream has started: its lease is held
        finally:
            pass

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: held_call(), range(4)))
    held = served.used("victim")
    assert held >= 4 * 500  # four reservations of ~500 tokens each are held
    for pid in _workers(served.proc.pid):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEASE_SECONDS + 30
    used = held
    while time.monotonic() < deadline:
        try:
            used = served.used("victim")
        except (OSError, http.client.HTTPException):
            used = held  # the master is still replacing its workers
        # (the new workers record the four killed calls from their journals first)
        if served.ledger_rows("victim") == 4 and used == served.ledger_tokens("victim"):
            break
        time.sleep(0.2)  # polling for the lease time to pass, not synchronising
    assert used == served.ledger_tokens("victim")  # no reservation outlived its lease
    status, _ = one_call(served.base, served.key, "victim", 0, 10)
    assert status == 200


@pytest.mark.parametrize("served", ["redis"], indirect=True)
def test_redis_restarted_mid_run_loses_no_ledger_row(served: Served) -> None:
    port = int(served.env["MLANE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    results: list[int] = []

    def calls(n: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            results.extend(s for s, _ in pool.map(
                lambda i: one_call(served.base, served.key, "steady", i, 5), range(n)))

    calls(40)
    kill = subprocess.run(["pkill", "-f", f"redis-server 127.0.0.1:{port}"], check=False)
    assert kill.returncode == 0
    calls(40)  # Redis is down: the plan fails closed (503), and each refusal is recorded
    _url, stop_again = start_redis(served.tmp, port=port)
    try:
        calls(40)
        assert set(results) <= {200, 503} and results.count(503) > 0
        assert results[-1] == 200
        assert served.ledger_rows("steady") == 120  # every call is in the ledger
    finally:
        stop_again()
