"""A worker killed (kill -9) while its calls run at the upstream: the worker gunicorn starts in
its place records each of them as `worker_lost`, with an estimate, so that every call the
upstream saw has a ledger row (on main, those calls and their inference cost were missing)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from core.db import make_engine
from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import MESSAGES, cli, start_server, stop, wait_ready
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
CALLS = 12


def _workers(master: int) -> list[int]:
    """The gunicorn workers: the master's children."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                found.append(int(entry.name))
    return found


def test_calls_of_a_killed_worker_are_recorded_as_worker_lost(
        pg_server: str, tmp_path: Path) -> None:
    with FakeUpstream() as upstream:
        url = create_database(pg_server,
                              f"mlane_lost_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
        (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
               "MLANE_DATA_DIR": str(tmp_path / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
        assert cli(env, "db", "upgrade").returncode == 0
        key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
        proc, base = start_server(env, tmp_path)
        errors: list[BaseException] = []

        def call(n: int) -> None:
            client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0,
                                   timeout=30)
            try:  # a slow stream: the worker dies while it runs
                for _ in client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, user=f"u{n}", stream=True,
                        max_tokens=50, extra_body={"fake": {"chunk_delay_ms": 400}}):
                    pass
            except BaseException as exc:  # noqa: BLE001 - the kill cuts them: expected
                errors.append(exc)

        try:
            threads = [threading.Thread(target=call, args=(n,)) for n in range(CALLS)]
            for t in threads:
                t.start()
            upstream.wait_for_requests(CALLS, timeout=30)  # every call is at the upstream
            for pid in _workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
            for t in threads:
                t.join(timeout=60)
            assert errors, "the kill cut no call"
            wait_ready(proc, base)  # gunicorn has started new workers: they recover
            seen = {r["headers"]["x-meterlane-request-id"] for r in upstream.requests}
            engine = make_engine(url)
            deadline_rows: dict[str, str] = {}
            for _ in range(100):  # the new workers replay at start; wait for them to finish
                with engine.connect() as conn:
                    deadline_rows = dict(conn.execute(select(
                        UsageEvent.request_id, UsageEvent.status)).all())
                if seen <= set(deadline_rows):
                    break
                proc.poll()
                threading.Event().wait(0.1)  # polling the database for the recovery
            engine.dispose()
        finally:
            stop(proc)
    assert seen <= set(deadline_rows), "a call the upstream saw has no row"
    lost = [rid for rid in seen if deadline_rows[rid] == "worker_lost"]
    assert len(lost) == len(errors) > 0
