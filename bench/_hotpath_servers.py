"""The targets of bench/hotpath.py, started side by side: the fake upstream (direct), the bare
forwarder (bench/bare_forwarder.py) and `meterlane serve` on SQLite (the embedded default, no
plans), on Postgres + Redis with limits on (the plan of bench/_storeload.py) and, when asked
for, on Postgres without plans: what the limits cost is the difference of the last two."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._limitsgw import QUOTA_HEADER, first_reply_headers
from bench._load import Target
from bench._procs import (
    ROOT,
    BenchError,
    Processes,
    children_of,
    cli,
    free_port,
    log,
    postgres_database,
    serve_env,
    start_serve,
    start_upstream,
    wait_healthy,
    write_config,
)
from bench._report import ledger_check, ledger_requests, metered_phase
from bench._storeload import BENCH_PLAN_TOML

USER = "bench-user"
PATH = "/v1/chat/completions"
# The names of the targets, in the order of the tables.
DIRECT, BARE, ML_SQLITE, ML_PG = "direct", "bare", "ml-sqlite", "ml-pg+redis"
ML_PG_OFF = "ml-pg"  # Postgres, no plans: limits off
# Postgres, the bench plan's limits counted in each worker's memory (bench/_memlimits.py):
# what the limits cost when no call leaves the worker, the ceiling of reserving ahead
ML_PG_MEM = "ml-pg+memory"
LIMITED = (ML_PG, ML_PG_MEM)  # the targets whose replies carry the quota header


@dataclass
class Servers:
    """Every target of the run, its workers (for RSS and py-spy) and, for Meterlane's, the
    ledger phases (requests sent, ledger rows added) of the ledger check."""

    targets: dict[str, Target] = field(default_factory=dict)
    workers: dict[str, list[int]] = field(default_factory=dict)
    masters: dict[str, int] = field(default_factory=dict)
    beside: dict[str, list[int]] = field(default_factory=dict)  # jobs worker, tokenizer
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    phases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    upstream_pid: int = 0
    upstream_base: str = ""
    since: str = ""

    def metered(self, name: str) -> bool:
        return name in self.phases

    def phase(self, target: Target, label: str,
              fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a load against a target; for Meterlane's, count the ledger rows it added."""
        if not self.metered(target.name):
            return fn()
        result, phase = metered_phase(target, self.since, label, fn)
        self.phases[target.name].append(phase)
        return result

    def ledger_checks(self) -> dict[str, dict[str, Any]]:
        return {name: ledger_check(phases, ledger_requests(self.targets[name], self.since))
                for name, phases in self.phases.items()}


def headers_for(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Meterlane-User": USER,
            "Content-Type": "application/json"}


def start_bare(procs: Processes, upstream_base: str, workers: int, tmp: Path
               ) -> tuple[int, int, list[int]]:
    port = free_port()
    log_path = tmp / "bare.log"
    proc = procs.start("bare forwarder", [
        sys.executable, "-m", "bench.bare_forwarder", "--upstream", upstream_base,
        "--port", str(port), "--workers", str(workers)],
        stop_signal=signal.SIGINT, cwd=ROOT, stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT)
    wait_healthy(proc, port, workers, log_path)
    return proc.pid, port, children_of(proc.pid)


def start_all(args: argparse.Namespace, procs: Processes, tmp: Path, prefix: str,
              dbs: list[str], since: str) -> Servers:
    s = Servers(since=since)
    upstream, base = start_upstream(procs, tmp)
    s.upstream_pid, s.upstream_base = upstream.pid, base
    log(f"fake upstream at {base} (pid {upstream.pid})")
    host, port = re.match(r"http://([^:/]+):(\d+)", base).groups()  # type: ignore[union-attr]
    s.targets[DIRECT] = Target(DIRECT, host, int(port), PATH, headers_for("sk-bench"))
    s.workers[DIRECT] = [upstream.pid]

    master, bport, workers = start_bare(procs, base, args.workers, tmp)
    s.targets[BARE] = Target(BARE, "127.0.0.1", bport, PATH, headers_for("sk-bench"))
    s.workers[BARE], s.masters[BARE] = workers, master
    log(f"bare forwarder on 127.0.0.1:{bport} (master {master}, workers {workers})")

    extra: dict[str, str] = {}
    if args.key_cache_seconds is not None:
        extra["MLANE_KEY_CACHE_SECONDS"] = str(args.key_cache_seconds)
    for name in args.setups:
        if name == ML_SQLITE:
            write_config(tmp / "sqlite.toml", base)
            env = serve_env(tmp / "sqlite.toml", tmp / "var-sqlite", **extra)
        elif name in (ML_PG_OFF, ML_PG_MEM):
            suffix = "off" if name == ML_PG_OFF else "mem"
            write_config(tmp / f"pg-{suffix}.toml", base, "" if name == ML_PG_OFF else
                         BENCH_PLAN_TOML.replace('store = "redis"', 'store = "sql"'))
            database = f"{args.postgres_db}_{suffix}"
            if len(database.encode()) > 63:  # Postgres would cut it, maybe to another's name
                raise BenchError(f"database name {database!r} is longer than 63 bytes")
            url = postgres_database(args.postgres_url, database)
            dbs.append(database)
            env = serve_env(tmp / f"pg-{suffix}.toml", tmp / f"var-pg-{suffix}",
                            MLANE_DATABASE_URL=url, **extra)
            if name == ML_PG_MEM:  # `python -m bench._memlimits_serve` from the work dir
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
            log(f"created database {database}; {cli(env, 'db', 'upgrade').strip()}")
        else:
            write_config(tmp / "pg.toml", base, BENCH_PLAN_TOML)
            url = postgres_database(args.postgres_url, args.postgres_db)
            dbs.append(args.postgres_db)
            env = serve_env(tmp / "pg.toml", tmp / "var-pg", MLANE_DATABASE_URL=url,
                            MLANE_REDIS_URL=args.redis_url, MLANE_REDIS_PREFIX=prefix, **extra)
            log(f"created database {args.postgres_db}; {cli(env, 'db', 'upgrade').strip()}")
        key = cli(env, "keys", "create", "--role", "app", "--app",
                  "bench").strip().splitlines()[-1]
        served = start_serve(procs, env, workers=args.workers, cwd=tmp,
                             log_path=tmp / f"serve-{name}.log", name=f"meterlane serve ({name})",
                             module="bench._memlimits_serve" if name == ML_PG_MEM else "app")
        s.targets[name] = Target(name, "127.0.0.1", served.port, PATH, headers_for(key))
        s.workers[name], s.beside[name] = served.workers, served.beside
        s.masters[name], s.envs[name] = served.proc.pid, env
        s.phases[name] = []
        log(f"{name}: meterlane serve on 127.0.0.1:{served.port} (master {served.proc.pid}, "
            f"workers {served.workers})")
    return s


def check_wiring(s: Servers, body: bytes) -> None:
    """Limits must be on in the Postgres + Redis gateway (its reply carries the quota header),
    off on SQLite; the bare forwarder must answer as the upstream does."""
    for name, target in s.targets.items():
        def one(t: Target = target) -> dict[str, Any]:
            status, headers = first_reply_headers(t, body)
            one.headers = headers  # type: ignore[attr-defined]
            return {"tool": "python", "sent": 1, "ok_2xx": int(status == 200),
                    "non_2xx": int(status != 200), "abandoned_in_flight": 0, "status": status}

        result = s.phase(target, "wiring check", one)
        quota = QUOTA_HEADER.lower() in one.headers  # type: ignore[attr-defined]
        if result["status"] != 200 or quota != (name in LIMITED):
            raise BenchError(f"{name}: status {result['status']}, {QUOTA_HEADER} "
                             f"{'present' if quota else 'absent'}: not the target it should be")
        if name == ML_PG_MEM and (rows := database_limit_rows(s.envs[name])):
            raise BenchError(f"{name}: its call left {rows} limit rows in the database: its "
                             "workers count the limits there, not in their memory")
    log("wiring: limits on in ml-pg+redis and ml-pg+memory (quota header; ml-pg+memory's "
        "not in its database), off elsewhere; every target answers")


def database_limit_rows(env: dict[str, str]) -> int:
    """Rows of the SQL limit store (counters and leases) in the database a serve uses."""
    import sqlalchemy as sa

    engine = sa.create_engine(env["MLANE_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT (SELECT count(*) FROM limit_counters) "
                "+ (SELECT count(*) FROM limit_leases)")).scalar_one())
    finally:
        engine.dispose()
