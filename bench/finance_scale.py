"""Finance at scale: a month of usage events on Postgres (10 million by default), rolled up,
then the summary and each margins grouping timed through the API (Flask's test client: the
whole request, roll-up freshness check and JSON included); and the ingestion rate of usage
events through the ledger writer (the gateway's group commit) from many threads.

    python bench/finance_scale.py                          # 10M events, ~10-15 min
    python bench/finance_scale.py --events 1000000 --users 2000

A benchmark, not a test: it prints medians and writes JSON (--out); the targets (each report
under 1 s, ingestion at least 5,000 events/s) are reported, not asserted. The database
(--db, dropped and recreated) is dropped at the end unless --keep-db."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "bench" / "finance_demo.toml"
MONTH = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
GROUPS = ("plan", "model", "user", "day")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recreate(server_url: str, name: str) -> str:
    import psycopg

    base = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop(server_url: str, name: str) -> None:
    import psycopg

    base = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, events: int, users: int, seed: int) -> dict[str, Any]:
    """Users, plans, invoices and `events` usage events in the month, by COPY."""
    import psycopg

    from core.config import Config
    from metering.pricing import TokenUsage, cost_pico_usd

    env = {**os.environ, "MLANE_CONFIG": str(CONFIG), "MLANE_DATABASE_URL": url}
    config = Config.from_env(env)
    local = {u.name for u in config.upstreams if u.cost is not None}
    models = [(m.name, m.upstream, m.upstream_model, m.price) for m in config.models]
    rnd = random.Random(seed)  # noqa: S311 - bench data
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    started = time.monotonic()
    with psycopg.connect(dsn) as conn:
        app_id = conn.execute("INSERT INTO apps (name, created_at) VALUES ('bench', now()) "
                              "RETURNING id").fetchone()[0]  # type: ignore[index]
        with conn.cursor().copy("COPY end_users (app_id, external_id, created_at) FROM STDIN"
                                ) as copy:
            for n in range(users):
                copy.write_row((app_id, f"user-{n:06d}", MONTH[0]))
        ids = [r[0] for r in conn.execute("SELECT id FROM end_users WHERE app_id = %s "
                                          "ORDER BY id", (app_id,))]
        plans = {}
        for uid in ids:
            roll = rnd.random()
            plans[uid] = "team" if roll < 0.05 else "pro" if roll < 0.25 else "free"
        with conn.cursor().copy("COPY end_user_plans (end_user_id, app_id, plan_id, "
                                "plan_version, anchored_at, updated_at) FROM STDIN") as copy:
            for uid, plan in plans.items():
                if plan != "free":
                    copy.write_row((uid, app_id, plan, 1, MONTH[0], MONTH[0]))
        with conn.cursor().copy("COPY revenue_events (source_id, kind, app_id, end_user_id, "
                                "amount, currency, period_start, period_end, occurred_at, "
                                "plan_id) FROM STDIN") as copy:
            for uid, plan in plans.items():
                if plan != "free":
                    copy.write_row((f"in_bench_{uid}", "invoice_paid", app_id, uid,
                                    2000 if plan == "pro" else 9900,
                                    "usd" if plan == "pro" else "eur", MONTH[0], MONTH[1],
                                    MONTH[0], plan))
        conn.commit()
        # heavy users: a Pareto weight per user
        weights = [rnd.paretovariate(1.2) for _ in ids]
        total = sum(weights)
        cum, acc = [], 0.0
        for wgt in weights:
            acc += wgt / total
            cum.append(acc)
        import bisect

        seconds = int((MONTH[1] - MONTH[0]).total_seconds())
        columns = ("app_id, end_user_id, request_id, idempotency_key, endpoint, requested_model,"
                   " upstream, upstream_model, stream, input_tokens, cached_input_tokens, "
                   "output_tokens, reasoning_tokens, cache_write_tokens, usage_source, "
                   "cost_pico_usd, priced, status, http_status, latency_ms, created_at, "
                   "limits_pending, plan_id")
        with conn.cursor().copy(f"COPY usage_events ({columns}) FROM STDIN") as copy:
            for i in range(events):
                uid = ids[min(len(ids) - 1, bisect.bisect_left(cum, rnd.random()))]
                name, upstream, upstream_model, price = models[rnd.randrange(len(models))]
                inp = int(rnd.lognormvariate(6.8, 0.9)) + 10
                cached = inp // 2 if rnd.random() < 0.3 else 0
                out = int(rnd.lognormvariate(5.7, 0.8)) + 5
                cost = cost_pico_usd(TokenUsage(input_tokens=inp, cached_input_tokens=cached,
                                                output_tokens=out), price) if price else None
                at = MONTH[0] + timedelta(seconds=rnd.randrange(seconds))
                copy.write_row((app_id, uid, f"r{i}", f"k{i}", "chat", name, upstream,
                                upstream_model, False, inp, cached, out, 0, 0, "reported",
                                cost, price is not None, "ok", 200, 1, at, False,
                                plans[uid]))
                if i and i % 1_000_000 == 0:
                    log(f"  {i:,} events copied ({i / (time.monotonic() - started):,.0f}/s)")
        conn.commit()
        conn.execute("ANALYZE")
    return {"app_id": app_id, "users": users, "events": events, "local_models":
            sorted(m[0] for m in models if m[1] in local),
            "fill_seconds": round(time.monotonic() - started, 1)}


def time_reports(url: str, runs: int) -> dict[str, Any]:
    from dataclasses import replace

    from app import create_app
    from core.auth import Role
    from core.config import Config

    env = {**os.environ, "MLANE_CONFIG": str(CONFIG), "MLANE_DATABASE_URL": url}
    config = replace(Config.from_env(env), key_cache_seconds=2.0)
    app = create_app(config)
    w = app.extensions["wiring"]
    started = time.monotonic()
    run = w.finance.refresh()
    rollup_seconds = time.monotonic() - started
    log(f"rolled up {len(run.days) if run else 0} days in {rollup_seconds:.1f} s")
    key = w.keys.create_key(Role.FINANCE, "bench").key
    client = app.test_client()
    paths = {"summary": "/v1/finance/summary?period=2026-10"}
    paths.update({f"margins_{g}": f"/v1/finance/margins?period=2026-10&group_by={g}"
                  for g in GROUPS})
    paths["least_profitable"] = "/v1/finance/users/least-profitable?period=2026-10&limit=20"
    out: dict[str, Any] = {"rollup_seconds": round(rollup_seconds, 2)}
    for name, path in paths.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            resp = client.get(path, headers={"Authorization": f"Bearer {key}"})
            body = resp.get_data()
            times.append(time.perf_counter() - t0)
            assert resp.status_code == 200, body[:500]
        out[name] = {"median_s": round(statistics.median(times), 3),
                     "max_s": round(max(times), 3), "bytes": len(body)}
        log(f"{name:<20} median {out[name]['median_s']:.3f} s  max {out[name]['max_s']:.3f} s")
    summary = json.loads(client.get(paths["summary"], headers={
        "Authorization": f"Bearer {key}"}).get_data())
    out["summary"] = {k: summary[k] for k in ("calls", "active_users_monthly",
                                              "inference_cost_usd", "revenue_usd")}
    with w.engine.connect() as conn:
        from sqlalchemy import func, select

        from finance.models import UsageDaily

        out["rollup_rows"] = conn.execute(select(func.count()).select_from(UsageDaily)).scalar()
    w.engine.dispose()
    return out


def ingestion(url: str, seconds: float, threads: int) -> dict[str, Any]:
    """Usage events through the ledger writer (the path every metered call takes), from
    `threads` threads of one process, each waiting for its own row to be committed."""
    from core.db import make_engine
    from metering.ledger import LedgerWriter
    from metering.records import CallRecord

    engine = make_engine(url)
    writer = LedgerWriter(engine, Path("/tmp"))
    import sqlalchemy as sa

    with engine.connect() as conn:
        app_id, uid = conn.execute(sa.text(
            "SELECT app_id, id FROM end_users ORDER BY id LIMIT 1")).one()
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def run(n: int) -> None:
        while time.monotonic() < stop:
            key = uuid.uuid4().hex
            writer.record(CallRecord(
                app_id=app_id, end_user_id=uid, request_id=key, idempotency_key=key,
                endpoint="chat", requested_model="gpt-4o-mini", upstream="openai",
                upstream_model="gpt-4o-mini", stream=False, input_tokens=900,
                cached_input_tokens=0, output_tokens=300, reasoning_tokens=0,
                usage_source="reported", cost_pico_usd=315_000_000, priced=True, status="ok",
                http_status=200, error=None, latency_ms=1, ttft_ms=None,
                created_at=datetime.now(UTC), plan_id="free"))
            counts[n] += 1

    t0 = time.monotonic()
    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - t0
    engine.dispose()
    rate = sum(counts) / elapsed
    log(f"ingestion: {sum(counts):,} events in {elapsed:.1f} s = {rate:,.0f} events/s "
        f"({threads} threads)")
    return {"events": sum(counts), "seconds": round(elapsed, 2), "events_per_s": round(rate),
            "threads": threads}


def ingestion_http(url: str, seconds: float, clients: int, batch: int,
                   redis_url: str) -> dict[str, Any]:
    """Usage events reported over HTTP (POST /v1/meter/track/batch, `batch` events a request)
    to a real `meterlane serve` (2 workers, limits counted in Redis), from `clients` threads."""
    import http.client
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLANE_CONFIG": str(CONFIG), "MLANE_DATABASE_URL": url,
           "MLANE_REDIS_URL": redis_url}
    made = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--role",
                           "app", "--app", "bench"], env=env, check=True, capture_output=True,
                          text=True)
    key = made.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port",
                             str(port), "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # waiting for the server to come up
        counts = [0] * clients
        errors: list[str] = []
        stop = time.monotonic() + seconds

        def run(n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            k = 0
            while time.monotonic() < stop:
                events = [{"user": f"user-{(n * 7919 + k * 31 + i) % 10000:06d}",
                           "model": "gpt-4o-mini", "idempotency_key": f"h{n}-{k}-{i}",
                           "usage": {"input_tokens": 900, "output_tokens": 300}}
                          for i in range(batch)]
                k += 1
                conn.request("POST", "/v1/meter/track/batch", body=json.dumps(
                    {"events": events}), headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 201:
                    errors.append(f"{resp.status} {body[:200]!r}")
                    return
                counts[n] += json.loads(body)["tracked"]

        t0 = time.monotonic()
        pool = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        elapsed = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    rate = sum(counts) / elapsed
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        in_ledger = conn.execute("SELECT count(*) FROM usage_events WHERE idempotency_key "
                                 "LIKE 'h%%-%%-%%'").fetchone()[0]  # type: ignore[index]
    if in_ledger != sum(counts):
        errors.append(f"ledger has {in_ledger} rows for {sum(counts)} tracked events")
    log(f"HTTP ingestion: {sum(counts):,} events in {elapsed:.1f} s = {rate:,.0f} events/s "
        f"({clients} clients, {batch} a request){'; errors: ' + errors[0] if errors else ''}")
    return {"events": sum(counts), "seconds": round(elapsed, 2), "events_per_s": round(rate),
            "clients": clients, "batch": batch, "ledger_rows": in_ledger,
            "errors": errors[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/"
                    "postgres")
    ap.add_argument("--db", default=f"mlane_bench_finance_{os.getpid()}")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ingest-seconds", type=float, default=20)
    ap.add_argument("--ingest-threads", type=int, default=64)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--http-clients", type=int, default=8)
    ap.add_argument("--http-batch", type=int, default=500)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--out", default="/tmp/meterlane-finance-bench.json")
    args = ap.parse_args()
    url = recreate(args.postgres_url, args.db)
    try:
        env = {**os.environ, "MLANE_CONFIG": str(CONFIG), "MLANE_DATABASE_URL": url}
        subprocess.run([sys.executable, "-m", "app", "db", "upgrade"], env=env,
                       check=True, capture_output=True)
        log(f"filling {args.events:,} events for {args.users:,} users into {args.db}")
        result: dict[str, Any] = {"fill": fill(url, args.events, args.users, args.seed)}
        log(f"filled in {result['fill']['fill_seconds']} s")
        result["reports"] = time_reports(url, args.runs)
        result["ingestion"] = ingestion(url, args.ingest_seconds, args.ingest_threads)
        result["ingestion_http"] = ingestion_http(url, args.ingest_seconds, args.http_clients,
                                                  args.http_batch, args.redis_url)
        slowest = max(v["median_s"] for k, v in result["reports"].items()
                      if isinstance(v, dict) and "median_s" in v)
        result["targets"] = {"reports_under_1s": slowest < 1.0,
                             "ingestion_at_least_5000_per_s":
                                 result["ingestion"]["events_per_s"] >= 5000,
                             "http_ingestion_at_least_5000_per_s":
                                 result["ingestion_http"]["events_per_s"] >= 5000}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if not args.keep_db:
            drop(args.postgres_url, args.db)


if __name__ == "__main__":
    sys.exit(main())
