"""`meterlane worker`: two real worker processes share the scheduled jobs, each job on one at
a time; one is killed (SIGKILL) in the middle of a run and the other takes its jobs over, the
killed run recorded as lost. On Postgres (+ Redis) the lock is an advisory lock, on the
embedded SQLite a file lock. And `meterlane serve` on the embedded default runs a worker
beside itself, started again if it dies, stopped with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.events import EventService
from core.models import JobRun, JobState
from core.tenancy import TenancyService
from tests.e2e.test_serve import cli, free_port, served_engine, wait_ready
from tests.support.polling import wait_for
from tests.support.services import create_database

pytestmark = pytest.mark.e2e
JOBS = ("webhooks", "notices", "overage", "credits", "rollup", "limits", "quarantine",
        "idempotency")
INTERVALS = ("webhooks=1,notices=2,overage=2,credits=2,rollup=2,limits=2,quarantine=2,"
             "idempotency=2")


@pytest.fixture()
def hanging_receiver() -> Iterator[str]:
    """A webhook receiver that takes the connection and never answers: a delivery to it
    holds the webhooks job for its read timeout (10 s)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


def environment(backend: str, tmp_path: Path, pg_server: str, redis_server: str
                ) -> tuple[dict[str, str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    env.update(MLANE_DATA_DIR=str(tmp_path / "var"), MLANE_JOB_INTERVALS=INTERVALS,
               MLANE_WEBHOOKS_ALLOW_PRIVATE="1")
    if backend == "sqlite":
        (tmp_path / "var").mkdir()
        return env, f"sqlite:///{tmp_path / 'var' / 'meterlane.db'}"
    url = create_database(pg_server, f"mlane_jobs_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    env.update(MLANE_DATABASE_URL=url, MLANE_REDIS_URL=redis_server,
               MLANE_REDIS_PREFIX=f"jobs{os.getpid()}:")
    return env, url


def a_pending_webhook(engine: Engine, url: str) -> None:
    """An event for app acme, whose endpoint is `url`."""
    app_id, _ = TenancyService(engine).ensure_app("acme")
    events = EventService(engine, allow_private=True)
    events.set_endpoint(app_id, url)
    with engine.begin() as conn:
        events.publish_in(conn, app_id, "test.ping", {"n": 1})


def runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(JobRun).order_by(JobRun.id)))


def state(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(JobState).where(JobState.name == name)).first()


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_killed_workers_jobs_pass_to_the_other_worker(
        backend: str, tmp_path: Path, pg_server: str, redis_server: str,
        hanging_receiver: str) -> None:
    env, url = environment(backend, tmp_path, pg_server, redis_server)
    assert cli(env, "db", "upgrade").returncode == 0
    engine = served_engine(env, url)
    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in (1, 2)]
    try:
        a_pending_webhook(engine, hanging_receiver)
        # one worker takes the webhooks job and hangs on the delivery; the other cannot run it
        holder = wait_for(lambda: (s := state(engine, "webhooks")) and s.running_on,
                          about="a worker running the webhooks job")
        pid = int(holder.rsplit(":", 1)[1])
        victim = next(w for w in workers if w.pid == pid)
        survivor = next(w for w in workers if w.pid != pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = datetime.now().astimezone()
        other = f"{holder.rsplit(':', 1)[0]}:{survivor.pid}"

        def taken_over() -> bool:
            done = runs(engine)
            lost = [r for r in done if r.job == "webhooks" and r.outcome == "lost"
                    and r.worker == holder]
            after = {r.job for r in done if r.worker == other and r.outcome == "ok"
                     and r.started_at > killed_at}
            return bool(lost) and after == set(JOBS)

        wait_for(taken_over, timeout=60, about="the survivor running every job")
        assert survivor.poll() is None
        webhooks = state(engine, "webhooks")
        assert webhooks.runs_lost == 1 and webhooks.last_outcome == "ok"
        # never two runs of one job at once: each run starts after the one before ended
        for job in JOBS:
            mine = [r for r in runs(engine) if r.job == job and r.outcome != "lost"]
            for before, after in zip(mine, mine[1:], strict=False):
                assert before.finished_at is not None and before.finished_at <= after.started_at
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0  # stops after the run in progress
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        engine.dispose()


def test_serve_on_the_embedded_default_runs_the_jobs_and_stops_its_worker(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    env.update(MLANE_DATA_DIR=str(tmp_path / "var"), MLANE_JOB_INTERVALS=INTERVALS)
    admin = cli(env, "keys", "create", "--role", "admin").stdout.split()[-1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "serve.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        # the app key from the admin's, over HTTP (not a second `meterlane keys create`)
        made = httpx.post(f"{base}/v1/keys", json={"role": "app", "app": "acme"},
                          headers={"Authorization": f"Bearer {admin}"})
        assert made.status_code == 201, made.text
        app_key = made.json()["key"]

        def listed() -> list[dict[str, Any]] | None:
            jobs = httpx.get(f"{base}/v1/admin/jobs",
                             headers={"Authorization": f"Bearer {admin}"}).json()["jobs"]
            return jobs if all(j["runs_ok"] >= 2 for j in jobs) else None

        jobs = wait_for(listed, about="every job run twice by the worker beside serve")
        assert {j["name"] for j in jobs} == set(JOBS)
        assert all(j["runs"][0]["outcome"] in ("ok", "running") for j in jobs)
        worker_pid = int(jobs[0]["runs"][-1]["worker"].rsplit(":", 1)[1])
        assert httpx.get(f"{base}/v1/admin/jobs", headers={
            "Authorization": f"Bearer {app_key}"}).status_code == 403
        metrics = httpx.get(f"{base}/metrics").text
        assert 'meterlane_job_runs_total{job="webhooks",outcome="ok"}' in metrics
        assert httpx.get(f"{base}/readyz").status_code == 200

        # the worker dies (a crash, the OOM killer): serve starts another, the jobs go on
        os.kill(worker_pid, signal.SIGKILL)

        def run_by_another() -> int | None:
            jobs = httpx.get(f"{base}/v1/admin/jobs",
                             headers={"Authorization": f"Bearer {admin}"}).json()["jobs"]
            pids = {int(r["worker"].rsplit(":", 1)[1]) for j in jobs for r in j["runs"]
                    if r["outcome"] == "ok"}
            return next(iter(pids - {worker_pid}), None)

        second_pid = wait_for(run_by_another, about="a job run by the worker started again")
        assert f"the worker beside serve (pid {worker_pid}) exited" in \
            (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)

    def gone() -> bool:
        for pid in (worker_pid, second_pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(gone, timeout=30, about="the workers stopping with serve")


def test_serve_with_worker_on_postgres_runs_the_jobs_inside_serve(
        tmp_path: Path, pg_server: str, redis_server: str) -> None:
    """`serve --with-worker` on Postgres (a single machine): the worker is serve's child,
    runs every job (advisory locks), and stops with serve."""
    env, url = environment("postgres", tmp_path, pg_server, redis_server)
    assert cli(env, "db", "upgrade").returncode == 0
    admin = cli(env, "keys", "create", "--role", "admin").stdout.split()[-1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port),
                             "--workers", "1", "--with-worker"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "serve.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    engine = served_engine(env, url)
    try:
        wait_ready(proc, base)

        def listed() -> list[dict[str, Any]] | None:
            jobs = httpx.get(f"{base}/v1/admin/jobs",
                             headers={"Authorization": f"Bearer {admin}"}).json()["jobs"]
            return jobs if all(j["runs_ok"] >= 2 for j in jobs) else None

        jobs = wait_for(listed, about="every job run twice by the worker inside serve")
        assert {j["name"] for j in jobs} == set(JOBS)
        workers = {r.worker for r in runs(engine)}
        assert len(workers) == 1, workers  # one worker, serve's
        worker_pid = int(workers.pop().rsplit(":", 1)[1])
        parent = Path(f"/proc/{worker_pid}/status").read_text()
        assert f"PPid:\t{proc.pid}\n" in parent  # serve's child
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["jobs"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        engine.dispose()

    def gone() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=30, about="the worker stopping with serve")


def test_worker_once_writes_one_json_line_per_job(tmp_path: Path) -> None:
    """MLANE_LOG_FORMAT=json: the worker's lines are the serve's format, one per job run."""
    import json

    env = {**os.environ, "MLANE_DATA_DIR": str(tmp_path / "data"), "MLANE_LOG_FORMAT": "json"}
    for name in ("MLANE_DATABASE_URL", "MLANE_CONFIG", "MLANE_REDIS_URL"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "app", "worker", "--once"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    runs = {line["job"]: line for line in lines if line.get("event") == "job"}
    assert sorted(runs) == sorted(JOBS), lines
    for job, line in runs.items():
        assert line["outcome"] == "ok" and line["level"] == "info", line
        assert line["msg"] == f"job {job} ok" and line["duration_ms"] >= 0
        assert line["detail"] and line["logger"] == "meterlane.worker"
