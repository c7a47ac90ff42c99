"""Idle RSS of `meterlane serve`'s gunicorn workers, on SQLite (no plans) and on Postgres +
Redis with the bench plan (limits on), as bench/hotpath.py starts them: right after start,
and again after --calls gateway calls (half streamed) through the fake upstream, so that
what loads on first use is counted. Prints one line per target; see bench/README.md."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._hotpath_servers import ML_PG, ML_SQLITE, Servers, start_all
from bench._limitsgw import first_reply_headers
from bench._load import Target, chat_body
from bench._procs import Processes, guarded, log, remove_leftovers


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss(pids: list[int]) -> dict[str, float]:
    """VmRSS of each worker in MB, and (largest worker) its anonymous part."""
    return {"max": max(status_kb(p, "VmRSS") for p in pids) / 1024,
            "min": min(status_kb(p, "VmRSS") for p in pids) / 1024,
            "anon_max": max(status_kb(p, "RssAnon") for p in pids) / 1024}


def mappings(pid: int, top: int = 12) -> list[str]:
    """The largest parts of a process's RSS (/proc/pid/smaps), by what is mapped: a file
    (shared libraries), [heap], or anonymous memory (Python's arenas, large allocations)."""
    sizes: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if not first.endswith(":"):  # a mapping's header line: its path, if any, last
            parts = line.split(maxsplit=5)
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anonymous]"
        elif first == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    return [f"{kb / 1024:7.1f} MB  {n}" for n, kb in ranked[:top]]


def calls(target: Target, n: int) -> int:
    """n calls over 8 connections, every other one streamed; the number answered 200."""
    bodies = [chat_body(stream=False, words=16, chunk_delay_ms=0),
              chat_body(stream=True, words=16, chunk_delay_ms=0)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = pool.map(lambda i: first_reply_headers(target, bodies[i % 2])[0], range(n))
        return sum(status == 200 for status in done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setups", default="sqlite,postgres")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--settle-seconds", type=float, default=2.0)
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--postgres-db", default="bench_idle_rss")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    p.add_argument("--maps", action="store_true",
                   help="after the calls, print what the largest worker's RSS is made of")
    args = p.parse_args(argv)
    args.setups = [{"sqlite": ML_SQLITE, "postgres": ML_PG}[s] for s in args.setups.split(",")]
    args.key_cache_seconds = None
    procs, dbs = Processes(), []
    tmp = Path(tempfile.mkdtemp(prefix="bench-idle-rss-"))

    def body() -> int:
        s: Servers = start_all(args, procs, tmp, f"bench:{uuid.uuid4().hex[:8]}:", dbs, "")
        time.sleep(args.settle_seconds)  # let start-up garbage settle; nothing waits on it
        out = {}
        for name in args.setups:
            pids = s.workers[name]
            idle = rss(pids)
            ok = calls(s.targets[name], args.calls)
            time.sleep(args.settle_seconds)
            out[name] = {"idle": idle, "after": rss(pids), "ok": ok}
            log(f"{name}: idle {idle['max']:.1f} MB (min {idle['min']:.1f}, anon "
                f"{idle['anon_max']:.1f}); after {ok}/{args.calls} calls "
                f"{out[name]['after']['max']:.1f} MB")
            if args.maps:
                largest = max(pids, key=lambda p: status_kb(p, "VmRSS"))
                threads = status_kb(largest, "Threads")
                print("\n".join([f"{name} worker {largest} ({threads} threads):",
                                  *mappings(largest)]))
        if args.json:
            print(json.dumps(out))
        return 0

    return guarded(procs, body, lambda: remove_leftovers(args.postgres_url, dbs, tmp, False))


if __name__ == "__main__":
    sys.exit(main())
