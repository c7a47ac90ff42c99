"""bench/hotpath.py in a tiny run: every target starts (the fake upstream, the bare forwarder,
`meterlane serve` on Postgres + Redis with limits on, the stage-timed app), every scenario runs
under wrk, the table has every row, and the Meterlane ledger holds exactly one row per request
the run sent. It checks the harness, not the figures: one second per measurement on a shared
machine says nothing about speed. Three Meterlane setups: Postgres + Redis with limits on, the
one with the most of the harness behind it (the database made and dropped, the limit store and
its keys, the judged targets, the limits' stage in the profile), Postgres without limits beside
it (what they cost), and Postgres with the limits in each worker's memory (what they cost with
no round trip). Each setup costs about 20 s of this test; SQLite's serve runs in
tests/e2e/test_serve.py, test_worker.py and test_demo.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from bench._hotpath_report import METRICS
from bench._hotpath_servers import BARE, DIRECT, ML_PG, ML_PG_MEM, ML_PG_OFF

ROOT = Path(__file__).parents[2]


def test_the_hotpath_bench_runs_every_target_and_the_ledgers_match(
        pg_server: str, redis_server: str, tmp_path: Path) -> None:
    # CI installs wrk (.ci/run), as it installs chromium: the test needs it, never skips.
    assert shutil.which("wrk"), "wrk is not installed: apt-get install -y wrk"
    out = tmp_path / "hotpath.json"
    db = (os.environ.get("MLANE_TEST_DB_PREFIX", "") + "mlane_hotpath_smoke_"
          + os.environ.get("PYTEST_XDIST_WORKER", "main"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    done = subprocess.run(
        [sys.executable, "bench/hotpath.py",
         "--setups", "postgres-nolimits,postgres-memlimits,postgres",
         "--duration", "1", "--rounds", "1", "--warmup", "1", "--rss-streams", "20",
         "--rss-seconds", "2", "--rss-ramp-seconds", "0.5", "--profile",
         "--profile-seconds", "1", "--postgres-url", pg_server, "--postgres-db", db,
         "--redis-url", redis_server, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    text = done.stdout

    header = next(line for line in text.splitlines() if line.startswith("| | "))
    assert header == f"| | {DIRECT} | {BARE} | {ML_PG_OFF} | {ML_PG_MEM} | {ML_PG} |"
    for label, *_ in METRICS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {label} |")),
                   None)
        assert row is not None, f"no row {label!r} in:\n{text}"
        assert len(row.split("|")) == 8 and "nan" not in row, row
    assert "| RSS MB, largest worker, 20 open streams |" in text
    for target in ("added p50 at c=1", "added p99 at c=1", "c=32 throughput",
                   "streamed TTFT added", "RSS per worker"):
        assert f"{ML_PG}: {target}" in text
    assert "Wall time per stage, ml-pg+redis" in text
    # (the ledger write is off the call's path: its stage is timed outside a request)
    assert "| limits reserve |" in text and "| ledger write (group commit) [outside" in text

    result = json.loads(out.read_text())
    assert list(result["ledger_checks"]) == [ML_PG_OFF, ML_PG_MEM, ML_PG]
    for name in (ML_PG_OFF, ML_PG_MEM, ML_PG):
        check = result["ledger_checks"][name]
        # every request sent through the run (wrk, the stream client, the open streams, the
        # stage-timed server) left exactly one ledger row
        assert check["ok"], check
        assert check["ledger_rows"] == check["sent"] > 0
        assert {p["phase"] for p in check["phases"]} >= {
            "r1 c1 " + name, "r1 c32 " + name, "r1 stream " + name, "r1 s32 " + name,
            f"rss 20 streams {name}"}
    for name in (BARE, ML_PG_OFF, ML_PG_MEM, ML_PG):
        rss = result["rss"][name]
        assert rss["ok"] == 20 and rss["failed"] == 0 and rss["all_open"], rss
    engine = sa.create_engine(pg_server)
    try:
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname IN "
                                     "(:db, :off, :mem)"),
                                {"db": db, "off": f"{db}_off", "mem": f"{db}_mem"}).all()
    finally:
        engine.dispose()
    assert left == []  # every database dropped at the end



def test_the_limits_ceiling_counts_every_call_in_memory(pg_server: str) -> None:
    """bench/call_cpu.py --setup postgres+memory: the bench plan's limits held in the
    process's memory (bench/_memlimits.py) are on the call's path and count every call; a
    store that was not swapped in, or a call that skipped the limits, fails the run."""
    db = (os.environ.get("MLANE_TEST_DB_PREFIX", "") + "mlane_callcpu_smoke_"
          + os.environ.get("PYTEST_XDIST_WORKER", "main"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    done = subprocess.run(
        [sys.executable, "bench/call_cpu.py", "--setup", "postgres+memory", "--calls", "40",
         "--rounds", "1", "--warmup", "5", "--postgres-url", pg_server, "--postgres-db", db],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    assert "the memory store counted 45 requests for 45 calls" in done.stdout
    assert "us/call (postgres+memory)" in done.stdout
