"""Scheduled jobs and what is known of their runs: each job's state (next run, last run and
how it ended, which worker runs it now) and its latest runs, in the database every worker,
`GET /v1/admin/jobs`, `/readyz` and `/metrics` share. `core.worker` runs them.

The jobs themselves are the packages' services (webhook delivery, notices, overage, ...);
app.py, the composition root, lists them (core imports no package above it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from core.db import utcnow
from core.models import JobRun, JobState
from core.text import storable

log = logging.getLogger(__name__)
KEEP_RUNS = 50  # runs kept per job
HEARTBEAT_SECONDS = 5.0  # a running job's worker says it is alive this often
STALE_SECONDS = 30.0  # a heartbeat older than this: the worker is gone
OVERDUE_GRACE = timedelta(seconds=60)
OUTCOMES = ("ok", "error", "lost")  # how a run ends


@dataclass(frozen=True)
class JobContext:
    """What a run may want to know: when the last successful run started (None: never)."""

    last_success_at: datetime | None


@dataclass(frozen=True)
class Job:
    """A job: its name, how often it runs, and the work (returns a one-line summary; an
    exception is the run's error)."""

    name: str
    interval_seconds: int
    run: Callable[[JobContext], str]
    about: str = ""


class JobBoard:
    """The configured jobs and their recorded state (the workers write it; anyone reads)."""

    def __init__(self, engine: Engine, jobs: list[Job], *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.jobs = {job.name: job for job in jobs}
        self.clock = clock

    # -- what a worker writes -----------------------------------------------------------------

    def next_runs(self) -> dict[str, datetime]:
        """When each job that has run before runs next (a job never run is due now)."""
        with self.engine.connect() as conn:
            return {r.name: r.next_run_at for r in conn.execute(
                select(JobState.name, JobState.next_run_at))}

    def is_due(self, name: str, now: datetime) -> bool:
        due = self.next_runs().get(name)
        return due is None or due <= now

    def start(self, job: Job, worker: str, *, scheduled: bool = True
              ) -> tuple[int, JobContext]:
        """Record a run starting (its worker holds the job's lock); a run left `running` by
        a worker that died is recorded as lost. `scheduled`: a long-running worker's run
        (not `worker --once`), after which the job is expected at its next run. Returns the
        run's id."""
        now = self.clock()
        with self.engine.begin() as conn:
            state = conn.execute(select(JobState).where(JobState.name == job.name)).first()
            if state is None:
                conn.execute(insert(JobState).values(
                    name=job.name, interval_seconds=job.interval_seconds, next_run_at=now,
                    runs_ok=0, runs_error=0, runs_lost=0, scheduled=scheduled))
            elif state.running_on is not None:
                self._lost(conn, job.name, state.running_on, now)
            run_id = conn.execute(insert(JobRun).values(
                job=job.name, worker=worker, started_at=now, outcome="running",
            ).returning(JobRun.id)).scalar_one()
            conn.execute(update(JobState).where(JobState.name == job.name).values(
                running_on=worker, last_started_at=now, heartbeat_at=now,
                interval_seconds=job.interval_seconds, scheduled=scheduled))
        return run_id, JobContext(None if state is None else state.last_success_at)

    @staticmethod
    def _lost(conn: Connection, name: str, worker: str, now: datetime) -> None:
        message = f"worker {worker} stopped mid-run (or lost its lock); the job was taken over"
        lost = conn.execute(update(JobRun).where(
            JobRun.job == name, JobRun.outcome == "running").values(
            outcome="lost", finished_at=now, message=storable(message, 500))).rowcount
        conn.execute(update(JobState).where(JobState.name == name).values(
            runs_lost=JobState.runs_lost + max(lost, 1), last_outcome="lost",
            last_error=storable(message, 500)))

    def finish(self, job: Job, run_id: int, started_at: datetime, *, ok: bool,
               message: str, worker: str) -> bool:
        """Record how a run ended and when the job runs next: only while the run is still
        the job's (`worker` runs it, the run not recorded as lost). A worker whose lock went
        mid-run leaves the job to the worker that took it over; returns False then."""
        now = self.clock()
        text = storable(message, 500)
        next_run = max(started_at + timedelta(seconds=job.interval_seconds), now)
        values: dict[str, Any] = {
            "running_on": None, "heartbeat_at": None, "last_finished_at": now,
            "last_outcome": "ok" if ok else "error", "last_error": None if ok else text,
            "next_run_at": next_run,
            "last_duration_ms": int((now - started_at).total_seconds() * 1000)}
        if ok:
            values.update(last_success_at=started_at, runs_ok=JobState.runs_ok + 1)
        else:
            values["runs_error"] = JobState.runs_error + 1
        with self.engine.begin() as conn:
            ran = conn.execute(update(JobRun).where(
                JobRun.id == run_id, JobRun.outcome == "running").values(
                finished_at=now, outcome="ok" if ok else "error", message=text)).rowcount
            mine = conn.execute(update(JobState).where(
                JobState.name == job.name, JobState.running_on == worker).values(**values)
            ).rowcount
            if not (ran and mine):
                log.error("job %s: the run of %s ended after another worker took the job "
                          "over; its end is not recorded (%s)", job.name, worker, text)
            oldest = conn.execute(select(JobRun.id).where(JobRun.job == job.name)
                                  .order_by(JobRun.id.desc()).offset(KEEP_RUNS).limit(1)
                                  ).scalar()
            if oldest is not None:
                conn.execute(delete(JobRun).where(JobRun.job == job.name,
                                                  JobRun.id <= oldest))
        return bool(ran and mine)

    def beat(self, name: str, worker: str) -> None:
        """The worker running `name` is alive."""
        with self.engine.begin() as conn:
            conn.execute(update(JobState).where(JobState.name == name,
                                                JobState.running_on == worker)
                         .values(heartbeat_at=self.clock()))

    # -- what the API, /readyz and /metrics read ---------------------------------------------

    def status(self, runs: int = 10) -> list[dict[str, Any]]:
        """Each configured job: its interval, last run, outcome, next run, the worker running
        it now (None: none, or one whose heartbeat stopped), whether it is overdue, and its
        latest runs, newest first."""
        now = self.clock()
        with self.engine.connect() as conn:
            states = {s.name: s for s in conn.execute(select(JobState))}
            recent: dict[str, list[dict[str, Any]]] = {name: [] for name in self.jobs}
            for name in self.jobs:
                for r in conn.execute(select(JobRun).where(JobRun.job == name)
                                      .order_by(JobRun.id.desc()).limit(runs)):
                    recent[name].append({
                        "worker": r.worker, "started_at": r.started_at,
                        "finished_at": r.finished_at, "outcome": r.outcome,
                        "message": r.message})
        return [self._describe(job, states.get(job.name), recent[job.name], now)
                for job in self.jobs.values()]

    def _describe(self, job: Job, state: Any, runs: list[dict[str, Any]],
                  now: datetime) -> dict[str, Any]:
        base: dict[str, Any] = {"name": job.name, "about": job.about,
                                "interval_seconds": job.interval_seconds, "runs": runs}
        if state is None:
            return {**base, "next_run_at": None, "last_started_at": None,
                    "last_finished_at": None, "last_outcome": None, "last_error": None,
                    "last_success_at": None, "last_duration_ms": None, "running_on": None,
                    "overdue": False, "runs_ok": 0, "runs_error": 0, "runs_lost": 0}
        return {**base, "next_run_at": state.next_run_at,
                "last_started_at": state.last_started_at,
                "last_finished_at": state.last_finished_at,
                "last_outcome": state.last_outcome, "last_error": state.last_error,
                "last_success_at": state.last_success_at,
                "last_duration_ms": state.last_duration_ms,
                "running_on": state.running_on if _alive(state, now) else None,
                "overdue": _overdue(job, state, now), "runs_ok": state.runs_ok,
                "runs_error": state.runs_error, "runs_lost": state.runs_lost}

    def overdue(self) -> str | None:
        """A readiness check: None, or the jobs that should have run and have not. Only jobs
        a long-running worker ran last count: an install that runs no worker (or runs
        `worker --once` by hand) is not unready for it."""
        now = self.clock()
        with self.engine.connect() as conn:
            states = {s.name: s for s in conn.execute(select(JobState))}
        late = [f"{job.name} (due {int((now - states[job.name].next_run_at).total_seconds())}"
                " s ago)" for job in self.jobs.values()
                if job.name in states and _overdue(job, states[job.name], now)]
        return "overdue: " + ", ".join(late) if late else None

    def prometheus(self) -> bytes:
        """Per job (the job's name is the only label, with the outcome of runs): the last
        run's start, end, outcome and duration, the last success, the next run, how late it
        is, runs by outcome."""
        now = self.clock()
        with self.engine.connect() as conn:
            states = {s.name: s for s in conn.execute(select(JobState))}
        families: dict[str, tuple[str, str, list[str]]] = {
            "job_last_start_timestamp_seconds": ("gauge", "When the job's last run started "
                                                 "(unix time)", []),
            "job_last_end_timestamp_seconds": ("gauge", "When the job's last run ended "
                                               "(unix time)", []),
            "job_last_outcome": ("gauge", "How the job's last run ended: 1 for its outcome "
                                 "(ok, error, lost), 0 for the others", []),
            "job_last_success_timestamp_seconds": ("gauge", "When the job last ran to the "
                                                   "end without an error (unix time)", []),
            "job_last_duration_seconds": ("gauge", "How long the job's last run took", []),
            "job_next_run_timestamp_seconds": ("gauge", "When the job runs next (unix "
                                               "time)", []),
            "job_lag_seconds": ("gauge", "How long past its next run the job is (0: on "
                                "time)", []),
            "job_runs_total": ("counter", "Runs of the job by outcome (ok, error, lost)", []),
        }
        for name in self.jobs:
            state = states.get(name)
            if state is None:
                continue
            label = f'job="{name}"'
            for column, metric in (("last_started_at", "job_last_start_timestamp_seconds"),
                                   ("last_finished_at", "job_last_end_timestamp_seconds")):
                at = getattr(state, column)
                if at is not None:
                    families[metric][2].append(f"{{{label}}} {at.timestamp():.3f}")
            if state.last_outcome is not None:
                families["job_last_outcome"][2].extend(
                    f'{{{label},outcome="{o}"}} {int(state.last_outcome == o)}'
                    for o in OUTCOMES)
            if state.last_success_at is not None:
                families["job_last_success_timestamp_seconds"][2].append(
                    f"{{{label}}} {state.last_success_at.timestamp():.3f}")
            if state.last_duration_ms is not None:
                families["job_last_duration_seconds"][2].append(
                    f"{{{label}}} {state.last_duration_ms / 1000:.3f}")
            families["job_next_run_timestamp_seconds"][2].append(
                f"{{{label}}} {state.next_run_at.timestamp():.3f}")
            lag = max(0.0, (now - state.next_run_at).total_seconds())
            families["job_lag_seconds"][2].append(f"{{{label}}} {lag:.3f}")
            for outcome in OUTCOMES:
                families["job_runs_total"][2].append(
                    f'{{{label},outcome="{outcome}"}} {getattr(state, f"runs_{outcome}")}')
        lines: list[str] = []
        for metric, (kind, help_text, samples) in families.items():
            if samples:
                lines += [f"# HELP meterlane_{metric} {help_text}",
                          f"# TYPE meterlane_{metric} {kind}"]
                lines += [f"meterlane_{metric}{sample}" for sample in samples]
        return ("\n".join(lines) + "\n").encode() if lines else b""


def _alive(state: Any, now: datetime) -> bool:
    return state.running_on is not None and state.heartbeat_at is not None \
        and (now - state.heartbeat_at).total_seconds() <= STALE_SECONDS


def _overdue(job: Job, state: Any, now: datetime) -> bool:
    """Past its next run by more than an interval and a minute, not running on a live
    worker (a long run is not late), and last run by a long-running worker."""
    if _alive(state, now) or not state.scheduled:
        return False
    late: timedelta = now - state.next_run_at
    return late > timedelta(seconds=job.interval_seconds) + OVERDUE_GRACE
