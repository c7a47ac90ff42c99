"""The gateway part of the limits bench: direct upstream, `meterlane serve` with limits off
and with limits on, both gateways running side by side, measured in interleaved rounds."""

from __future__ import annotations

import argparse
import http.client
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench._load import Target, chat_body, run_wrk
from bench._procs import (
    BenchError,
    CpuProbe,
    Processes,
    Served,
    cli,
    http_get,
    log,
    pids_named,
    postgres_database,
    serve_env,
    start_serve,
    start_upstream,
    write_config,
)
from bench._profile import analyse_profile, profile_workers
from bench._report import ledger_check, ledger_requests, metered_phase, wait_ledger
from bench._storeload import BENCH_PLAN_TOML

USER = "bench-user"
QUOTA_HEADER = "X-Meterlane-Quota-Limit"


def first_reply_headers(target: Target, body: bytes) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
    try:
        conn.request("POST", target.path, body=body, headers=target.headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


class GatewayBench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path, prefix: str,
                 redis_pids: list[int], dbs: list[str]) -> None:
        self.args, self.procs, self.tmp, self.prefix = args, procs, tmp, prefix
        self.redis_pids, self.dbs = redis_pids, dbs
        self.rounds: list[dict[str, Any]] = []
        self.phases: dict[str, list[dict[str, Any]]] = {"limits_off": [], "limits_on": []}
        self.body = chat_body(stream=False, words=args.words, chunk_delay_ms=0)
        self.started_day = datetime.now(UTC).date()
        self.since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _envs(self, upstream_base: str) -> tuple[dict[str, str], dict[str, str]]:
        """The two gateways' environments: the same but for the config (plans or none)."""
        a = self.args
        write_config(self.tmp / "limits-off.toml", upstream_base)
        write_config(self.tmp / "limits-on.toml", upstream_base, BENCH_PLAN_TOML)
        # Both get the Redis URL: without plans it is only pinged by /readyz.
        extra = {"MLANE_REDIS_URL": a.redis_url, "MLANE_REDIS_PREFIX": self.prefix}
        if a.key_cache_seconds is not None:
            extra["MLANE_KEY_CACHE_SECONDS"] = str(a.key_cache_seconds)
        if a.database == "postgres":
            extra["MLANE_DATABASE_URL"] = postgres_database(a.postgres_url, a.postgres_db)
            self.dbs.append(a.postgres_db)
        off = serve_env(self.tmp / "limits-off.toml", self.tmp / "var", **extra)
        on = serve_env(self.tmp / "limits-on.toml", self.tmp / "var", **extra)
        if a.database == "postgres":
            log(f"created database {a.postgres_db}; {cli(off, 'db', 'upgrade').strip()}")
        return off, on

    def setup(self) -> None:
        upstream, base = start_upstream(self.procs, self.tmp)
        log(f"fake upstream at {base} (pid {upstream.pid})")
        envs = self._envs(base)
        served: dict[str, Served] = {}
        self.targets: dict[str, Target] = {}
        for name, env in zip(("limits_off", "limits_on"), envs, strict=True):
            key = cli(env, "keys", "create", "--role", "app", "--app",
                      f"bench-{name.replace('_', '-')}").strip().splitlines()[-1]
            served[name] = start_serve(self.procs, env, workers=self.args.workers, cwd=self.tmp,
                                       log_path=self.tmp / f"serve-{name}.log",
                                       name=f"meterlane serve ({name})")
            log(f"{name}: meterlane serve on 127.0.0.1:{served[name].port} "
                f"(master {served[name].proc.pid}, workers {served[name].workers})")
            self.targets[name] = Target(name, "127.0.0.1", served[name].port,
                                        "/v1/chat/completions",
                                        {"Authorization": f"Bearer {key}",
                                         "X-Meterlane-User": USER,
                                         "Content-Type": "application/json"})
        host, port = re.match(r"http://([^:/]+):(\d+)", base).groups()  # type: ignore[union-attr]
        self.targets = {"direct": Target("direct", host, int(port), "/v1/chat/completions",
                                         {"Authorization": "Bearer sk-bench",
                                          "X-Meterlane-User": USER,
                                          "Content-Type": "application/json"}),
                        **self.targets}
        self.served = served
        self.probe = CpuProbe(
            {"limits-off workers": served["limits_off"].workers,
             "limits-on workers": served["limits_on"].workers,
             "gateway masters": [s.proc.pid for s in served.values()],
             "fake upstream": [upstream.pid], "redis-server": self.redis_pids},
            {"postgres (all processes)": lambda: pids_named("postgres")}
            if self.args.database == "postgres" else {})
        self._check_wiring()
        self._warm_up()

    def _check_wiring(self) -> None:
        """Limits must be on in one gateway and off in the other, or the comparison is void."""
        for name in ("limits_off", "limits_on"):
            before = ledger_requests(self.targets[name], self.since)
            status, headers = first_reply_headers(self.targets[name], self.body)
            delta = wait_ledger(self.targets[name], self.since, before + 1) - before
            self.phases[name].append({"phase": "wiring check", "tool": "python", "sent": 1,
                                      "ok_2xx": int(status == 200), "non_2xx": int(status != 200),
                                      "abandoned": 0, "ledger_delta": delta, "ok": delta == 1})
            has_quota = QUOTA_HEADER.lower() in headers
            if status != 200 or has_quota != (name == "limits_on"):
                raise BenchError(f"{name}: status {status}, {QUOTA_HEADER} "
                                 f"{'present' if has_quota else 'absent'}: limits are not "
                                 f"{'on' if name == 'limits_on' else 'off'} as they should be")
        log(f"limits on: every reply carries {QUOTA_HEADER}; limits off: none does")

    def _measure(self, target: Target, label: str, conns: int, seconds: int,
                 probe: bool = True, delay_ms: int | None = None) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            return run_wrk(target, self.body, connections=conns, threads=self.args.wrk_threads,
                           duration=seconds, workdir=self.tmp, procs=self.procs,
                           probe=self.probe if probe else None, delay_ms=delay_ms)

        result = self._gateway_phase(target, label, load) if target.name in self.phases \
            else load()
        lat = result["latency_ms"]
        log(f"  {label:<36} {result['rps']:>9,.0f} req/s  p50 {lat['p50']:.3f} ms  "
            f"p99 {lat['p99']:.3f} ms")
        return result

    def _gateway_phase(self, target: Target, name: str,
                       fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        result, phase = metered_phase(target, self.since, name, fn)
        self.phases[target.name].append(phase)
        return result

    def _warm_up(self) -> None:
        log("warming up")
        for target in self.targets.values():
            self._measure(target, f"warmup {target.name} c=8", min(8, self.args.concurrency),
                          self.args.warmup, probe=False)

    def round(self, r: int) -> None:
        # The two gateways are measured back to back, in alternating order.
        order = list(self.targets.values())
        if r % 2:
            order.reverse()
        res: dict[str, Any] = {"order": [t.name for t in order], "c1": {}, "c32": {}}
        for t in order:
            res["c1"][t.name] = self._measure(t, f"r{r + 1} c=1 {t.name}", 1, self.args.duration)
        if self.args.pace_ms:
            res["c1paced"] = {t.name: self._measure(
                t, f"r{r + 1} c=1 paced {self.args.pace_ms} ms {t.name}", 1, self.args.duration,
                delay_ms=self.args.pace_ms) for t in order}
        for t in order:
            res["c32"][t.name] = self._measure(t, f"r{r + 1} c={self.args.concurrency} {t.name}",
                                               self.args.concurrency, self.args.duration)
        self.rounds.append(res)

    def _profile(self) -> dict[str, Any]:
        a, on = self.args, self.targets["limits_on"]
        workers = self.served["limits_on"].workers
        log(f"profiling the limits-on workers with py-spy for {a.profile_seconds} s under "
            f"c={a.concurrency} (not part of the measured rounds)")
        spies = profile_workers(workers, a.profile_seconds, a.profile_rate, self.tmp,
                                self.procs)
        time.sleep(0.5)
        run = self._measure(on, f"profile c={a.concurrency} limits_on", a.concurrency,
                            a.profile_seconds + 1)
        for _pid, _out, spy in spies:
            spy.wait(timeout=60)
        profile = analyse_profile([out for _p, out, _s in spies], a.profile_rate,
                                  a.profile_seconds)
        profile.update(run=run, idle_included=False,
                       raw_files=[str(out) for _p, out, _s in spies])
        return profile

    def finish(self) -> dict[str, Any]:
        """Profile if asked, then check the ledgers and the limit counters."""
        out: dict[str, Any] = {"rounds": self.rounds,
                               "profile": self._profile() if self.args.profile else None}
        lines = []
        ok = True
        out["ledger_check"] = {}
        for name in ("limits_off", "limits_on"):
            rows = ledger_requests(self.targets[name], self.since)
            check = ledger_check(self.phases[name], rows)
            out["ledger_check"][name] = check
            ok = ok and check["ok"]
            lines.append(f"Ledger check {name}: {'OK' if check['ok'] else 'MISMATCH'}: "
                         f"{rows} rows for {check['sent']} requests sent (wrk in flight at its "
                         f"deadline, completed and metered: {check['wrk_abandoned']})")
        limits = self._limits_check()
        out["limits_check"] = limits
        ok = ok and limits["ok"] is not False
        lines.append(f"Limits check: {limits['text']}")
        out["checks_ok"], out["checks_text"] = ok, "\n".join(lines)
        return out

    def _limits_check(self) -> dict[str, Any]:
        """The tokens/day counter must equal the ledger's tokens (every call settled to its
        real usage), and no call may still hold a concurrency slot."""
        if datetime.now(UTC).date() != self.started_day:
            return {"ok": None, "text": "skipped (the run crossed midnight UTC)"}
        target = self.targets["limits_on"]
        auth = {"Authorization": target.headers["Authorization"]}
        deadline = time.monotonic() + 10
        while True:
            status, data = http_get(target.host, target.port, f"/v1/users/{USER}/quota", auth)
            u_status, u_data = http_get(target.host, target.port,
                                        f"/v1/usage?from={quote(self.since)}", auth)
            if status != 200 or u_status != 200:
                raise BenchError(f"quota {status} / usage {u_status}: {data[:200]!r}")
            used = {line["metric"]: line["used"] for line in json.loads(data)["limits"]}
            ledger_tokens = int(json.loads(u_data)["totals"]["total_tokens"])
            ok = used.get("tokens") == ledger_tokens and used.get("concurrent") == 0
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {"ok": ok, "counter_tokens": used.get("tokens"), "ledger_tokens": ledger_tokens,
                "concurrent_in_use": used.get("concurrent"),
                "text": f"{'OK' if ok else 'MISMATCH'}: tokens/day counter "
                        f"{used.get('tokens')} vs ledger {ledger_tokens} tokens; concurrent "
                        f"slots still held {used.get('concurrent')}"}
