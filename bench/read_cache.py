"""A burst of calls on a lapsed key and plan in one gevent worker: how many database reads,
how long the burst takes, how many calls time out waiting for a pooled connection.

Each round caches the key and the end user's plan, lets them lapse (a real wait of the TTL),
then starts `--calls` greenlets at once, each authenticating the key and reading the plan,
as the gateway does at the start of every call. `--db-latency-ms` holds each of those reads'
connection that much longer (a slow or busy database). It uses only the services' public
API, so the same script measures an older checkout (PYTHONPATH=<that tree>).

    python bench/read_cache.py --calls 200 --db-latency-ms 20
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402 - the imports after gevent's patching, as in a gunicorn gevent worker
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if "PYTHONPATH" not in os.environ:  # else the tree it names (an older checkout)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from core.auth import AuthService, Role, issue_in
from core.config import Config
from core.db import make_engine
from core.tenancy import TenancyService
from migrations.schema import upgrade
from plans.catalog import parse_plans
from plans.service import PlanService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--db", default=f"mlane_readcache_{os.getpid()}")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=0.5, help="cache seconds (short: a "
                        "round waits it out)")
    parser.add_argument("--db-latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    admin = create_engine(f"{args.postgres_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{args.db}"'))
        conn.execute(text(f'CREATE DATABASE "{args.db}"'))
    config = Config()
    engine = make_engine(f"{args.postgres_url}/{args.db}", pool_size=config.db_pool_size,
                         max_overflow=config.db_max_overflow,
                         pool_timeout=config.db_pool_timeout)
    try:
        print(json.dumps(run(engine, args)))
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)'))
        admin.dispose()


def run(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    upgrade(engine)
    auth = AuthService(engine, cache_seconds=args.ttl)
    tenancy = TenancyService(engine)
    plans = PlanService(engine, parse_plans(({"id": "free", "default": True},), ""),
                        cache_seconds=args.ttl)
    with engine.begin() as conn:
        key = issue_in(conn, role=Role.APP, app_id=tenancy.ensure_app("acme")[0],
                       end_user_id=None)[0]
    user = tenancy.ensure_end_user(tenancy.ensure_app("acme")[0], "alice")
    reads = {"key": 0, "plan": 0}

    @event.listens_for(engine, "after_cursor_execute")
    def counted(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        what = ("key" if "api_keys.secret_sha256" in statement
                else "plan" if "FROM end_user_plans" in statement else None)
        if what is not None:
            reads[what] += 1
            if args.db_latency_ms:
                time.sleep(args.db_latency_ms / 1000)  # gevent's: the connection stays held

    def call() -> float:
        t0 = time.perf_counter()
        principal = auth.authenticate(key)
        plans.plan_of(user)
        assert principal.app_id is not None
        return time.perf_counter() - t0

    out = []
    for _ in range(args.rounds):
        call()  # cached
        time.sleep(args.ttl * 1.05)  # lapsed (a benchmark may wait: nothing to sync with)
        reads.update(key=0, plan=0)
        t0 = time.perf_counter()
        jobs = [gevent.spawn(call) for _ in range(args.calls)]
        gevent.joinall(jobs)
        wall = time.perf_counter() - t0
        timeouts = sum(isinstance(j.exception, PoolTimeoutError) for j in jobs)
        lat = sorted(j.value for j in jobs if j.successful())
        out.append({"key_reads": reads["key"], "plan_reads": reads["plan"],
                    "wall_ms": round(wall * 1000, 1),
                    "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
                    "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                    "pool_timeouts": timeouts,
                    "failed": sum(not j.successful() for j in jobs),
                    "errors": sorted({type(j.exception).__name__ for j in jobs
                                      if not j.successful()})})
    return {"calls": args.calls, "db_latency_ms": args.db_latency_ms, "ttl": args.ttl,
            "pool": [engine.pool.size(), engine.pool._max_overflow,  # noqa: SLF001
                     engine.pool._timeout], "rounds": out}  # noqa: SLF001


if __name__ == "__main__":
    main()
