"""Reserve + settle pairs against a limit store, from N client processes started together.

The parent (bench/limits_overhead.py) calls run_clients(); each client is
`python -m bench._storeload SPEC` (SPEC is JSON): it builds its own store and connection,
warms up, prints READY, waits for GO on stdin, runs reserve + settle pairs for `duration`
seconds and prints `RESULT {json}`. Separate processes, so that the GIL of one client does
not cap the others, each with its own connection as gateway workers have.

The plan is BENCH_PLAN_TOML, the one the gateway run puts in its config: its checks are
built by meterlane's own LimitsService, so the store sees exactly what a gateway call sends.
"""

from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._procs import MODEL, ROOT, BenchError, CpuProbe, Processes

# Large enough never to run out or bind, so that every call reserves and settles the whole
# plan: the cost of limits, not of refusals.
BENCH_PLAN_TOML = """
[limits]
store = "redis"

[[plans]]
id = "bench"
default = true
on_limit = "clip"
on_store_failure = "closed"   # Redis trouble shows as failed calls, not as a quicker path
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000000000000
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 1000000000000
[[plans.limits]]
metric = "concurrent"
amount = 1000000
"""
APP_ID = 1
USERS_PER_CLIENT = 1000
PROMPT_TOKENS = 22   # what the gateway counts for the chat body of bench/_load.py
OUTPUT_TOKENS = 16
SAMPLE = 5000        # pair latencies each client sends back (evenly spaced)


def bench_plan() -> tuple[Any, Any, Any]:
    """(catalog, assignment, model) of the bench plan, built by meterlane's own parser."""
    from core.config import ModelConfig
    from plans.catalog import parse_plans
    from plans.service import Assignment

    tables = tuple(tomllib.loads(BENCH_PLAN_TOML)["plans"])
    catalog = parse_plans(tables, BENCH_PLAN_TOML, frozenset({MODEL}))
    assert catalog.default is not None
    assignment = Assignment(catalog.default, datetime.now(UTC), False)
    return catalog, assignment, ModelConfig(MODEL, "fake", MODEL)


class _OnePlan:
    """PlanService stand-in: every end user is on the bench plan (the real one caches the
    lookup for key_cache_seconds, so it is off the hot path too)."""

    def __init__(self, assignment: Any) -> None:
        self.assignment = assignment

    def plan_of(self, end_user_id: int) -> Any:
        return self.assignment


def make_store(spec: dict[str, Any]) -> Any:
    if spec["store"] in ("redis", "engine"):
        import redis

        from metering.redislimits import RedisLimitStore

        client = redis.Redis.from_url(spec["url"], socket_timeout=5, socket_connect_timeout=5)
        return RedisLimitStore(client, spec["prefix"])
    from core.db import make_engine
    from metering.limitstore import SqlLimitStore

    return SqlLimitStore(make_engine(spec["url"]))


class PairRunner:
    """Reserve + settle pairs on one store. mode "store": RedisLimitStore / SqlLimitStore
    called directly with the plan's checks; "engine": through LimitsService.reserve/settle
    (check building, lease ids, states), i.e. what a gateway call runs minus the prompt count."""

    def __init__(self, store: Any, mode: str) -> None:
        from metering.leases import user_tag
        from metering.limits import LimitsService
        from metering.limitstore import Actual
        from metering.pricing import TokenUsage

        catalog, self.assignment, self.model = bench_plan()
        # No engine: it is used only to record refusals and catch up, which never happen here.
        self.service = LimitsService(catalog, store, _OnePlan(self.assignment), None,
                                     (self.model,))
        self.store, self.mode = store, mode
        self.user_tag = user_tag
        self.actual = Actual(PROMPT_TOKENS + OUTPUT_TOKENS)
        self.usage = TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
        self._checks: tuple[int, list[Any]] = (-1, [])

    def checks(self, now: datetime) -> list[Any]:
        second = int(now.timestamp())
        if self._checks[0] != second:  # the minute's counter key changes; rebuild each second
            applied = self.service.checks_for(APP_ID, 0, self.assignment, self.model, now,
                                            prompt_tokens=PROMPT_TOKENS)
            self._checks = (second, [a.check for a in applied])
        return self._checks[1]

    def pair(self, end_user_id: int) -> tuple[bool, int, int]:
        """One reserve + settle; (all went as expected, reserve ns, settle ns)."""
        t0 = time.perf_counter_ns()
        if self.mode == "engine":
            lease = self.service.reserve(
                app_id=APP_ID, end_user_id=end_user_id, model=self.model,
                prompt_tokens=PROMPT_TOKENS, want_out=OUTPUT_TOKENS, min_out=1,
                request_id=f"req_{uuid.uuid4().hex}")
            t1 = time.perf_counter_ns()
            outcome = self.service.settle(lease, self.usage, None)
            return outcome == "settled" and lease.out == OUTPUT_TOKENS, t1 - t0, \
                time.perf_counter_ns() - t1
        now = datetime.now(UTC)
        now_ms = int(now.timestamp() * 1000)
        tag = self.user_tag(APP_ID, end_user_id)
        lease_id = f"ls_{APP_ID}_{end_user_id}_{uuid.uuid4().hex}"
        meta = {"app_id": APP_ID, "end_user_id": end_user_id, "model": MODEL, "plan": "bench",
                "request_id": f"req_{uuid.uuid4().hex}", "tags": [tag]}
        got = self.store.reserve(tag, lease_id, self.checks(now), now_ms=now_ms,
                                 expires_ms=now_ms + 600_000, want_out=OUTPUT_TOKENS, min_out=1,
                                 clip=True, meta=meta)
        t1 = time.perf_counter_ns()
        done = self.store.settle(tag, lease_id, self.actual, now_ms=int(time.time() * 1000))
        return got.granted and done.outcome == "settled", t1 - t0, time.perf_counter_ns() - t1

    def run(self, users: list[int], duration: float) -> dict[str, Any]:
        reserve_ns: list[int] = []
        settle_ns: list[int] = []
        bad = 0
        started = time.perf_counter()
        deadline = started + duration
        i = 0
        while time.perf_counter() < deadline:
            ok, r, s = self.pair(users[i % len(users)])
            i += 1
            bad += not ok
            reserve_ns.append(r)
            settle_ns.append(s)
        elapsed = time.perf_counter() - started
        pairs = [r + s for r, s in zip(reserve_ns, settle_ns, strict=True)]
        step = max(1, len(pairs) // SAMPLE)
        return {"pairs": i, "failed": bad, "elapsed_s": round(elapsed, 4),
                "pairs_per_s": round(i / elapsed, 1),
                "reserve_ms": _summary(reserve_ns), "settle_ms": _summary(settle_ns),
                "pair_ms": _summary(pairs), "sample_pair_us": [p // 1000 for p in pairs[::step]]}


def _summary(ns: list[int]) -> dict[str, float]:
    if not ns:
        return {}
    ordered = sorted(ns)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1e6, 4)

    return {"mean": round(statistics.fmean(ns) / 1e6, 4), "p50": pct(50), "p99": pct(99)}


def worker(spec: dict[str, Any]) -> None:
    runner = PairRunner(make_store(spec), spec["mode"])
    if spec["users"] == "hot":
        users = [0]
    else:
        first = 1 + spec["index"] * USERS_PER_CLIENT
        users = list(range(first, first + USERS_PER_CLIENT))
    runner.run(users, 0.3)  # connects, loads the scripts or warms the statement cache
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    print("RESULT " + json.dumps(runner.run(users, spec["duration"])), flush=True)


# -- the parent side -------------------------------------------------------------------------


def _line(proc: subprocess.Popen[bytes], prefix: str, deadline: float, log: Path) -> str:
    assert proc.stdout is not None
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline().decode() if ready else ""
        if line.startswith(prefix):
            return line[len(prefix):].strip()
        if not line:
            raise BenchError(f"store client {proc.pid} gave no {prefix.strip()} "
                             f"(exit {proc.poll()}); see {log}:\n{log.read_text()[-2000:]}")


def run_clients(procs: Processes, spec: dict[str, Any], clients: int, workdir: Path,
                watch: dict[str, Callable[[], list[int]]]) -> dict[str, Any]:
    """`clients` processes running pairs at once; their sum, pooled latencies and CPU use
    (of the clients and of the processes `watch` names when the clients start)."""
    started = []
    for i in range(clients):
        log = workdir / f"storeclient-{spec['name'].replace(' ', '_')}-{i}.log"
        proc = procs.start(f"store client {i}", [
            sys.executable, "-m", "bench._storeload", json.dumps({**spec, "index": i})],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("wb"))
        started.append((proc, log))
    try:
        for proc, log in started:
            _line(proc, "READY", time.monotonic() + 120, log)
        probe = CpuProbe({"store clients": [p.pid for p, _ in started]}, watch)
        probe.start()
        for proc, _log in started:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            proc.stdin.flush()
        deadline = time.monotonic() + spec["duration"] + 60
        results = [json.loads(_line(p, "RESULT ", deadline, log)) for p, log in started]
        cpu = probe.stop()  # before the clients are reaped, while /proc still has them
    finally:
        for proc, _log in started:
            procs.stop(proc, 15)
        procs.procs = [p for p in procs.procs if all(p[1] is not s for s, _ in started)]
    cpu.pop("wrk", None)
    sample = sorted(us for r in results for us in r.pop("sample_pair_us"))

    def pct(p: float) -> float:
        return round(sample[min(len(sample) - 1, int(p / 100 * len(sample)))] / 1000, 4)

    return {"name": spec["name"], "store": spec["store"], "mode": spec["mode"],
            "clients": clients, "users": spec["users"] if spec["users"] == "hot"
            else clients * USERS_PER_CLIENT,
            "pairs": sum(r["pairs"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "pairs_per_s": round(sum(r["pairs_per_s"] for r in results), 1),
            "pair_ms": {"p50": pct(50), "p99": pct(99)} if sample else {},
            "cpu_cores": cpu, "clients_detail": results}


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
