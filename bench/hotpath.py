"""Meterlane's hot path against a baseline: the same OpenAI call sent straight to the upstream
(direct), through a bare forwarder (bench/bare_forwarder.py: the same gunicorn + gevent
settings and upstream client, no metering) and through `meterlane serve`, on SQLite (the
embedded default, no plans) and on Postgres + Redis with limits on, all in one run.

Every target runs side by side; each round measures every scenario on every target, the
order of the targets turning from round to round:

  * non-streamed, 1 connection (wrk --latency): p50 / p99;
  * non-streamed, 32 connections (wrk): requests/s;
  * streamed, 1 connection (an http.client client): time to first token;
  * streamed, 32 connections (wrk): streams/s;

then, once, N streams held open at once against each server while the RSS of its workers
is read (--rss-streams). It prints one table (medians, what each target adds to direct,
Meterlane's throughput as a share of the bare forwarder's), the issue's targets with PASS /
FAIL, checks that each Meterlane ledger holds one row per request sent, and stops everything
it started. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/: the repository root makes `bench` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._hotpath_report import check_targets, print_report, summarise
from bench._hotpath_servers import (
    DIRECT,
    ML_PG,
    ML_PG_MEM,
    ML_PG_OFF,
    ML_SQLITE,
    Servers,
    check_wiring,
    start_all,
)
from bench._hotpath_stages import print_stages, profile_stages
from bench._load import Target, chat_body, run_python_client, run_wrk
from bench._procs import (
    CpuProbe,
    Processes,
    git_version,
    guarded,
    log,
    pids_named,
    remove_leftovers,
)
from bench._streams import hold_streams, rss_mb

SETUPS = {"sqlite": ML_SQLITE, "postgres-nolimits": ML_PG_OFF,
          "postgres-memlimits": ML_PG_MEM, "postgres": ML_PG}
SCENARIOS = ("c1", "c32", "stream", "s32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="sqlite,postgres",
                   help="Meterlane targets: sqlite (embedded, no plans), postgres (Postgres + "
                        "Redis, limits on), postgres-nolimits (Postgres, no plans: with "
                        "postgres, what the limits cost), postgres-memlimits (Postgres, the "
                        "limits counted in each worker's memory: what they cost with no "
                        "round trip)")
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/"
                                             "postgres",
                   help="server to create the bench database on (any database on it)")
    p.add_argument("--postgres-db", default=None,
                   help="dropped and recreated for the run (default mlane_hotpath_<pid>)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                   help="the limit store (keys under a prefix unique to the run, removed)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers of each server")
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--words", type=int, default=16, help="completion tokens per reply")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0,
                   help="upstream pause between stream chunks")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--rss-streams", type=int, default=1000,
                   help="streams held open at once for the RSS figure (0: none)")
    p.add_argument("--rss-seconds", type=float, default=30.0,
                   help="how long each of those streams lasts (the upstream paces its "
                        "--words chunks over it): all must be open at once")
    p.add_argument("--rss-ramp-seconds", type=float, default=5.0,
                   help="the streams are opened evenly over this time (0: in one burst)")
    p.add_argument("--key-cache-seconds", type=float, default=None)
    p.add_argument("--profile", action="store_true",
                   help="after the rounds: time each stage of the hot path (c=1) and py-spy "
                        "the workers (c=32), on ml-pg+redis when it runs, else on the last "
                        "Meterlane setup other than ml-pg+memory")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("/tmp/meterlane-hotpath.json"))
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the work directory (logs, configs, py-spy's raw stacks)")
    args = p.parse_args(argv)
    try:
        args.setups = [SETUPS[s.strip()] for s in args.setups.split(",") if s.strip()]
    except KeyError:
        p.error(f"--setups takes {','.join(SETUPS)}")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(args.scenarios) <= set(SCENARIOS):
        p.error(f"--scenarios takes {','.join(SCENARIOS)}")
    args.postgres_db = args.postgres_db or f"mlane_hotpath_{os.getpid()}"
    return args


class Run:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path,
                 servers: Servers) -> None:
        self.args, self.procs, self.tmp, self.s = args, procs, tmp, servers
        self.plain = chat_body(stream=False, words=args.words, chunk_delay_ms=0)
        self.streamed = chat_body(stream=True, words=args.words,
                                  chunk_delay_ms=args.chunk_delay_ms)
        self.probe = CpuProbe({f"{n} workers": w for n, w in servers.workers.items()},
                              {"postgres (all processes)": lambda: pids_named("postgres")}
                              if {ML_PG, ML_PG_OFF, ML_PG_MEM} & set(servers.targets) else {})

    def wrk(self, target: Target, body: bytes, conns: int,
            seconds: int) -> Callable[[], dict[str, Any]]:
        return lambda: run_wrk(target, body, connections=conns, threads=1, duration=seconds,
                               workdir=self.tmp, procs=self.procs, probe=self.probe)

    def stream_client(self, target: Target, seconds: float) -> Callable[[], dict[str, Any]]:
        return lambda: run_python_client(target, self.streamed, duration=seconds, stream=True,
                                         probe=None)

    def measure(self, target: Target, label: str,
                fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        result = self.s.phase(target, label, fn)
        lat = result.get("ttft_ms") or result["latency_ms"]
        log(f"  {label:<34} {result['rps']:>9,.0f} req/s  p50 {lat['p50']:.3f} ms  "
            f"p99 {lat['p99']:.3f} ms")
        return result

    def warm_up(self) -> None:
        log("warming up")
        for t in self.s.targets.values():
            self.measure(t, f"warmup {t.name} c=8", self.wrk(t, self.plain, 8, self.args.warmup))
            self.measure(t, f"warmup {t.name} stream", self.stream_client(t, 1))

    def round(self, r: int) -> dict[str, Any]:
        names = list(self.s.targets)
        order = [self.s.targets[n] for n in names[r % len(names):] + names[:r % len(names)]]
        log(f"round {r + 1}/{self.args.rounds} (order {', '.join(t.name for t in order)})")
        a, res = self.args, {}
        loads: dict[str, Callable[[Target], Callable[[], dict[str, Any]]]] = {
            "c1": lambda t: self.wrk(t, self.plain, 1, a.duration),
            "c32": lambda t: self.wrk(t, self.plain, a.concurrency, a.duration),
            "stream": lambda t: self.stream_client(t, a.duration),
            "s32": lambda t: self.wrk(t, self.streamed, a.concurrency, a.duration),
        }
        for scen in a.scenarios:
            res[scen] = {t.name: self.measure(t, f"r{r + 1} {scen} {t.name}", loads[scen](t))
                         for t in order}
        return res

    def rss(self) -> dict[str, Any]:
        a, out = self.args, {}
        body = chat_body(stream=True, words=a.words,
                         chunk_delay_ms=round(1000 * a.rss_seconds / a.words))
        for name, target in self.s.targets.items():
            if name == DIRECT:
                continue
            label = f"rss {a.rss_streams} streams {name}"
            result = self.s.phase(target, label, lambda t=target: hold_streams(
                t, body, a.rss_streams, self.s.workers[t.name], ramp=a.rss_ramp_seconds,
                timeout=3 * a.rss_seconds + 60))
            log(f"  {label:<34} largest worker {result['rss_peak_max_mb']:.1f} MB "
                f"(idle {max(result['rss_idle_mb'].values()):.1f}); all open: "
                f"{result['all_open']}; ok {result['ok']}, failed {result['failed']} "
                f"{result['failed_statuses'] or ''}")
            # beside the workers, once per serve: the tokenizer process (and the jobs worker)
            result["beside_rss_mb"] = {p: rss_mb(p) for p in self.s.beside.get(name, [])}
            if result["beside_rss_mb"]:
                log(f"  {'':<34} beside the workers: "
                    + ", ".join(f"{mb:.1f} MB" for mb in result["beside_rss_mb"].values()))
            out[name] = result
        return out


def meta_of(args: argparse.Namespace, commit: str, load: list[str], run: Run,
            rounds: list[dict[str, Any]]) -> dict[str, Any]:
    others = {f"r{i + 1} {scen} {t}": res["cpu_cores"]["other processes"]
              for i, rnd in enumerate(rounds) for scen, by in rnd.items()
              for t, res in by.items() if "cpu_cores" in res}
    return {"git_commit": commit, "setups": args.setups, "workers": args.workers,
            "rounds": args.rounds, "duration_s": args.duration,
            "concurrency": args.concurrency, "words": args.words,
            "chunk_delay_ms": args.chunk_delay_ms, "rss_streams": args.rss_streams,
            "rss_seconds": args.rss_seconds,
            "rss_ramp_seconds": args.rss_ramp_seconds, "cpus": os.cpu_count(),
            "loadavg_at_start": load, "other_processes_cores": others,
            "contended_runs": ", ".join(k for k, v in others.items() if v > 0.2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "request_body": run.plain.decode(), "stream_body": run.streamed.decode()}


def execute(args: argparse.Namespace, procs: Processes, tmp: Path, prefix: str,
            dbs: list[str]) -> int:
    load = Path("/proc/loadavg").read_text().split()[:3]
    commit = git_version()
    since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    servers = start_all(args, procs, tmp, prefix, dbs, since)
    run = Run(args, procs, tmp, servers)
    check_wiring(servers, run.plain)
    run.warm_up()
    rounds = [run.round(r) for r in range(args.rounds)]
    rss = run.rss() if args.rss_streams else None
    profile = None
    # the stage-timed app is app's own (its limit store too): never ml-pg+memory's stand-in
    profiled = [n for n in args.setups if n != ML_PG_MEM]
    if args.profile and not profiled:
        log("--profile: skipped, the stage-timed app cannot count the limits in memory; "
            "add another setup")
    if args.profile and profiled:
        name = ML_PG if ML_PG in profiled else profiled[-1]
        profile = profile_stages(servers, name, run.plain, run.streamed, args, procs, tmp)
        profile["raw_kept"] = args.keep_tmp
    names = list(servers.targets)
    summary = summarise(rounds, names)
    targets = check_targets(summary, rss, names)
    ledgers = servers.ledger_checks()
    meta = meta_of(args, commit, load, run, rounds)
    print_report(meta, summary, rss, targets, ledgers, names)
    if profile:
        print_stages(profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "targets": targets,
                                    "rss": rss, "ledger_checks": ledgers, "rounds": rounds,
                                    "profile": profile}, indent=2) + "\n")
    print(f"\nresults written to {args.out}")
    return 0 if all(c["ok"] for c in ledgers.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get update && apt-get install -y wrk", file=sys.stderr)
        return 2
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="meterlane-hotpath-"))
    prefix = f"mlhot-{os.getpid()}-{uuid.uuid4().hex[:6]}:"
    dbs: list[str] = []

    def body() -> int:
        log(f"work dir {tmp}")
        return execute(args, procs, tmp, prefix, dbs)

    return guarded(procs, body, lambda: cleanup(args, prefix, dbs, tmp))


def cleanup(args: argparse.Namespace, prefix: str, dbs: list[str], tmp: Path) -> None:
    if ML_PG in args.setups:
        from bench._redisbench import connect, delete_prefix

        try:
            log(f"deleted {delete_prefix(connect(args.redis_url), prefix):,} Redis keys "
                f"under {prefix}")
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"could not delete the Redis keys under {prefix}: {exc}")
    remove_leftovers(args.postgres_url, dbs, tmp, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main())
