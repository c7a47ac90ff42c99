"""Gateway overhead: the same OpenAI call sent straight to an upstream and through Meterlane.

One run starts the fake upstream (tests.support.upstream) and a real `meterlane serve`
(gunicorn + gevent, metering on: every call writes a ledger row), then measures, in
interleaved rounds, direct vs gateway:

  * non-streaming chat completion at concurrency 1 (wrk --latency): p50 / p99 / mean latency
    and the latency the gateway adds;
  * non-streaming at concurrency 32 (wrk): requests per second;
  * streaming (16 content chunks) at concurrency 1 (a small http.client client): time to
    first token and total time.

It prints a table, writes a JSON result file (--out), checks that the ledger holds exactly one
row per request sent to the gateway, and stops everything it started (also on Ctrl-C).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/: the repository root makes `bench` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import Target, chat_body, run_python_client, run_wrk
from bench._procs import (
    BenchError,
    CpuProbe,
    Processes,
    cli,
    git_version,
    guarded,
    log,
    pids_named,
    postgres_database,
    remove_leftovers,
    serve_env,
    start_serve,
    start_upstream,
    write_config,
)
from bench._profile import analyse_profile, print_profile, profile_workers
from bench._report import (
    check_targets,
    ledger_check,
    ledger_requests,
    metered_phase,
    print_table,
    summarise,
)

USER = "bench-user"
WRK_INSTALL = "apt-get update && apt-get install -y wrk"


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - a linear script
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="server to create the bench database on (any database on it)")
    parser.add_argument("--postgres-db", default=None,
                        help="database dropped and recreated for the run "
                             "(default mlane_bench_<pid>, so that runs never collide)")
    parser.add_argument("--keep-db", action="store_true", help="do not drop it afterwards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (1 keeps the load generator to about one core)")
    parser.add_argument("--words", type=int, default=16, help="completion tokens per reply")
    parser.add_argument("--chunk-delay-ms", type=float, default=1.0,
                        help="upstream delay between stream chunks (fake.chunk_delay_ms)")
    parser.add_argument("--key-cache-seconds", type=float, default=None,
                        help="MLANE_KEY_CACHE_SECONDS for the gateway (default: the service's)")
    parser.add_argument("--scenarios", default="c1,c32,stream",
                        help="comma-separated subset of c1,c32,stream")
    parser.add_argument("--loadgen", choices=("wrk", "python"), default="wrk",
                        help="python: c=1 with http.client and no c=32 run (see README)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, py-spy the workers under a c=32 gateway run")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument("--profile-idle", action="store_true",
                        help="sample idle time too (py-spy --idle): shares are then of wall "
                             "time, which shows a worker blocked in a non-cooperative call")
    parser.add_argument("--out", type=Path, default=Path("/tmp/meterlane-bench.json"))
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs, config, SQLite file")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.postgres_db = args.postgres_db or f"mlane_bench_{os.getpid()}"
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        print(f"wrk is not installed; it is the load generator for the non-streaming runs.\n"
              f"Install it with:  {WRK_INSTALL}\n"
              "or run with --loadgen python (c=1 only: a Python load generator would share the "
              "2 cores with the gateway and cap the c=32 figure, so that run is skipped).",
              file=sys.stderr)
        return 2
    if args.loadgen == "python" and "c32" in scenarios:
        log("--loadgen python: skipping the c=32 throughput run (it would measure the client)")
        scenarios.remove("c32")

    load_at_start = Path("/proc/loadavg").read_text().split()[:3]
    code_version = git_version()  # at start: the workers import the code when they start
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="meterlane-bench-"))
    dbs: list[str] = []

    def body() -> int:
        log(f"work dir {tmp}")
        upstream_proc, upstream_base = start_upstream(procs, tmp)
        log(f"fake upstream at {upstream_base} (pid {upstream_proc.pid})")
        write_config(tmp / "meterlane.toml", upstream_base)
        env = serve_env(tmp / "meterlane.toml", tmp / "var")
        if args.key_cache_seconds is not None:
            env["MLANE_KEY_CACHE_SECONDS"] = str(args.key_cache_seconds)
        if args.database == "postgres":
            db_url = postgres_database(args.postgres_url, args.postgres_db)
            if not args.keep_db:
                dbs.append(args.postgres_db)
            env["MLANE_DATABASE_URL"] = db_url
            log(f"created database {args.postgres_db}; {cli(env, 'db', 'upgrade').strip()}")
        key = cli(env, "keys", "create", "--role", "app", "--app", "bench").strip().splitlines()[-1]
        served = start_serve(procs, env, workers=args.workers, cwd=tmp,
                             log_path=tmp / "serve.log")
        serve, port, workers = served.proc, served.port, served.workers
        log(f"meterlane serve on 127.0.0.1:{port} (master {serve.pid}, workers {workers})")

        up_host, up_port = re.match(r"http://([^:/]+):(\d+)", upstream_base).groups()  # type: ignore[union-attr]
        gateway = Target("gateway", "127.0.0.1", port, "/v1/chat/completions",
                         {"Authorization": f"Bearer {key}", "X-Meterlane-User": USER,
                          "Content-Type": "application/json"})
        direct = Target("direct", up_host, int(up_port), "/v1/chat/completions",
                        {"Authorization": "Bearer sk-bench", "X-Meterlane-User": USER,
                         "Content-Type": "application/json"})
        since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        plain = chat_body(stream=False, words=args.words, chunk_delay_ms=0)
        streamed = chat_body(stream=True, words=args.words, chunk_delay_ms=args.chunk_delay_ms)
        probe = CpuProbe({"gateway workers": workers, "gateway master": [serve.pid],
                          "fake upstream": [upstream_proc.pid]},
                         {"postgres (all processes)": lambda: pids_named("postgres")}
                         if args.database == "postgres" else {})

        phases: list[dict[str, Any]] = []
        ledger_before = ledger_requests(gateway, since)
        if ledger_before:
            raise BenchError(f"the fresh ledger already has {ledger_before} rows")

        def gateway_phase(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            result, phase = metered_phase(gateway, since, name, fn)
            phases.append(phase)
            return result

        def nonstream(target: Target, conns: int, seconds: int,
                      use_probe: bool = False) -> Callable[[], dict[str, Any]]:
            if args.loadgen == "python":
                return lambda: run_python_client(target, plain, duration=seconds, stream=False,
                                                 probe=probe if use_probe else None)
            return lambda: run_wrk(target, plain, connections=conns, threads=args.wrk_threads,
                                   duration=seconds, workdir=tmp, procs=procs,
                                   probe=probe if use_probe else None)

        def measure(target: Target, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            result = gateway_phase(name, fn) if target is gateway else fn()
            lat = result.get("ttft_ms") or result["latency_ms"]
            log(f"  {name:<28} {result['rps']:>8.0f} req/s  p50 {lat['p50']:.3f} ms  "
                f"p99 {lat['p99']:.3f} ms")
            return result

        # Warm-up: connections, worker caches (key, end user), SQLAlchemy statement caches.
        log("warming up")
        for target in (direct, gateway):
            measure(target, f"warmup {target.name} c=8",
                    nonstream(target, min(8, args.concurrency), args.warmup))
            measure(target, f"warmup {target.name} stream", lambda t=target: run_python_client(
                t, streamed, duration=min(2, args.warmup), stream=True, probe=None))

        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = (direct, gateway) if r % 2 == 0 else (gateway, direct)
            log(f"round {r + 1}/{args.rounds} ({order[0].name} first)")
            res: dict[str, Any] = {}
            if "c1" in scenarios:
                res["c1"] = {t.name: measure(t, f"r{r + 1} c=1 {t.name}",
                                             nonstream(t, 1, args.duration, use_probe=True))
                             for t in order}
            if "c32" in scenarios:
                res["c32"] = {t.name: measure(t, f"r{r + 1} c={args.concurrency} {t.name}",
                                              nonstream(t, args.concurrency, args.duration,
                                                        use_probe=True)) for t in order}
            if "stream" in scenarios:
                res["stream"] = {t.name: measure(t, f"r{r + 1} stream {t.name}",
                                                 lambda t=t: run_python_client(
                                                     t, streamed, duration=args.duration,
                                                     stream=True, probe=probe)) for t in order}
            rounds.append(res)

        profile: dict[str, Any] | None = None
        if args.profile:
            if args.loadgen != "wrk":
                raise BenchError("--profile needs wrk")
            log(f"profiling {len(workers)} workers with py-spy for {args.profile_seconds} s "
                f"under c={args.concurrency} (not part of the measured rounds)")
            spies = profile_workers(workers, args.profile_seconds, args.profile_rate, tmp, procs,
                                    idle=args.profile_idle)
            time.sleep(0.5)  # let py-spy attach before the load starts
            prof_run = measure(gateway, f"profile c={args.concurrency} gateway", nonstream(
                gateway, args.concurrency, args.profile_seconds + 1, use_probe=True))
            for _pid, _out, spy in spies:
                spy.wait(timeout=60)
            profile = analyse_profile([out for _pid, out, _spy in spies], args.profile_rate,
                                      args.profile_seconds)
            profile["run"] = prof_run
            profile["idle_included"] = args.profile_idle
            profile["raw_files"] = [str(out) for _pid, out, _spy in spies]

        ledger_rows = ledger_requests(gateway, since)
        ledger = ledger_check(phases, ledger_rows)
        cpu_model = next((line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), platform.processor())
        meta = {
            "database": args.database, "workers": args.workers, "rounds": args.rounds,
            "duration_s": args.duration, "concurrency": args.concurrency,
            "wrk_threads": args.wrk_threads, "words": args.words,
            "chunk_delay_ms": args.chunk_delay_ms, "loadgen": args.loadgen,
            "key_cache_seconds": args.key_cache_seconds, "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "python": platform.python_version(),
            "loadavg_at_start": load_at_start,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": code_version,
            "request_body": plain.decode(), "stream_body": streamed.decode(),
        }
        others = {f"r{i + 1} {scen} {t}": run["cpu_cores"]["other processes"]
                  for i, rnd in enumerate(rounds) for scen, pair in rnd.items()
                  for t, run in pair.items() if "cpu_cores" in run}
        meta["other_processes_cores"] = others
        meta["max_other_cores"] = max(others.values(), default=0.0)
        meta["contended_runs"] = ", ".join(k for k, v in others.items() if v > 0.2)
        summary = summarise(rounds)
        targets = check_targets(summary)
        result = {"meta": meta, "summary": summary, "targets": targets, "ledger_check": ledger,
                  "rounds": rounds, "profile": profile}
        print_table(meta, summary, ledger)
        if profile:
            print_profile(profile)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
        return 0 if ledger["ok"] else 1

    return guarded(procs, body, lambda: remove_leftovers(
        args.postgres_url, dbs, tmp, args.keep_tmp or args.profile))


if __name__ == "__main__":
    sys.exit(main())
