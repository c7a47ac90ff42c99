"""Served, a call is answered before its ledger row is committed (metering/unwritten.py): the
row is in the worker's journal first. Held here by a lock on the ledger table, the commit
cannot happen; the client still gets its answer, a read waits for the commit, and a worker
killed before it leaves the very row it answered, written once by the worker that follows."""

from __future__ import annotations

import http.client
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import select

from core.db import make_engine
from metering.intents import IntentJournal
from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import MESSAGES, cli, start_server, stop, wait_ready
from tests.e2e.test_worker_lost import _workers
from tests.support.services import create_database, libpq_url
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(pg_server: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with FakeUpstream() as upstream:
        url = create_database(pg_server,
                              f"mlane_first_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
        (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
               "MLANE_DATA_DIR": str(tmp_path / "var")}
        assert cli(env, "db", "upgrade").returncode == 0
        key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
        proc, base = start_server(env, tmp_path)
        try:
            yield {"url": url, "key": key, "proc": proc, "base": base,
                   "log": tmp_path / f"serve-{base.rsplit(':', 1)[1]}.log",
                   "spool": tmp_path / "var" / "spool"}
        finally:
            stop(proc)


def _request(base: str, key: str, method: str, path: str,
             body: dict[str, Any] | None = None) -> tuple[int, str, dict[str, Any]]:
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)  # either worker
    conn.request(method, path, body=orjson.dumps(body) if body is not None else None,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    status, rid, doc = resp.status, resp.getheader("x-request-id", ""), orjson.loads(resp.read())
    conn.close()
    return status, rid, doc


def _call(served: dict[str, Any], user: str) -> tuple[str, dict[str, Any]]:
    """The call's request id (its ledger row's) and its answer."""
    status, rid, doc = _request(served["base"], served["key"], "POST", "/v1/chat/completions",
                                {"model": "gpt-4o-mini", "messages": MESSAGES, "user": user})
    assert status == 200, doc
    return rid, doc


def _requests_of(served: dict[str, Any], user: str) -> int:
    status, _, doc = _request(served["base"], served["key"], "GET", f"/v1/usage?user={user}")
    assert status == 200, doc
    return int(doc["totals"]["requests"])


def _rows(url: str, request_ids: set[str]) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(
                UsageEvent.request_id, UsageEvent.status, UsageEvent.usage_source,
                UsageEvent.input_tokens, UsageEvent.output_tokens).where(
                UsageEvent.request_id.in_(request_ids))).all())
    finally:
        engine.dispose()


class _Held:
    """The ledger table locked against inserts (reads still pass): no row can be committed."""

    def __init__(self, url: str) -> None:
        self.url = libpq_url(url)
        self.conn = psycopg.connect(self.url)
        self.conn.execute("LOCK TABLE usage_events IN EXCLUSIVE MODE")

    def waiting_backends(self) -> list[int]:
        """The inserts (or the writer's COPY) waiting for the lock, once there are any (the
        writer sends its rows just after the answer: polled for at most 10 s)."""
        with psycopg.connect(self.url, autocommit=True) as other:
            for _ in range(100):
                found = [pid for (pid,) in other.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND (query LIKE 'INSERT INTO usage_events%%' "
                    "OR query LIKE 'COPY usage_events%%')").fetchall()]
                if found:
                    return found
                threading.Event().wait(0.1)
        return []

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def test_the_answer_does_not_wait_for_the_commit_and_a_read_waits_for_it(
        served: dict[str, Any]) -> None:
    _call(served, "reader")  # the end user exists, the workers are warm
    assert _requests_of(served, "reader") == 1
    held = _Held(served["url"])
    try:
        _, answer = _call(served, "reader")  # answered while its row cannot be committed
        assert answer["usage"]["total_tokens"] > 0
        assert held.waiting_backends(), "the row's insert should be waiting for the lock"
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(_requests_of(served, "reader")))
        reader.start()
        reader.join(timeout=0.5)
        # not answered while the call it follows is uncommitted (without the wait it would
        # have answered 0 at once)
        assert reader.is_alive() and not seen, seen
    finally:
        held.release()
    reader.join(timeout=30)
    assert seen == [2]


def test_a_worker_killed_before_the_commit_leaves_the_row_it_answered(
        served: dict[str, Any]) -> None:
    _call(served, "victim")
    held = _Held(served["url"])
    try:
        answers = [_call(served, "victim") for _ in range(3)]
        blocked = held.waiting_backends()
        assert blocked, "the rows' inserts should be waiting for the lock"
        for pid in _workers(served["proc"].pid):
            os.kill(pid, signal.SIGKILL)
        # the dead workers' inserts must not land: their rows can only come from the journals
        with psycopg.connect(libpq_url(served["url"]), autocommit=True) as admin:
            for pid in blocked:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        held.release()
    wait_ready(served["proc"], served["base"])  # gunicorn's new workers replay the journals
    ids = {rid for rid, _ in answers}
    rows: list[Any] = []
    for _ in range(300):  # polling the database for the replacement workers' recovery
        rows = _rows(served["url"], ids)
        if len(rows) >= len(ids):
            break
        threading.Event().wait(0.1)
    by_request = {r.request_id: r for r in rows}
    assert len(rows) == len(by_request) == 3, rows  # each once
    for rid, answer in answers:
        row = by_request[rid]
        # the row as answered: the upstream's usage, not a worker_lost estimate
        assert (row.status, row.usage_source) == ("ok", "reported")
        assert row.input_tokens == answer["usage"]["prompt_tokens"]
        assert row.output_tokens == answer["usage"]["completion_tokens"]
    assert _requests_of(served, "victim") == 4


def test_a_worker_that_stops_commits_what_it_answered_first(served: dict[str, Any]) -> None:
    _call(served, "leaver")
    held = _Held(served["url"])
    try:
        _call(served, "leaver")
        assert held.waiting_backends(), "the row's insert should be waiting for the lock"
        served["proc"].send_signal(signal.SIGTERM)  # gunicorn's graceful stop: no call runs
        master = served["proc"].pid
        for _ in range(300):  # polling the log for the workers to begin their exit
            if "Worker exiting" in served["log"].read_text():
                break
            threading.Event().wait(0.1)
        for _ in range(20):  # a worker that did not wait for its commit is gone by now
            if not _workers(master):
                break
            threading.Event().wait(0.1)
    finally:
        held.release()  # the stopping worker can commit now
    served["proc"].wait(timeout=60)
    # Nothing was left for a next start to recover: the worker committed before it exited.
    left = [intents for _, intents in IntentJournal(served["spool"]).orphans()]
    assert left and not any(left), left
