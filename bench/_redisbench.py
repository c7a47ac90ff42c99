"""The Redis side of the limits bench: redis-benchmark's EVALSHA ceiling, script statistics
read from INFO commandstats, and removing the run's keys."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from typing import Any

from bench._procs import BenchError, Processes

TRIVIAL_SCRIPT = "return 1"
REDIS_BENCHMARK_INSTALL = "apt-get install -y redis-tools"


def connect(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def server_args(client: Any) -> list[str]:
    """redis-benchmark's options for the server a client is connected to."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        args = ["-s", kw["path"]]
    else:
        args = ["-h", str(kw.get("host", "127.0.0.1")), "-p", str(kw.get("port", 6379))]
    if kw.get("username"):
        args += ["--user", kw["username"]]
    if kw.get("password"):
        args += ["-a", kw["password"], "--no-auth-warning"]
    return args


def evalsha_stats(client: Any) -> dict[str, int]:
    """Calls and server microseconds of EVALSHA so far (server-wide, every client)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return {"calls": int(stats.get("calls", 0)), "usec": int(stats.get("usec", 0))}


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    calls = after["calls"] - before["calls"]
    usec = after["usec"] - before["usec"]
    return {"calls": calls, "server_usec": usec,
            "server_usec_per_call": round(usec / calls, 2) if calls else 0.0}


def _redis_benchmark(args: list[str], requests: int, clients: int, sha: str,
                     procs: Processes) -> dict[str, float]:
    cmd = ["redis-benchmark", *args, "-n", str(requests), "-c", str(clients), "--csv",
           "EVALSHA", sha, "0"]
    proc = procs.start("redis-benchmark", cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    procs.procs = [p for p in procs.procs if p[1] is not proc]
    rows = [r for r in csv.reader(io.StringIO(out.decode(errors="replace"))) if len(r) > 1]
    if proc.returncode != 0 or len(rows) < 2:
        raise BenchError(f"redis-benchmark failed ({proc.returncode}): {err.decode()}\n"
                         f"{out.decode()}")
    row = dict(zip(rows[0], rows[-1], strict=False))
    return {k: float(v) for k, v in row.items() if k != "test"}


def evalsha_ceiling(client: Any, clients: int, duration: float,
                    procs: Processes) -> dict[str, Any]:
    """redis-benchmark EVALSHA of a trivial script (`return 1`, no keys) with `clients`
    connections for about `duration` seconds: what the server does with script calls that
    do nothing (a short calibration run picks the request count)."""
    if shutil.which("redis-benchmark") is None:
        raise BenchError(f"redis-benchmark is not installed: {REDIS_BENCHMARK_INSTALL}")
    sha = client.script_load(TRIVIAL_SCRIPT)
    args = server_args(client)
    probe = _redis_benchmark(args, 3000 * max(1, clients), clients, sha, procs)
    requests = max(5000, int(probe["rps"] * duration))
    before = evalsha_stats(client)
    result = _redis_benchmark(args, requests, clients, sha, procs)
    server = stats_delta(before, evalsha_stats(client))
    return {"clients": clients, "requests": requests, "evalsha_per_s": result["rps"],
            "p50_ms": result.get("p50_latency_ms"), "p99_ms": result.get("p99_latency_ms"),
            "server": server, "script": TRIVIAL_SCRIPT, "sha": sha}


def retained_bytes(client: Any, prefix: str, sample: int = 50) -> dict[str, Any]:
    """What the run's settled leases leave behind: keys under the prefix and the memory of a
    sample of the per-lease "done" records (kept 1 h so that an API settle stays idempotent)."""
    keys = done = 0
    sizes: list[int] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        keys += 1
        if b":d:" in key:
            done += 1
            if len(sizes) < sample:
                sizes.append(int(client.memory_usage(key) or 0))
    return {"keys": keys, "done_records": done,
            "done_record_bytes_mean": round(sum(sizes) / len(sizes), 1) if sizes else None}


def delete_prefix(client: Any, prefix: str) -> int:
    """Remove every key the run wrote (and only those: the prefix is unique to the run)."""
    if not prefix or "*" in prefix or "?" in prefix or "[" in prefix:
        raise BenchError(f"refusing to delete keys under prefix {prefix!r}")
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    return int(deleted)
