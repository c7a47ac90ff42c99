"""CPU of one non-streamed gateway call, in-process (issue 20): no gunicorn, no load generator.

The serving app (app.serving_app, as `meterlane serve` builds it in a worker) is called as a
WSGI application with a prepared environ, many times in a row, against the fake upstream (its
own process). What is timed is the CPU of the thread that runs the request (time.thread_time:
its waits for the upstream and the ledger cost nothing), and the process's (the ledger
writer's thread included). --profile runs cProfile on the same thread's CPU clock, so that
waiting never counts; --sort cumtime shows where a call's CPU goes by caller.

    python bench/call_cpu.py                        # SQLite, no plans (the default install)
    python bench/call_cpu.py --setup postgres+redis --profile --sort cumtime
    python bench/call_cpu.py --setup bare           # the bare forwarder (bench/bare_forwarder.py)
    python bench/call_cpu.py --setup postgres+memory  # limits with no round trip: the ceiling

On a shared machine, compare two trees side by side (PYTHONPATH=<tree> for each, run in
turns); numbers of one run alone move by 15% with the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import chat_body  # noqa: E402
from bench._memlimits import MemoryLimitStore  # noqa: E402
from bench._procs import (  # noqa: E402
    Processes,
    cli,
    drop_postgres_database,
    postgres_database,
    serve_env,
    start_upstream,
    write_config,
)
from bench._storeload import BENCH_PLAN_TOML  # noqa: E402
from bench.bare_forwarder import UPSTREAM_ENV  # noqa: E402

PATH = "/v1/chat/completions"
SETUPS = ("bare", "sqlite", "sqlite+plans", "postgres", "postgres+plans", "postgres+redis",
          "postgres+memory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=SETUPS, default="sqlite",
                        help="the database, the limit store (Redis, else the database's) and "
                        "whether the bench plan's limits are on: the setups between the two "
                        "ends tell what each adds")
    parser.add_argument("--calls", type=int, default=3000, help="calls a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--postgres-url",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--postgres-db", default=f"mlane_callcpu_{os.getpid()}",
                        help="dropped and recreated, dropped at the end")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round")
    parser.add_argument("--dump", metavar="FILE", help="with --profile: also save the profile "
                        "(pstats; python -m pstats FILE, then callers isinstance)")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--lines", type=int, default=50)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="meterlane-callcpu-"))
    procs = Processes()
    prefix = f"callcpu{os.getpid()}:"
    postgres = args.setup.startswith("postgres")
    limits = args.setup.endswith(("+redis", "+plans", "+memory"))
    try:
        _up, base = start_upstream(procs, tmp)
        plans = BENCH_PLAN_TOML if limits else ""
        if args.setup.endswith(("+plans", "+memory")):  # the limits in the database's store
            plans = plans.replace('store = "redis"', 'store = "sql"')
        write_config(tmp / "config.toml", base, plans)
        extra: dict[str, str] = {}
        if postgres:
            extra.update(MLANE_DATABASE_URL=postgres_database(args.postgres_url,
                                                              args.postgres_db))
        if args.setup.endswith("+redis"):
            extra.update(MLANE_REDIS_URL=args.redis_url, MLANE_REDIS_PREFIX=prefix)
        env = serve_env(tmp / "config.toml", tmp / "var", **extra)
        if postgres:
            cli(env, "db", "upgrade")
        if args.setup == "bare":
            os.environ[UPSTREAM_ENV] = base
            call, store = _caller(None)
        else:
            key = cli(env, "keys", "create", "--role", "app", "--app", "bench").strip() \
                .splitlines()[-1]
            os.environ.clear()
            os.environ.update(env)
            call, store = _caller(key, memory=args.setup.endswith("+memory"))
        for _ in range(args.warmup):
            call()
        results = []
        for _ in range(args.rounds):
            thread, process = _round(call, args.calls)
            results.append(thread)
            print(f"request thread {thread:.0f} us/call, process {process:.0f} us/call",
                  flush=True)
        print(f"median of {args.rounds} rounds: request thread "
              f"{statistics.median(results):.0f} us/call ({args.setup})")
        if args.profile:
            profile = cProfile.Profile(time.thread_time)
            profile.runcall(lambda: [call() for _ in range(args.calls)])
            pstats.Stats(profile).sort_stats(args.sort).print_stats(args.lines)
            if args.dump:
                profile.dump_stats(args.dump)
        if store is not None:  # the ceiling did the limits' work: it counted every call
            made = args.warmup + args.calls * (args.rounds + int(args.profile))
            counted = store.counted("requests")
            print(f"the memory store counted {counted} requests for {made} calls")
            if counted != made:
                raise SystemExit("the memory store did not count every call")
        return 0
    finally:
        procs.stop_all()
        if args.setup.endswith("+redis"):
            from bench._redisbench import connect, delete_prefix

            delete_prefix(connect(args.redis_url), prefix)
        if postgres:
            drop_postgres_database(args.postgres_url, args.postgres_db)


def _caller(key: str | None, memory: bool = False
            ) -> tuple[Callable[[], None], MemoryLimitStore | None]:
    """One call through the serving app's WSGI interface, its answer read and closed (the
    request's log line is written then) as a server would. No key: the bare forwarder's.
    `memory`: the limits counted in this process's memory (bench/_memlimits.py), the store
    returned beside the call."""
    from app import serving_app
    from bench.bare_forwarder import create_app
    from core import logs

    logs.configure("text", stream=open(os.devnull, "w"))  # noqa: SIM115 - the process's
    app = serving_app() if key is not None else create_app()
    store = None
    if memory:
        store = app.extensions["wiring"].limits.store = MemoryLimitStore()
    body = chat_body(stream=False, words=16, chunk_delay_ms=0)
    base: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": PATH, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000", "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_AUTHORIZATION": f"Bearer {key}", "HTTP_X_METERLANE_USER": "bench-user",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body))}
    status: list[str] = []

    def start_response(line: str, _headers: Any, _exc_info: Any = None) -> Any:
        status.append(line)
        return None

    def call() -> None:
        status.clear()
        answer = app(dict(base, **{"wsgi.input": io.BytesIO(body)}), start_response)
        try:
            for _chunk in answer:
                pass
        finally:
            answer.close()
        if not status or not status[0].startswith("200"):
            raise RuntimeError(f"the call answered {status}")

    return call, store


def _round(call: Callable[[], None], calls: int) -> tuple[float, float]:
    """CPU microseconds a call: the request's thread, the whole process."""
    thread, process = time.thread_time(), time.process_time()
    for _ in range(calls):
        call()
    return ((time.thread_time() - thread) / calls * 1e6,
            (time.process_time() - process) / calls * 1e6)


if __name__ == "__main__":
    sys.exit(main())
