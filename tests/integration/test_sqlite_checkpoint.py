"""The embedded SQLite database checkpoints its WAL in a background thread, never inside a
request's commit."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from core.db import make_engine


def test_commits_never_checkpoint_and_a_background_thread_does(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    wal = tmp_path / "m.db-wal"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar_one() == 0
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    # With no checkpoint every commit appends to the WAL; once the background thread has
    # checkpointed it, the next commit starts the WAL over and the file stops growing.
    reused = False
    deadline = time.monotonic() + 10
    while not reused and time.monotonic() < deadline:
        before = wal.stat().st_size
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": "y" * 8000})
        reused = wal.stat().st_size == before
        time.sleep(0.02)  # pacing the writes while the once-a-second checkpoint comes round
    engine.dispose()
    assert reused
