"""Database kernel: declarative Base with naming conventions, engine and session factory."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, event
from sqlalchemy.engine import Connection, Engine, create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a 64-bit key.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A tz-aware UTC timestamp on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # in UTC whatever the session's time zone: a UTC day (.date()) is the same everywhere
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime()}


# The database cannot serve now: no connection, or none free in the pool in time (every one
# busy). Both are answered 503 with Retry-After, never 500.
DATABASE_DOWN: tuple[type[Exception], ...] = (OperationalError, PoolTimeoutError)


def utcnow() -> datetime:
    return datetime.now(UTC)


POOL_SIZE, POOL_OVERFLOW = 10, 20  # per process, on Postgres


def make_engine(url: str, *, pool_size: int = POOL_SIZE, max_overflow: int = POOL_OVERFLOW,
                pool_timeout: float = 30.0) -> Engine:
    """An engine with the settings each backend needs for concurrent use."""
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=20, max_overflow=20)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path. A connection that died
    # fails once, is invalidated by the pool, and the caller's error path handles it.
    return create_engine(url, pool_size=pool_size, max_overflow=max_overflow,
                         pool_timeout=pool_timeout, pool_recycle=1800)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the right to write from its first statement, for a read
    that decides a write (read, check, write). On Postgres, engine.begin(): the reads lock
    the rows they decide on (SELECT ... FOR UPDATE). On SQLite, BEGIN IMMEDIATE: the driver
    would otherwise read outside any transaction until the first write, so another writer
    could commit between the check and the write; with it, writers wait (busy_timeout)."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def pool_budget(engine: Engine, processes: int) -> tuple[int, int, int] | None:
    """(max_connections, pool size, overflow) that let `processes` workers share a Postgres
    server, leaving a tenth of its connections (at least 5) to everything else; None on
    SQLite. The default pool is kept when it fits."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        limit = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
    share = max(1, (limit - max(5, limit // 10)) // max(1, processes))
    size = min(POOL_SIZE, max(1, share // 3))
    return limit, size, max(0, min(POOL_OVERFLOW, share - size))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # No checkpoint inside a request's commit (a stall of several ms for whoever crosses the
    # threshold): a thread of this process checkpoints the WAL in the background instead.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    path = cursor.execute("PRAGMA database_list").fetchone()[2]
    cursor.close()
    if path:
        _start_checkpointer(path)


_checkpointers: dict[tuple[int, str], bool] = {}
_checkpointers_lock = threading.Lock()
CHECKPOINT_SECONDS = 1.0


def _start_checkpointer(path: str) -> None:
    """One OS thread per process and database file, checkpointing the WAL every second
    (PASSIVE: it never blocks writers). A real thread even under gevent, so that the
    checkpoint's I/O never stalls a worker's greenlets."""
    key = (os.getpid(), path)
    if key in _checkpointers:
        return
    with _checkpointers_lock:
        if key in _checkpointers:
            return
        _checkpointers[key] = True
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        # gevent's Thread is a greenlet: start a real OS thread with the original primitive.
        monkey.get_original("_thread", "start_new_thread")(_checkpoint_forever, (path,))
        return
    threading.Thread(target=_checkpoint_forever, args=(path,), daemon=True,
                     name="sqlite-checkpoint").start()


def _checkpoint_forever(path: str) -> None:
    sleep = time.sleep
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("time"):
        sleep = monkey.get_original("time", "sleep")
    while True:
        sleep(CHECKPOINT_SECONDS)
        if not os.path.exists(path):
            return  # the database went away (a test's temporary file)
        try:
            conn = sqlite3.connect(path, timeout=10)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:  # busy: try again next time (no logging: not a gevent thread)
            continue

