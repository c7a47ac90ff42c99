"""Limits overhead: what reserving and settling against plan limits costs, on the store and
on a gateway call.

One run measures, in interleaved rounds:

  * store throughput: reserve + settle pairs per second with RedisLimitStore (plan of 3 checks:
    tokens/day, requests/minute, concurrent), 1 client and N client processes (many users,
    and one hot user), next to redis-benchmark's EVALSHA rate of a trivial script on the same
    server; the SQL store on Postgres and SQLite for reference (first round only);
  * the gateway with limits off vs on: direct upstream, `meterlane serve` without plans and
    `meterlane serve` with the same plan on the Redis store, at concurrency 1 (wrk --latency:
    p50 / p99, and the latency limits add = on - off), at concurrency 1 paced (a pause after
    each reply, so that the settle the gateway runs after answering is not in the next call's
    latency) and at concurrency 32 (requests/s).

It prints the tables and PASS/FAIL for each target, writes a JSON result file (--out),
checks the ledgers and the limit counters, and stops everything it started (also on Ctrl-C),
removing its Redis keys and databases. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/: the repository root makes `bench` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._limits_report import (
    check_gateway_targets,
    print_gateway,
    print_store,
    summarise_gateway,
    summarise_store,
)
from bench._limitsgw import GatewayBench
from bench._procs import (
    Processes,
    cli,
    git_version,
    guarded,
    log,
    pids_named,
    postgres_database,
    remove_leftovers,
    serve_env,
)
from bench._profile import print_profile
from bench._redisbench import (
    connect,
    delete_prefix,
    evalsha_ceiling,
    evalsha_stats,
    retained_bytes,
    stats_delta,
)
from bench._storeload import run_clients


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="the Redis of the limit store (keys under a prefix unique to the "
                             "run, removed at the end)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="the gateway's ledger")
    parser.add_argument("--postgres-url",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="server to create the bench databases on (any database on it)")
    parser.add_argument("--postgres-db", default=None,
                        help="base name of the databases dropped and recreated for the run "
                             "(default mlane_limits_<pid>)")
    parser.add_argument("--parts", default="store,gateway", help="subset of store,gateway")
    parser.add_argument("--sql-stores", default="postgres,sqlite",
                        help="SQL stores measured for reference ('' for none)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes of the concurrent store runs")
    parser.add_argument("--workers", type=int, default=2, help="workers of each gateway")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target")
    parser.add_argument("--pace-ms", type=int, default=1,
                        help="the paced c=1 run waits this long after each reply before the "
                             "next request (0: no paced run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--words", type=int, default=16, help="completion tokens per reply")
    parser.add_argument("--key-cache-seconds", type=float, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, py-spy the limits-on workers under c=32")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument("--out", type=Path, default=Path("/tmp/meterlane-limits-bench.json"))
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs and configs")
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.sql_stores = [s.strip() for s in args.sql_stores.split(",") if s.strip()]
    args.postgres_db = args.postgres_db or f"mlane_limits_{os.getpid()}"
    if not args.parts <= {"store", "gateway"} or not set(args.sql_stores) <= {"postgres",
                                                                               "sqlite"}:
        parser.error("--parts takes store,gateway; --sql-stores takes postgres,sqlite")
    return args


class StoreBench:
    """The store part: Redis pairs/s from 1 and N clients, EVALSHA ceilings, SQL stores."""

    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path, redis: Any,
                 prefix: str, redis_pids: list[int], dbs: list[str]) -> None:
        self.args, self.procs, self.tmp, self.redis = args, procs, tmp, redis
        self.prefix, self.redis_pids, self.dbs = prefix, redis_pids, dbs
        self.sql_urls: dict[str, str] = {}

    def setup(self) -> None:
        for kind in self.args.sql_stores:
            if kind == "postgres":
                name = f"{self.args.postgres_db}_store"
                url = postgres_database(self.args.postgres_url, name)
                self.dbs.append(name)
            else:
                url = f"sqlite:///{self.tmp / 'limits-store.db'}"
            (self.tmp / "empty.toml").write_text("")
            env = serve_env(self.tmp / "empty.toml", self.tmp / "var-store",
                            MLANE_DATABASE_URL=url)
            cli(env, "db", "upgrade")
            self.sql_urls[kind] = url
            log(f"SQL limit store on {kind} ready")

    def phases(self, first_round: bool) -> list[tuple[str, dict[str, Any], int]]:
        n = self.args.clients
        redis = {"store": "redis", "url": self.args.redis_url, "prefix": self.prefix}
        out = [("redis, 1 client", {**redis, "mode": "store", "users": "spread"}, 1),
               ("redis via LimitsService, 1 client",
                {**redis, "store": "engine", "mode": "engine", "users": "spread"}, 1),
               (f"redis, {n} clients", {**redis, "mode": "store", "users": "spread"}, n),
               (f"redis, {n} clients, 1 hot user", {**redis, "mode": "store", "users": "hot"},
                n)]
        if first_round:  # reference figures, measured once
            for kind, url in self.sql_urls.items():
                sql = {"store": "sql", "url": url, "mode": "store", "users": "spread"}
                out += [(f"{kind}, 1 client", sql, 1), (f"{kind}, {n} clients", sql, n)]
        return out

    def round(self, r: int) -> dict[str, Any]:
        res: dict[str, Any] = {"phases": {}, "evalsha": {}}
        for name, spec, clients in self.phases(r == 0):
            watch: dict[str, Callable[[], list[int]]] = {}
            if spec["store"] != "sql":
                watch["redis-server"] = lambda: self.redis_pids
            elif spec["url"].startswith("postgres"):
                # Found when the clients start: their backends exist by then.
                watch["postgres (all processes)"] = lambda: pids_named("postgres")
            before = evalsha_stats(self.redis)
            result = run_clients(self.procs, {**spec, "name": name,
                                              "duration": self.args.duration},
                                 clients, self.tmp, watch)
            if spec["store"] != "sql":
                result["server"] = stats_delta(before, evalsha_stats(self.redis))
            res["phases"][name] = result
            log(f"  r{r + 1} {name:<36} {result['pairs_per_s']:>9,.0f} pairs/s  "
                f"p50 {result['pair_ms'].get('p50', 0):.3f} ms  "
                f"p99 {result['pair_ms'].get('p99', 0):.3f} ms"
                + (f"  FAILED {result['failed']}" if result["failed"] else ""))
        for clients in sorted({1, self.args.clients, 50}):
            got = evalsha_ceiling(self.redis, clients, self.args.duration, self.procs)
            res["evalsha"][str(clients)] = got
            log(f"  r{r + 1} redis-benchmark EVALSHA c={clients:<3} "
                f"{got['evalsha_per_s']:>15,.0f} calls/s")
        return res


def redis_server_pids(redis: Any) -> list[int]:
    """The pid of the Redis server when it runs on this machine (for its CPU use)."""
    pid = int(redis.info("server").get("process_id", 0))
    with contextlib.suppress(OSError):
        if pid and "redis" in Path(f"/proc/{pid}/comm").read_text():
            return [pid]
    return []


def meta_of(args: argparse.Namespace, code_version: str, load: list[str],
            redis_version: str) -> dict[str, Any]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"database": args.database, "workers": args.workers, "rounds": args.rounds,
            "duration_s": args.duration, "concurrency": args.concurrency,
            "pace_ms": args.pace_ms,
            "clients": args.clients, "parts": sorted(args.parts), "sql_stores": args.sql_stores,
            "redis_url": args.redis_url, "redis_version": redis_version,
            "cpus": os.cpu_count(), "cpu_model": cpu_model,
            "python": platform.python_version(), "loadavg_at_start": load,
            "git_commit": code_version,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def store_result(rounds: list[dict[str, Any]], redis: Any, prefix: str,
                 meta: dict[str, Any]) -> dict[str, Any]:
    summary = summarise_store(rounds)
    retained = retained_bytes(redis, prefix)
    print_store(summary, meta)
    if retained["done_record_bytes_mean"]:
        per_hour = 1000 * 3600 * retained["done_record_bytes_mean"] / 2**30
        print(f"A settle through the metering API keeps a 'done' record for 1 h (the gateway's "
              f"own leases keep none): {retained['done_records']:,} records, "
              f"~{retained['done_record_bytes_mean']:.0f} bytes each (MEMORY USAGE), i.e. "
              f"~{per_hour:.1f} GiB at a steady 1,000 API settles/s")
    return {"summary": summary, "redis_retained": retained, "rounds": rounds}


def run(args: argparse.Namespace, procs: Processes, tmp: Path, redis: Any, prefix: str,
        dbs: list[str]) -> int:
    load = Path("/proc/loadavg").read_text().split()[:3]
    code_version = git_version()
    redis_pids = redis_server_pids(redis)
    store = StoreBench(args, procs, tmp, redis, prefix + "store:", redis_pids, dbs)
    gateway = GatewayBench(args, procs, tmp, prefix + "gw:", redis_pids, dbs)
    if "store" in args.parts:
        store.setup()
    if "gateway" in args.parts:
        gateway.setup()
    store_rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        if "store" in args.parts:
            store_rounds.append(store.round(r))
        if "gateway" in args.parts:
            gateway.round(r)
    result: dict[str, Any] = {"meta": meta_of(args, code_version, load,
                                              str(redis.info("server").get("redis_version")))}
    status = 0
    if store_rounds:
        result["store"] = store_result(store_rounds, redis, prefix + "store:", result["meta"])
        if any(p["failed"] for p in result["store"]["summary"]["phases"].values()):
            log("some reserve/settle pairs did not go as expected (see 'failed' in the JSON)")
            status = 1
    if "gateway" in args.parts:
        gw = gateway.finish()
        gw["summary"] = summary_gw = summarise_gateway(gateway.rounds)
        gw["targets"] = [{"target": t, "pass": ok, "figures": f}
                         for t, ok, f in check_gateway_targets(summary_gw)]
        result["gateway"] = gw
        print_gateway(summary_gw, result["meta"])
        print(gw["checks_text"])
        if gw.get("profile"):
            print_profile(gw["profile"])
        if not gw["checks_ok"]:
            status = 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults written to {args.out}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool, needed in (("wrk", "gateway" in args.parts),
                         ("redis-benchmark", "store" in args.parts)):
        if needed and shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get update && apt-get install -y "
                  f"{'wrk' if tool == 'wrk' else 'redis-tools'}", file=sys.stderr)
            return 2
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="meterlane-limits-bench-"))
    prefix = f"mlbench-{os.getpid()}-{uuid.uuid4().hex[:6]}:"
    dbs: list[str] = []
    redis: Any = None

    def body() -> int:
        nonlocal redis
        redis = connect(args.redis_url)
        redis.ping()
        log(f"work dir {tmp}; Redis keys under {prefix}")
        return run(args, procs, tmp, redis, prefix, dbs)

    return guarded(procs, body, lambda: cleanup(args, redis, prefix, dbs, tmp))


def cleanup(args: argparse.Namespace, redis: Any, prefix: str, dbs: list[str],
            tmp: Path) -> None:
    if redis is not None:
        try:
            log(f"deleted {delete_prefix(redis, prefix):,} Redis keys under {prefix}")
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"could not delete the Redis keys under {prefix}: {exc}")
    remove_leftovers(args.postgres_url, dbs, tmp, args.keep_tmp or args.profile)


if __name__ == "__main__":
    sys.exit(main())
