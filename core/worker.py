"""`meterlane worker`: runs every scheduled job when it is due, each on one worker at a time.

A job's lock is a Postgres session advisory lock held on a connection of its own for the run
(Postgres drops it when the connection goes: a worker killed mid-run frees its job at once),
or on SQLite an flock on a file beside the database's (the kernel drops it when the process
dies). A worker that finds a job still marked running on another records that run as lost
and runs the job: any number of workers may run, and a dead one's jobs move to the others
at their next tick. A lock can also go while its worker lives (the lock's connection
dropped): the heartbeat checks it, and such a run is never recorded over the run of the
worker that took the job over."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from core.jobs import HEARTBEAT_SECONDS, Job, JobBoard

log = logging.getLogger(__name__)
LOCK_CLASS = 0x6D6C6A  # advisory locks of jobs: (this, crc32 of the job's name)
TICK_SECONDS = 1.0


class JobLock(Protocol):
    def acquire(self) -> bool: ...

    def lost(self) -> bool:
        """Whether the lock, held, has gone from under its holder (never after release)."""
        ...

    def release(self) -> None: ...


class AdvisoryLock:
    """pg_try_advisory_lock on a connection kept for the run; unlocked before it goes back
    to the pool (a session lock outlives the transaction)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.key = zlib.crc32(name.encode()) - 2**31  # a signed 32-bit int
        self.conn: Connection | None = None
        self._using = threading.Lock()  # the heartbeat checks the connection the run holds

    def acquire(self) -> bool:
        conn = self.engine.connect()
        try:
            # A worker killed with its machine (no FIN to the server) must not hold its job
            # for the hours the OS takes to notice: the server probes this connection.
            conn.execute(text("SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; "
                              "SET tcp_keepalives_count = 4"))
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:c, :k)"),
                                    {"c": LOCK_CLASS, "k": self.key}).scalar())
            conn.commit()
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self.conn = conn
        return True

    def lost(self) -> bool:
        """A cheap query on the lock's connection: when it fails, the connection is gone
        (the server restarted or failed over, an idle timeout, an operator's
        pg_terminate_backend, the network) and the lock with it: another worker may run
        the job now."""
        with self._using:
            if self.conn is None:
                return False
            try:
                self.conn.execute(text("SELECT 1"))
                self.conn.commit()
            except Exception:  # noqa: BLE001 - any failure: the session, and the lock, are gone
                log.warning("the lock connection of job %s failed", self.key, exc_info=True)
                return True
            return False

    def release(self) -> None:
        with self._using:
            conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"),
                         {"c": LOCK_CLASS, "k": self.key})
            conn.commit()
        except Exception:  # noqa: BLE001 - the connection is dropped below: the lock with it
            log.warning("could not unlock job %s; dropping its connection", self.key)
            conn.invalidate()
        finally:
            conn.close()


class FileLock:
    """flock on `<folder>/<job>.lock` (SQLite has no advisory locks)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / f"{name}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def lost(self) -> bool:
        return False  # the kernel holds it as long as the file is open

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def lock_factory(engine: Engine, data_dir: str) -> Callable[[str], JobLock]:
    """The lock each backend has: advisory locks on Postgres, file locks elsewhere, in a
    folder beside the SQLite database's file (`<file>.jobs/`: every worker on that database
    shares them, whatever its data folder; an in-memory database's are in the data
    folder)."""
    if engine.dialect.name == "postgresql":
        return lambda name: AdvisoryLock(engine, name)
    database = engine.url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        db_file = Path(database).resolve()  # as SQLite opens it (symlinks, relative paths)
        folder = db_file.with_name(db_file.name + ".jobs")
    else:
        folder = Path(data_dir) / "jobs"
    return lambda name: FileLock(folder, name)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Outcome:
    job: str
    ok: bool
    message: str
    seconds: float


class Worker:
    """Runs the board's jobs (or those named) when due, one at a time, taking each job's lock
    first; `report` hears of every run."""

    def __init__(self, board: JobBoard, locks: Callable[[str], JobLock], *,
                 only: Iterable[str] | None = None, name: str | None = None,
                 report: Callable[[Outcome], None] | None = None) -> None:
        self.board = board
        self.locks = locks
        self.jobs = [board.jobs[n] for n in only] if only else list(board.jobs.values())
        self.name = name or worker_id()
        self.report = report or (lambda outcome: None)
        self.stopping = threading.Event()
        self._running: str | None = None
        self._lock: JobLock | None = None  # the running job's
        self._lock_lost = False  # the running job's lock went mid-run: the run is not ours

    def tick(self, *, due_only: bool = True) -> list[Outcome]:
        """Run each job that is due (every job, without due_only) and not running elsewhere."""
        done: list[Outcome] = []
        next_runs = self.board.next_runs() if due_only else {}
        for job in self.jobs:
            if self.stopping.is_set():
                break
            due = next_runs.get(job.name)
            if due is not None and due > self.board.clock():
                continue
            outcome = self.run_job(job, due_only=due_only)
            if outcome is not None:
                done.append(outcome)
                self.report(outcome)
        return done

    def run_job(self, job: Job, *, due_only: bool = True) -> Outcome | None:
        """Run one job under its lock; None when another worker holds it, or ran it just
        before this one took the lock."""
        lock = self.locks(job.name)
        if not lock.acquire():
            return None
        try:
            if due_only and not self.board.is_due(job.name, self.board.clock()):
                return None
            run_id, context = self.board.start(job, self.name, scheduled=due_only)
            started_at, began = self.board.clock(), time.monotonic()
            self._lock_lost = False
            self._running, self._lock = job.name, lock
            try:
                message, ok = job.run(context), True
            except Exception as exc:  # noqa: BLE001 - recorded as the run's error; next run retries
                log.exception("job %s failed", job.name)
                message, ok = f"{type(exc).__name__}: {exc}", False
            finally:
                self._running = self._lock = None
            if self._lock_lost or lock.lost():
                self._lock_lost = False
                ok, message = False, (f"this worker lost the job's lock mid-run ({message}): "
                                      "another worker may have run it alongside")
                log.error("job %s: %s", job.name, message)
            # recorded only where this run is still the job's (not if another took it over)
            self.board.finish(job, run_id, started_at, ok=ok, message=message,
                              worker=self.name)
            return Outcome(job.name, ok, message, time.monotonic() - began)
        finally:
            lock.release()

    def beat(self) -> None:
        """The heartbeat of the running job: its lock checked still held, then the job's
        heartbeat written. A lock gone (its connection dropped) lets another worker take the
        job while this run goes on (job code cannot be stopped safely mid-way): an error is
        logged, and the run stops beating and is never recorded over the other's."""
        running, lock = self._running, self._lock
        if running is None or lock is None or self._lock_lost:
            return
        if lock.lost():
            self._lock_lost = True
            log.error("worker %s lost the lock of job %s mid-run (its database connection "
                      "dropped): another worker may run the job alongside this run, whose "
                      "end will not be recorded over that one's", self.name, running)
            return
        self.board.beat(running, self.name)

    def _heartbeat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the next beat tries again
                log.warning("job heartbeat failed", exc_info=True)

    def run_forever(self, *, tick_seconds: float = TICK_SECONDS,
                    parent: int | None = None) -> None:
        """Tick until stopped (`stopping` set by a signal), or until `parent` is gone (a
        worker started by `meterlane serve` ends with it)."""
        beat = threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True)
        beat.start()
        while not self.stopping.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("the process that started this worker is gone: stopping")
                break
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - e.g. the database away: the next tick retries
                log.exception("a worker tick failed; trying again")
            self.stopping.wait(tick_seconds)
        self.stopping.set()
