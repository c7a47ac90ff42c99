"""Served, a call is answered before its row's commit; such rows share commits: the writer
waits up to linger_s for the next answered rows (a commit's cost is mostly per commit). A
row someone waits for (the metering API, the CLI, tests) never waits for company."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from metering.ledger import LedgerWriter
from tests.integration.test_ledger import app_and_user, keys_in_ledger, record

pytestmark = pytest.mark.integration
LONG = 30.0  # far longer than any test may take: a commit that waited it out fails the test


def commits(engine: Engine) -> list[int]:
    """The usage rows each transaction wrote (grouped by Postgres's xmin), in order."""
    with engine.connect() as conn:
        return [n for _, n in conn.execute(text(
            "SELECT xmin::text::bigint AS tx, count(*) FROM usage_events GROUP BY tx "
            "ORDER BY tx"))]


def taken_by_writer(writer: LedgerWriter) -> None:
    """Until the writer has taken what was queued (polled: the queue has no event for it)."""
    deadline = time.monotonic() + LONG / 2
    while writer._queue.qsize() or not writer._running:
        assert time.monotonic() < deadline, "the writer never took the row"
        time.sleep(0.001)


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_answered_rows_share_one_commit(clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path, batch_max=2)
    writer.linger_s = LONG  # the batch is full at two rows: it goes then, not after LONG
    first, got_first = in_thread(lambda: writer.record_row(
        record(app_id, user_id, "a").row(), answered=True))
    taken_by_writer(writer)
    first.join(0.5)  # lingering (LONG) for a second row; without it, committed in ms
    assert got_first == [], "the first row was committed alone"
    second, got_second = in_thread(lambda: writer.record_row(
        record(app_id, user_id, "b").row(), answered=True))
    first.join(LONG / 2)
    second.join(LONG / 2)
    assert got_first == ["written"] and got_second == ["written"]
    assert commits(clean_db) == [2]
    assert sorted(k for k, _, _ in keys_in_ledger(clean_db)) == ["a", "b"]


def test_a_row_someone_waits_for_goes_at_once(clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path)
    writer.linger_s = LONG
    answered, got = in_thread(lambda: writer.record_row(
        record(app_id, user_id, "answered").row(), answered=True))
    # Waited for (answered=False): committed now, and the answered row with it or before.
    assert writer.record(record(app_id, user_id, "waited")) == "written"
    answered.join(LONG / 2)
    assert got == ["written"]
    assert sorted(k for k, _, _ in keys_in_ledger(clean_db)) == ["answered", "waited"]


def test_a_writer_that_does_not_linger_commits_each_row_alone(clean_db: Engine,
                                                              tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path)  # linger_s 0: outside serve
    for key in ("x", "y"):
        assert writer.record_row(record(app_id, user_id, key).row(), answered=True) \
            == "written"
    assert commits(clean_db) == [1, 1]
