"""Appending usage events: one row per call, idempotent, spooled to disk if the database fails."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from core.tenancy import TenancyService
from metering.models import UsageEvent
from metering.quarantine import Quarantine, describe, note
from metering.records import CallRecord, cleaned, is_int, problem_of
from metering.spool import Spool

log = logging.getLogger(__name__)
_TABLE = UsageEvent.__table__
def is_poison(exc: BaseException) -> bool:
    """Whether the database refused a record for what it holds (a value it cannot store, a
    constraint it breaks): retrying it can never succeed, so it is quarantined. Anything else
    (no connection, a read-only standby after a failover, a missing table or permission) is
    the database's state, not the record's: the record is spooled until it passes."""
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        # a value the driver could not send (bound before any round trip)
        return isinstance(exc.orig, (ValueError, TypeError, OverflowError))
    return isinstance(exc, (ValueError, TypeError, OverflowError))


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

    __slots__ = ("row", "done", "result", "dedupe", "answered")

    def __init__(self, row: dict[str, Any], dedupe: bool = False, watched: bool = True,
                 answered: bool = False) -> None:
        self.row = row
        self.answered = answered  # the call was answered before this commit (journaled)
        self.done: threading.Event | _Unwatched = threading.Event() if watched else _UNWATCHED
        # written | duplicate | spooled | quarantined | lost, once settled
        self.result: str | None = None
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
        self._many = _many_insert(engine.dialect.name, self._sql, self._params)
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self.spool_dir = spool_dir
        self.spool = Spool(spool_dir, "usage")
        self.batch_max = batch_max
        # How long a commit of answered rows only may wait for more (0: never waits; set
        # by MeteringService where calls are answered before their commit).
        self.linger_s = 0.0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._writer_pid: int | None = None
        self._thread: threading.Thread | None = None
        self._running = False  # this process's writer is started and has not ended
        self.quarantine = Quarantine(engine, spool_dir)
        # told the records waiting for this process's writer (a metrics gauge): when the
        # writer takes a batch and when it is done with it; and, while one batch has been
        # written for longer than stalled_s, by each record queued behind it
        self.on_depth: Callable[[int], None] | None = None
        self.stalled_s = 0.5
        self._in_batch = 0  # the records of the batch being written
        self._writing_since = 0.0  # when it began (monotonic); 0: no batch is being written

    def record(self, rec: CallRecord, *, dedupe: bool = False) -> str:
        """Append one record; returns "written", "duplicate" or "spooled". With `dedupe`, a
        record whose idempotency key is already in the ledger is a duplicate whatever request
        carried it (usage reported twice by an app); without, only a replay of the same
        request is (two proxied calls racing on one client key were both paid for)."""
        return self.record_row(rec.row(), dedupe=dedupe)

    def record_row(self, row: dict[str, Any], *, dedupe: bool = False,
                   answered: bool = False) -> str:
        """record() of a record's row already built (CallRecord.row()). `answered`: the call
        was answered before its commit (its row is in the intent journal), so the commit may
        wait up to linger_s to share its cost with the next rows."""
        pending = _Pending(row, dedupe, answered=answered)
        self._ensure_writer()
        self._queue.put(pending)
        if self._writing_since:  # a read of one attribute while the writer keeps up
            self._stalled()
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
        if self._writing_since:
            self._stalled()
        last = pendings[-1].done
        assert isinstance(last, threading.Event)
        last.wait()  # settled in queue order by the one writer: the rest are done too
        return [p.result or "lost" for p in pendings]

    def record_batch(self, recs: list[CallRecord]) -> list[str]:
        """Append calls an app reported together, all or nothing, in one transaction of this
        request's own: each "written", or "duplicate" when its key is in the ledger already;
        the whole batch "spooled" when the database is away, "quarantined" when it refused
        the batch for what it holds. Raises ValueError naming the first record the ledger
        cannot take (nothing is written then)."""
        rows = [rec.row() for rec in recs]
        for i, row in enumerate(rows):
            why = problem_of(row)
            if why is not None:
                raise ValueError(f"event {i}: {why}")
        if not rows:
            return []
        # Every row in one statement, keys already in the ledger skipped: on Postgres a
        # pipeline that is one implicit transaction (under gevent it waits on the socket once
        # a row: only this request waits), on SQLite a transaction. Then, only when some were
        # skipped, which were written: those holding this request's id.
        engine = self.engine if self.engine.dialect.name == "sqlite" else self._autocommit
        try:
            with engine.begin() as conn:
                inserted = conn.exec_driver_sql(
                    self._sql + " ON CONFLICT (app_id, idempotency_key) DO NOTHING",
                    [self._params(row) for row in rows]).rowcount
            if inserted == len(rows):
                return ["written"] * len(rows)
            with self.engine.connect() as conn:
                mine = {tuple(r) for r in conn.execute(select(
                    _TABLE.c.app_id, _TABLE.c.idempotency_key, _TABLE.c.request_id).where(
                    _TABLE.c.idempotency_key.in_({row["idempotency_key"] for row in rows}),
                    _TABLE.c.request_id.in_({row["request_id"] for row in rows})))}
        except Exception as exc:  # noqa: BLE001 - sorted below: nothing was written
            outcome = "quarantined" if is_poison(exc) else "spooled"
            note(logging.ERROR, "a batch of %d usage records was not written (%s): %s",
                 len(rows), describe(exc), outcome)
            for row in rows:
                if outcome == "quarantined":
                    self.quarantine.put(row, f"batch refused: {type(exc).__name__}: {exc}",
                                        "writer")
                else:
                    self._spool(row)
            return [outcome] * len(rows)
        return ["written" if (row["app_id"], row["idempotency_key"], row["request_id"]) in mine
                else "duplicate" for row in rows]

    def _ensure_writer(self) -> None:
        # `_running` and not Thread.is_alive(): under gevent is_alive() yields to the hub (a
        # few hundred us on a busy worker, on every call); the writer clears it as it ends.
        if self._running and self._writer_pid == os.getpid():
            return
        with self._lock:
            thread = self._thread
            if self._writer_pid != os.getpid():  # first use, or first use after a fork
                self._queue = queue.SimpleQueue()
            elif self._running:
                return
            elif thread is not None:  # it must not die; if it did anyway, another takes over
                note(logging.CRITICAL, "the ledger writer had stopped; starting it again")
            self._thread = threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                            name="ledger-writer")
            self._running = True
            self._thread.start()
            self._writer_pid = os.getpid()

    def writer_alive(self) -> bool:
        """False when this process's writer was started and has stopped (/readyz says so)."""
        return self._thread is None or self._writer_pid != os.getpid() or self._running

    def _run(self, q: queue.SimpleQueue[_Pending]) -> None:
        try:
            self._serve(q)
        finally:
            self._running = False

    def _serve(self, q: queue.SimpleQueue[_Pending]) -> None:
        while True:
            batch = [q.get()]
            self._gather(q, batch)
            self._in_batch, self._writing_since = len(batch), time.monotonic()
            self._depth(len(batch) + q.qsize())
            try:
                self._write_batch(batch)
            except Exception as exc:  # never let the writer die: a dead writer blocks calls
                self._rescue(batch, exc)
            finally:
                self._in_batch, self._writing_since = 0, 0.0
                for pending in batch:
                    pending.done.set()
                self._depth(q.qsize())

    def depth(self) -> int:
        """The records this process's writer has yet to settle: queued, and in the batch it
        is writing."""
        if self._writer_pid != os.getpid():
            return 0  # the parent's queue, before a fork: none of this process's
        return self._queue.qsize() + self._in_batch

    def report_depth(self) -> None:
        """The gauge, told the depth now (a scrape: the writer may be stuck in a write)."""
        self._depth(self.depth())

    def _stalled(self) -> None:
        """A record was queued while a batch is being written: the gauge is told the depth
        once that write has taken longer than stalled_s (a hung write), so that it grows
        with the queue, not only when the writer moves."""
        since = self._writing_since
        if since and time.monotonic() - since >= self.stalled_s:
            self._depth(self.depth())

    def _gather(self, q: queue.SimpleQueue[_Pending], batch: list[_Pending]) -> None:
        """Add what else is queued to the batch. While every row in it was answered already
        (nobody waits for this commit), wait up to linger_s for more: a commit costs about
        0.3 ms of CPU whatever it carries, paid by the calls that run beside it."""
        deadline = 0.0
        lingering = self.linger_s > 0 and batch[0].answered
        while len(batch) < self.batch_max:
            try:
                pending = q.get_nowait()
            except queue.Empty:
                if not lingering:
                    return
                now = time.monotonic()
                deadline = deadline or now + self.linger_s
                if now >= deadline:
                    return
                try:
                    pending = q.get(timeout=deadline - now)
                except queue.Empty:
                    return
            batch.append(pending)
            lingering = lingering and pending.answered

    def _depth(self, depth: int) -> None:
        try:
            if self.on_depth is not None:
                self.on_depth(depth)
        except Exception:  # noqa: BLE001, S110 - a gauge must never stop the writer
            pass

    def _rescue(self, batch: list[_Pending], exc: Exception) -> None:
        """Settle, one by one, what a failed batch left unsettled. Nothing here may raise."""
        note(logging.ERROR, "ledger writer failed on a batch of %d (%s); settling it row "
             "by row", len(batch), describe(exc))
        for pending in batch:
            if pending.result is not None:
                continue  # settled before the failure
            try:
                self._settle_one(pending)
            except Exception:  # noqa: BLE001 - neither database, spool nor quarantine
                pending.result = "lost"
                note(logging.CRITICAL, "usage record LOST (no database, spool or "
                     "quarantine): %s", describe(pending.row))

    def _write_batch(self, batch: list[_Pending]) -> None:
        refused = [p for p in batch if (why := problem_of(p.row)) is not None
                   and self._quarantine(p, why)]
        if refused:
            batch = [p for p in batch if p.result is None]
            if not batch:
                return
        # One statement of many rows: atomic on Postgres; SQLite's executemany commits row
        # by row in autocommit, so there the batch is a transaction: a duplicate in it leaves
        # nothing half written for the row-by-row pass to misread.
        engine = self.engine if self.engine.dialect.name == "sqlite" else self._autocommit
        try:
            with engine.begin() as conn:
                self._many(conn, [p.row for p in batch])
        except (DBAPIError, self._driver_error):
            # A duplicate key or an outage: sort it out row by row.
            for pending in batch:
                self._settle_one(pending)
            return
        for pending in batch:
            pending.result = "written"

    def _quarantine(self, pending: _Pending, reason: str, source: str = "writer") -> bool:
        self.quarantine.put(pending.row, reason, source)
        pending.result = "quarantined"
        return True

    def _settle_one(self, pending: _Pending) -> None:
        """Write one record on its own. (Its group commit, if any, was all or nothing: every
        value was checked first, so the driver cannot fail part way through binding.)"""
        why = problem_of(pending.row)
        if why is not None:
            self._quarantine(pending, why)
            return
        try:
            result = self._insert(pending.row, dedupe=pending.dedupe)
            pending.result = "duplicate" if result == "mine" else result
        except Exception as exc:  # noqa: BLE001 - whatever failed, the record must survive
            if is_poison(exc):  # refused for what it holds: never retried on its own
                self._quarantine(pending, f"{type(exc).__name__}: {exc}")
                return
            note(logging.ERROR, "ledger write failed, spooling request %s: %s",
                 describe(pending.row.get("request_id")), describe(exc))
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
            if holder == row["request_id"]:
                return "mine"  # this record is in already (a spool replay, a partial batch)
            if dedupe:
                return "duplicate"  # reported twice by the app: counted once
            # Another call raced in with the same client key and was forwarded too: it was
            # paid for, so it is kept under a key of its own rather than dropped.
            own = {**row, "idempotency_key": f"{row['idempotency_key']}#{row['request_id']}"}
            why = problem_of(own)
            if why is not None:
                raise ValueError(why) from None
            return self._insert(own)

    def _request_holding(self, app_id: int, idempotency_key: str) -> str | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(_TABLE.c.request_id).where(
                _TABLE.c.app_id == app_id,
                _TABLE.c.idempotency_key == idempotency_key)).scalar_one_or_none()
        return found

    def key_used(self, app_id: int, idempotency_key: str) -> bool:
        return self._request_holding(app_id, idempotency_key) is not None

    # -- spool ---------------------------------------------------------------------------

    def _spool(self, row: dict[str, Any]) -> None:
        self.spool.append(row)

    def spooled(self) -> int:
        """Records in the spool waiting for a replay (every process's: one folder)."""
        return self.spool.count()

    def spool_row(self, row: dict[str, Any]) -> None:
        """Spool a row as it is (a dead worker's row from its journal): the replay writes it,
        or finds it written."""
        self._spool(row)

    def spool_for_user(self, row: dict[str, Any], external_id: str) -> None:
        """Spool a record whose end user has no id yet (the database was away when the call
        named them for the first time in this process): the replay creates the user, as the
        call would have, and writes the record with their id."""
        self._spool({**row, "end_user_id": None, "end_user": external_id})

    def replay(self) -> int:
        """Insert every spooled record; returns how many were written. A duplicate is skipped,
        a record the database refuses for what it holds goes to the quarantine, and a database
        still away stops the replay with the rest kept in the spool: this never raises, so a
        spool can never stop the service from starting. A file claimed by a process that
        died mid-replay is claimed again."""
        return self.spool.drain(self._replay_line)

    def _replay_line(self, raw: bytes) -> str:
        """written | duplicate | quarantined | away (the database, or the quarantine, could
        not take it now: it stays in the spool)."""
        try:
            row = cleaned(_decode(raw))
        except Exception as exc:  # noqa: BLE001 - unreadable: kept as text with the reason
            return self._quarantine_line({"line": raw.decode("utf-8", "replace")},
                                         f"unreadable spool line: {describe(exc)}")
        if row.get("end_user_id") is None and isinstance(row.get("end_user"), str) \
                and is_int(row.get("app_id")):
            try:  # spooled before its end user had an id (spool_for_user)
                row["end_user_id"] = TenancyService(self.engine).ensure_end_user(
                    row["app_id"], row["end_user"])
            except Exception as exc:  # noqa: BLE001 - sorted as an insert's failure is
                if is_poison(exc):
                    return self._quarantine_line(row, f"{type(exc).__name__}: {exc}")
                note(logging.ERROR, "replaying the spool stopped, the database is away: %s",
                     describe(exc))
                return "away"
        row.pop("end_user", None)
        why = problem_of(row)
        if why is not None:
            return self._quarantine_line(row, why)
        try:
            # a call the app reported itself is a duplicate by its key alone, as when it was
            # first recorded (dedupe)
            result = self._insert(row, dedupe=str(row.get("endpoint") or "")
                                  .startswith("meter."))
            return "duplicate" if result == "mine" else result
        except Exception as exc:  # noqa: BLE001 - sorted below
            if is_poison(exc):
                return self._quarantine_line(row, f"{type(exc).__name__}: {exc}")
            note(logging.ERROR, "replaying the spool stopped, the database is away: %s",
                 describe(exc))
            return "away"

    def _quarantine_line(self, row: dict[str, Any], reason: str) -> str:
        try:
            self.quarantine.put(row, reason, "replay")
        except Exception:  # noqa: BLE001 - neither table nor file: it stays in the spool
            return "away"
        return "quarantined"

    def write_or_refuse(self, row: dict[str, Any]) -> str:
        """Write one record as the ledger would (its checks, then the insert): "written" or
        "duplicate"; raises with the reason when it is refused (a quarantine retry)."""
        row = cleaned({**_SPOOL_DEFAULTS, **row})
        if isinstance(row.get("created_at"), str):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        why = problem_of(row)
        if why is not None:
            raise ValueError(why)
        result = self._insert(row, dedupe=str(row.get("endpoint") or "").startswith("meter."))
        return "duplicate" if result == "mine" else result


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


_Many = Callable[[Connection, list[dict[str, Any]]], None]


def _many_insert(dialect: str, sql: str,
                 params: Callable[[dict[str, Any]], dict[str, Any]]) -> _Many:
    """How the writer inserts a batch of rows, all or nothing.

    On Postgres, one COPY: the rows go in one stream and are answered once, and psycopg
    formats them in C (500 rows: 2.5 ms of the worker's CPU, against 8.6 for executemany and
    70 for one INSERT of 500 VALUES rows). psycopg's executemany pipelines a statement per
    row instead, waiting on the socket for each: under gevent every wait hands the worker to
    the calls it serves, so a batch of 500 took seconds under load, and the ledger (and the
    memory of the calls waiting for it) fell further behind the longer the load lasted.
    A COPY that fails raises the driver's own error (it bypasses SQLAlchemy's execute).
    SQLite is in-process: its executemany (of `sql`, the one-row INSERT) never waits on a
    socket."""
    if dialect != "postgresql":
        def executemany(conn: Connection, rows: list[dict[str, Any]]) -> None:
            conn.exec_driver_sql(sql, [params(row) for row in rows])

        return executemany
    columns = [c.name for c in _TABLE.columns if c.name != "id"]
    copy_sql = f"COPY {UsageEvent.__tablename__} ({', '.join(columns)}) FROM STDIN"

    def copy(conn: Connection, rows: list[dict[str, Any]]) -> None:
        dbapi: Any = conn.connection.dbapi_connection  # a psycopg Connection
        try:
            with dbapi.cursor() as cur, cur.copy(copy_sql) as stream:
                for row in rows:
                    stream.write_row([row[c] for c in columns])
        except Exception:
            if dbapi.closed or dbapi.broken:  # SQLAlchemy did not see it: drop it from the pool
                conn.invalidate()
            raise

    return copy


# A record spooled by an older version lacks the fields added since: their defaults.
_SPOOL_DEFAULTS: dict[str, Any] = {
    name: f.default for name, f in CallRecord.__dataclass_fields__.items()
    if f.default is not dataclasses.MISSING}


def _decode(raw: bytes) -> dict[str, Any]:
    found = orjson.loads(raw)
    row: dict[str, Any] = {**_SPOOL_DEFAULTS, **found}
    if "credits_pending" not in found:  # spooled by a version before the marks: let the
        row["credits_pending"] = row.get("plan_id") is not None  # accounting decide
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row
