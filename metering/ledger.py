"""Appending usage events: one row per call, idempotent, spooled to disk if the database fails."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from metering.models import UsageEvent

log = logging.getLogger(__name__)
_TABLE = UsageEvent.__table__


@dataclass(frozen=True)
class CallRecord:
    """Everything the ledger keeps about one model call (never prompt or completion text)."""

    app_id: int
    end_user_id: int
    request_id: str
    idempotency_key: str
    endpoint: str
    requested_model: str
    upstream: str | None
    upstream_model: str | None
    stream: bool
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    usage_source: str
    cost_pico_usd: int | None
    priced: bool
    status: str
    http_status: int
    error: str | None
    latency_ms: int
    ttft_ms: int | None
    created_at: datetime
    limits_pending: bool = False
    route_alias: str | None = None
    route_reason: str | None = None
    baseline_cost_pico_usd: int | None = None
    cache_write_tokens: int = 0
    plan_id: str | None = None

    def row(self) -> dict[str, Any]:
        values = dict(self.__dict__)  # all fields are scalars: no deep copy needed
        if values["error"] is not None:
            values["error"] = values["error"][:500]
        return values


class _Unwatched:
    """The done flag of a record no one waits on by itself (all but the last of a
    record_many: the one writer thread settles records in order, so the last one done means
    all are)."""

    __slots__ = ()

    def set(self) -> None:
        pass


_UNWATCHED = _Unwatched()


class _Pending:
    """One record waiting for the group commit that carries it."""

    __slots__ = ("row", "done", "result", "dedupe")

    def __init__(self, row: dict[str, Any], dedupe: bool = False, watched: bool = True) -> None:
        self.row = row
        self.done: threading.Event | _Unwatched = threading.Event() if watched else _UNWATCHED
        self.result: str | None = None  # written | duplicate | spooled | lost, once settled
        self.dedupe = dedupe


class LedgerWriter:
    """Writes CallRecords. A record is never lost: if the database refuses for any reason
    other than a duplicate, the record goes to an fsync'd spool file that `replay` drains.

    Writes are group-committed: concurrent calls in a process hand their rows to one writer
    thread (a greenlet under gevent), which inserts whatever has queued up in one transaction.
    Each caller still waits until its own row is committed (or spooled) before it returns."""

    def __init__(self, engine: Engine, spool_dir: Path, *, batch_max: int = 500) -> None:
        self.engine = engine
        # One INSERT statement is atomic by itself: autocommit saves the BEGIN and COMMIT
        # round trips on the hot path, and the driver-level statement skips SQLAlchemy's
        # per-call compile and bind processing (half the cost of a write).
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sql, self._params = _driver_insert(engine.dialect.name)
        self.spool_dir = spool_dir
        self.batch_max = batch_max
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._writer_pid: int | None = None

    def record(self, rec: CallRecord, *, dedupe: bool = False) -> str:
        """Append one record; returns "written", "duplicate" or "spooled". With `dedupe`, a
        record whose idempotency key is already in the ledger is a duplicate whatever request
        carried it (usage reported twice by an app); without, only a replay of the same
        request is (two proxied calls racing on one client key were both paid for)."""
        pending = _Pending(rec.row(), dedupe)
        self._ensure_writer()
        self._queue.put(pending)
        assert isinstance(pending.done, threading.Event)
        pending.done.wait()
        return pending.result or "lost"

    def record_many(self, recs: list[CallRecord], *, dedupe: bool = False) -> list[str]:
        """Append many records (one group commit carries as many as fit): each its answer,
        as record() gives it; returns once all are committed or spooled."""
        if not recs:
            return []
        pendings = [_Pending(rec.row(), dedupe, watched=i == len(recs) - 1)
                    for i, rec in enumerate(recs)]
        self._ensure_writer()
        for pending in pendings:
            self._queue.put(pending)
        last = pendings[-1].done
        assert isinstance(last, threading.Event)
        last.wait()  # settled in queue order by the one writer: the rest are done too
        return [p.result or "lost" for p in pendings]

    def _ensure_writer(self) -> None:
        if self._writer_pid == os.getpid():
            return
        with self._lock:
            if self._writer_pid != os.getpid():  # first use, or first use after a fork
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                 name="ledger-writer").start()
                self._writer_pid = os.getpid()

    def _run(self, q: queue.SimpleQueue[_Pending]) -> None:
        while True:
            batch = [q.get()]
            while len(batch) < self.batch_max:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write_batch(batch)
            except Exception:  # never let the writer die: a dead writer blocks every call
                log.exception("ledger writer failed on a batch of %d; spooling it", len(batch))
                for pending in batch:
                    if pending.result is not None:
                        continue  # settled before the failure: written, duplicate or spooled
                    try:
                        self._settle_one(pending)
                    except Exception:
                        # Neither the database nor the disk took it: leave it in the log.
                        log.critical("usage record LOST (no database, no spool): %s",
                                     orjson.dumps(pending.row).decode())
                        pending.result = "lost"
            finally:
                for pending in batch:
                    pending.done.set()

    def _write_batch(self, batch: list[_Pending]) -> None:
        # One statement of many rows: atomic on Postgres (psycopg's pipeline); SQLite's
        # executemany commits row by row in autocommit, so there the batch is a transaction:
        # a duplicate in it leaves nothing half written for the row-by-row pass to misread.
        engine = self.engine if self.engine.dialect.name == "sqlite" else self._autocommit
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(self._sql, [self._params(p.row) for p in batch])
        except DBAPIError:
            # A duplicate key or an outage: sort it out row by row.
            for pending in batch:
                self._settle_one(pending)
            return
        for pending in batch:
            pending.result = "written"

    def _settle_one(self, pending: _Pending) -> None:
        try:
            pending.result = self._insert(pending.row, dedupe=pending.dedupe)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the record must survive
            log.error("ledger write failed, spooling request %s: %s",
                      pending.row.get("request_id"), exc)
            self._spool(pending.row)
            pending.result = "spooled"

    def _insert(self, row: dict[str, Any], *, dedupe: bool = False) -> str:
        try:
            with self._autocommit.connect() as conn:
                conn.exec_driver_sql(self._sql, self._params(row))
            return "written"
        except IntegrityError:
            holder = self._request_holding(row["app_id"], row["idempotency_key"])
            if holder is None:
                raise
            if holder == row["request_id"] or dedupe:
                return "duplicate"  # the same call again (a spool replay): already counted
            # Another call raced in with the same client key and was forwarded too: it was
            # paid for, so it is kept under a key of its own rather than dropped.
            return self._insert({**row, "idempotency_key":
                                 f"{row['idempotency_key']}#{row['request_id']}"})

    def _request_holding(self, app_id: int, idempotency_key: str) -> str | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(_TABLE.c.request_id).where(
                _TABLE.c.app_id == app_id,
                _TABLE.c.idempotency_key == idempotency_key)).scalar_one_or_none()
        return found

    def key_used(self, app_id: int, idempotency_key: str) -> bool:
        return self._request_holding(app_id, idempotency_key) is not None

    # -- spool ---------------------------------------------------------------------------

    def _spool_path(self) -> Path:
        return self.spool_dir / f"usage-{os.getpid()}.jsonl"

    def _spool(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row) + b"\n"
        with self._lock:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            path = self._spool_path()
            while True:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replayer may have claimed (renamed) the file between open and lock.
                if _same_file(fd, path):
                    break
                os.close(fd)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def replay(self) -> int:
        """Insert every spooled record (duplicates are skipped); returns how many were written.
        A spool file is removed only after all its records are in the database."""
        written = 0
        if not self.spool_dir.is_dir():
            return 0
        for path in sorted(self.spool_dir.glob("usage-*")):
            claimed = self.spool_dir / f"usage-{os.getpid()}-{path.name}.replaying"
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another process claimed it
            with claimed.open("rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # wait out a writer mid-append
                data = fh.read()
            try:
                for raw in data.splitlines():
                    if raw.strip():
                        row = _decode(raw)
                        # a call the app reported itself is a duplicate by its key alone,
                        # as when it was first recorded (dedupe)
                        written += self._insert(row, dedupe=str(row.get("endpoint") or "")
                                                .startswith("meter.")) == "written"
            except Exception:
                claimed.rename(self.spool_dir / f"usage-{os.getpid()}-retry-{path.name}")
                raise
            claimed.unlink()
        return written


def _driver_insert(dialect: str) -> tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The INSERT in the driver's own parameter style, and how a row's values are bound."""
    columns = [c.name for c in _TABLE.columns if c.name != "id"]
    if dialect == "postgresql":
        marks = [f"%({c})s" for c in columns]

        def params(row: dict[str, Any]) -> dict[str, Any]:
            return row
    else:
        marks = [f":{c}" for c in columns]

        def params(row: dict[str, Any]) -> dict[str, Any]:
            # SQLite keeps UTC timestamps as text in SQLAlchemy's own format, so that the
            # ORM reads them back and range queries compare them as text.
            return {**row, "created_at":
                    row["created_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")}
    # Only our own table and column names go into the text; values are bound by the driver.
    table = UsageEvent.__tablename__
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"  # noqa: S608
    return sql, params


# A record spooled by an older version lacks the fields added since: their defaults.
_SPOOL_DEFAULTS: dict[str, Any] = {
    name: f.default for name, f in CallRecord.__dataclass_fields__.items()
    if f.default is not dataclasses.MISSING}


def _decode(raw: bytes) -> dict[str, Any]:
    row: dict[str, Any] = {**_SPOOL_DEFAULTS, **orjson.loads(raw)}
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
