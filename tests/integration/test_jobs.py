"""The scheduled jobs' board: GET /v1/admin/jobs (operator admin keys only), /readyz naming
an overdue job (and never failing an install that runs no worker), /metrics per job, and the
lock that keeps one job on one worker at a time (advisory lock on Postgres, file lock on
SQLite)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from core.auth import Role
from core.db import make_engine, utcnow
from core.jobs import Job, JobBoard, JobContext
from core.models import JobState
from core.worker import LOCK_CLASS, AdvisoryLock, FileLock, Outcome, Worker, lock_factory
from tests.conftest import Keys, bearer

pytestmark = pytest.mark.integration


def board_of(app: Any) -> JobBoard:
    return app.extensions["wiring"].jobs  # type: ignore[no-any-return]


def worker_of(app: Any, name: str = "test:1", **kw: Any) -> Worker:
    board = board_of(app)
    return Worker(board, lock_factory(board.engine, app.extensions["wiring"].config.data_dir),
                  name=name, **kw)


def test_admin_jobs_answers_an_operator_admin_key_only(app: Any, client: Any,
                                                       keys: Keys) -> None:
    assert client.get("/v1/admin/jobs").status_code == 401
    for key in (keys.app, keys.finance):
        refused = client.get("/v1/admin/jobs", headers=bearer(key))
        assert refused.status_code == 403 and refused.mimetype == "application/problem+json"
    bound = app.extensions["wiring"].keys.create_key(Role.ADMIN, "acme").key
    assert client.get("/v1/admin/jobs", headers=bearer(bound)).status_code == 403
    listed = client.get("/v1/admin/jobs", headers=bearer(keys.admin))
    assert listed.status_code == 200
    jobs = {j["name"]: j for j in listed.json["jobs"]}
    assert set(jobs) == {"webhooks", "notices", "overage", "credits", "rollup", "limits",
                         "quarantine", "idempotency"}
    assert jobs["overage"]["interval_seconds"] == 300
    assert jobs["overage"]["last_started_at"] is None and jobs["overage"]["runs"] == []
    assert "/v1/admin/jobs" in client.get("/openapi.json").json["paths"]


def test_a_workers_runs_are_listed_with_their_outcome(app: Any, client: Any,
                                                      keys: Keys) -> None:
    done = worker_of(app).tick()
    assert {o.job for o in done} == set(board_of(app).jobs) and all(o.ok for o in done)
    # not due again for minutes (webhooks, every 10 s, could be on a slow machine)
    assert worker_of(app, "test:2", only=["overage", "notices", "rollup"]).tick() == []
    jobs = {j["name"]: j for j in client.get("/v1/admin/jobs",
                                             headers=bearer(keys.admin)).json["jobs"]}
    overage = jobs["overage"]
    assert overage["last_outcome"] == "ok" and overage["runs_ok"] == 1
    assert overage["runs"][0]["worker"] == "test:1"
    assert "Stripe is not configured" in overage["runs"][0]["message"]
    assert overage["next_run_at"] > overage["last_started_at"] and not overage["overdue"]
    assert overage["running_on"] is None


def test_a_failing_job_records_its_error_and_runs_again_at_its_next_turn(app: Any) -> None:
    calls: list[int] = []

    def broken(_: JobContext) -> str:
        calls.append(1)
        raise RuntimeError("the upstream said no")

    board = JobBoard(board_of(app).engine, [Job("broken", 1, broken)])
    runner = Worker(board, lambda name: FileLock(Path(app.extensions["wiring"].config.data_dir),
                                                 name), name="test:1")
    [outcome] = runner.tick()
    assert not outcome.ok and "RuntimeError: the upstream said no" in outcome.message
    [status] = board.status()
    assert status["last_outcome"] == "error" and status["runs_error"] == 1
    assert "the upstream said no" in status["last_error"]


def test_readyz_reports_an_overdue_job_without_failing_and_ignores_jobs_never_run(
        app: Any, client: Any) -> None:
    assert client.get("/readyz").status_code == 200  # no worker ever ran: ready
    worker_of(app).tick(due_only=False)  # `meterlane worker --once`, by hand
    with board_of(app).engine.begin() as conn:  # ... a day ago
        conn.execute(update(JobState).values(next_run_at=utcnow() - timedelta(days=1)))
    assert client.get("/readyz").status_code == 200  # no worker runs the jobs: not late
    worker_of(app).tick()
    assert client.get("/readyz").json["checks"]["jobs"] == "ok"
    with board_of(app).engine.begin() as conn:  # the workers stopped an hour ago
        conn.execute(update(JobState).where(JobState.name == "credits").values(
            next_run_at=utcnow() - timedelta(hours=1)))
    late = client.get("/readyz")  # reported; the API still serves (stays in rotation)
    assert late.status_code == 200 and late.json["status"] == "ok"
    assert late.json["checks"]["jobs"].startswith("overdue: credits (due 3")
    assert late.json["checks"]["database"] == "ok"
    jobs = {j["name"]: j for j in board_of(app).status()}
    assert jobs["credits"]["overdue"] and not jobs["webhooks"]["overdue"]
    worker_of(app).tick()  # a worker back: it runs, and the report clears
    assert client.get("/readyz").json["checks"]["jobs"] == "ok"


def test_metrics_show_each_jobs_last_run_runs_lag_and_last_success(app: Any, client: Any) -> None:
    worker_of(app).tick()
    body = client.get("/metrics").get_data(as_text=True)
    [credits] = [s for s in board_of(app).status() if s["name"] == "credits"]
    assert (f'meterlane_job_last_start_timestamp_seconds{{job="credits"}} '
            f'{credits["last_started_at"].timestamp():.3f}') in body
    assert (f'meterlane_job_last_end_timestamp_seconds{{job="credits"}} '
            f'{credits["last_finished_at"].timestamp():.3f}') in body
    assert 'meterlane_job_last_outcome{job="credits",outcome="ok"} 1' in body
    assert 'meterlane_job_last_outcome{job="credits",outcome="error"} 0' in body
    assert 'meterlane_job_last_outcome{job="credits",outcome="lost"} 0' in body
    assert 'meterlane_job_runs_total{job="credits",outcome="ok"} 1' in body
    assert 'meterlane_job_runs_total{job="credits",outcome="error"} 0' in body
    assert 'meterlane_job_last_success_timestamp_seconds{job="credits"}' in body
    assert 'meterlane_job_last_duration_seconds{job="credits"}' in body
    assert 'meterlane_job_lag_seconds{job="credits"} 0.000' in body
    assert 'meterlane_job_next_run_timestamp_seconds{job="credits"}' in body


def test_a_job_locked_by_another_worker_is_left_to_it_then_taken_over(app: Any) -> None:
    board = board_of(app)
    job = board.jobs["credits"]
    board.start(job, "dead:99")  # a worker began a run, and died holding its lock
    held = AdvisoryLock(board.engine, "credits")
    assert held.acquire()
    try:
        assert "credits" not in {o.job for o in worker_of(app).tick()}
        [status] = [s for s in board.status() if s["name"] == "credits"]
        assert status["runs"][0]["outcome"] == "running"
    finally:
        held.release()  # (Postgres drops it with the dead worker's connection)
    assert "credits" in {o.job for o in worker_of(app).tick()}
    [status] = [s for s in board.status() if s["name"] == "credits"]
    assert [r["outcome"] for r in status["runs"]] == ["ok", "lost"]
    assert status["runs_lost"] == 1 and "dead:99 stopped mid-run" in status["runs"][1][
        "message"]


def test_sqlite_file_locks_keep_a_job_on_one_worker(tmp_path: Path) -> None:
    from migrations.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    try:
        ran: list[str] = []
        board = JobBoard(engine, [Job("tally", 60, lambda _: ran.append("x") or "ok")])
        locks = lock_factory(engine, str(tmp_path))
        assert isinstance(locks("tally"), FileLock)
        held = locks("tally")
        assert held.acquire() and not locks("tally").acquire()  # one holder at a time
        assert Worker(board, locks, name="a:1").tick() == [] and ran == []
        held.release()
        assert [o.job for o in Worker(board, locks, name="a:1").tick()] == ["tally"]
        assert Worker(board, locks, name="b:2").tick() == []  # ran: due in a minute
        assert ran == ["x"]
    finally:
        engine.dispose()


def test_a_worker_that_loses_its_lock_mid_run_never_writes_over_the_one_that_took_over(
        app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A's lock connection is terminated mid-run (a failover, an idle timeout, an
    operator): B takes the job and runs it while A's run goes on. A's heartbeat finds its
    lock gone and says so; A's end is not recorded over B's run."""
    engine = board_of(app).engine
    started = {"A": threading.Event(), "B": threading.Event()}
    go_on = {"A": threading.Event(), "B": threading.Event()}

    def slow(_: JobContext) -> str:
        me = threading.current_thread().name
        started[me].set()
        assert go_on[me].wait(30)
        return f"done by {me}"

    board = JobBoard(engine, [Job("slow", 60, slow)])
    outcomes: dict[str, list[Outcome]] = {"A": [], "B": []}
    workers = {n: Worker(board, lock_factory(engine, "/nonexistent"), name=f"{n}:1",
                         report=outcomes[n].append) for n in ("A", "B")}
    threads = {n: threading.Thread(target=workers[n].tick, name=n) for n in ("A", "B")}
    threads["A"].start()
    try:
        assert started["A"].wait(30)
        with engine.begin() as conn:  # A's lock session goes; waits until it has ended
            [pid] = conn.execute(text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
                "AND database = (SELECT oid FROM pg_database WHERE datname = "
                "current_database())"), {"c": LOCK_CLASS}).scalars().all()
            assert conn.execute(text("SELECT pg_terminate_backend(:p, 10000)"),
                                {"p": pid}).scalar()
        with caplog.at_level(logging.ERROR, logger="core.worker"):
            workers["A"].beat()
        assert "worker A:1 lost the lock of job slow mid-run" in caplog.text
        threads["B"].start()
        assert started["B"].wait(30)  # B took the job over: A's run recorded as lost
        go_on["A"].set()
        threads["A"].join(30)
        [a] = outcomes["A"]
        assert not a.ok and "lost the job's lock mid-run (done by A)" in a.message
        [state] = board.status()
        assert state["running_on"] == "B:1"  # A's end did not clear B's run
        assert [r["outcome"] for r in state["runs"]] == ["running", "lost"]
    finally:
        go_on["A"].set()
        go_on["B"].set()
        for thread in threads.values():
            if thread.is_alive() or thread.ident is not None:
                thread.join(30)
    [state] = board.status()
    assert [(r["worker"], r["outcome"]) for r in state["runs"]] == [("B:1", "ok"),
                                                                    ("A:1", "lost")]
    assert (state["runs_ok"], state["runs_error"], state["runs_lost"]) == (1, 0, 1)
    assert state["running_on"] is None and state["last_outcome"] == "ok"


def test_sqlite_job_locks_sit_beside_the_database_whatever_the_data_folder(
        tmp_path: Path) -> None:
    """Two workers on one SQLite database with different data folders (MLANE_DATA_DIR)
    still exclude each other: the locks are the database's, not the data folder's."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db' / 'meterlane.db'}")
    try:
        first = lock_factory(engine, str(tmp_path / "data-a"))("tally")
        second = lock_factory(engine, str(tmp_path / "data-b"))("tally")
        assert isinstance(first, FileLock) and isinstance(second, FileLock)
        assert first.path == (tmp_path / "db").resolve() / "meterlane.db.jobs" / "tally.lock"
        assert first.acquire()
        try:
            assert not second.acquire()
        finally:
            first.release()
        assert second.acquire()
        second.release()
    finally:
        engine.dispose()
