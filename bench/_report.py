"""Results of a run: the ledger check, medians across rounds, targets, the printed table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from bench._load import Target
from bench._procs import BenchError, http_get

TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 5.0
TARGET_RPS_C32 = 1000.0


# -- the ledger check ------------------------------------------------------------------------


def ledger_requests(gateway: Target, since: str) -> int:
    status, data = http_get(gateway.host, gateway.port, f"/v1/usage?from={quote(since)}",
                            headers={"Authorization": gateway.headers["Authorization"]})
    if status != 200:
        raise BenchError(f"GET /v1/usage answered {status}: {data[:300]!r}")
    return int(json.loads(data)["totals"]["requests"])


def wait_ledger(gateway: Target, since: str, expected: int, timeout: float = 15) -> int:
    """The ledger's row count once it reaches `expected` or stops moving."""
    deadline = time.monotonic() + timeout
    last, stable_since = -1, time.monotonic()
    while True:
        count = ledger_requests(gateway, since)
        if count == expected:
            return count
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 2 or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def metered_phase(target: Target, since: str, name: str, fn: Callable[[], dict[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a load against a gateway: (its result, the phase of the ledger check: requests
    sent, ledger rows added meanwhile, and how many of them were not committed yet as the
    load ended: a writer slower than the calls leaves a backlog that grows with the load)."""
    before = ledger_requests(target, since)
    result = fn()
    behind = before + result["sent"] - ledger_requests(target, since)
    after = wait_ledger(target, since, before + result["sent"])
    return result, {"phase": name, "tool": result["tool"], "sent": result["sent"],
                    "ok_2xx": result["ok_2xx"], "non_2xx": result["non_2xx"],
                    "abandoned": result["abandoned_in_flight"], "ledger_delta": after - before,
                    "ok": after - before == result["sent"], "behind_at_end": behind}


def ledger_check(phases: list[dict[str, Any]], ledger_rows: int) -> dict[str, Any]:
    """The ledger's row count against the requests sent to the gateway, phase by phase."""
    wrk_phases = [p for p in phases if p["tool"] == "wrk"]
    py_phases = [p for p in phases if p["tool"] != "wrk"]
    sent = sum(p["sent"] for p in phases)
    ledger = {
        "ledger_rows": ledger_rows, "sent": sent,
        "wrk_ok_2xx": sum(p["ok_2xx"] for p in wrk_phases),
        "wrk_non_2xx": sum(p["non_2xx"] for p in wrk_phases),
        "wrk_abandoned": sum(p["abandoned"] for p in wrk_phases),
        "wrk_ledger_rows": sum(p["ledger_delta"] for p in wrk_phases),
        "python_sent": sum(p["sent"] for p in py_phases),
        "phases": phases,
    }
    ledger["ok"] = ledger_rows == sent and all(p["ok"] for p in phases)
    return ledger


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    """Whether the summary meets each target it has figures for."""
    targets = {}
    if "c1" in summary:
        targets["added_p50_ms<=2"] = summary["c1"]["p50"]["added"] <= TARGET_ADDED_P50_MS
        targets["added_p99_ms<=5"] = summary["c1"]["p99"]["added"] <= TARGET_ADDED_P99_MS
    if "c32" in summary:
        targets["c32_rps>=1000"] = summary["c32"]["rps"]["gateway"] >= TARGET_RPS_C32
    return targets


# -- the summary -----------------------------------------------------------------------------


def median_of(rounds: list[dict[str, Any]], getter: Callable[[dict[str, Any]], float]) -> float:
    return round(statistics.median(getter(r) for r in rounds), 3)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def both(scenario: str, getter: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
        d = [getter(r[scenario]["direct"]) for r in rounds]
        g = [getter(r[scenario]["gateway"]) for r in rounds]
        added = [gv - dv for gv, dv in zip(g, d, strict=True)]
        return {"direct": round(statistics.median(d), 3), "gateway": round(statistics.median(g), 3),
                "added": round(statistics.median(added), 3),
                "direct_rounds": d, "gateway_rounds": g}

    out: dict[str, Any] = {}
    if rounds and "c1" in rounds[0]:
        out["c1"] = {k: both("c1", lambda x, k=k: x["latency_ms"][k])
                     for k in ("p50", "p99", "mean")}
        out["c1"]["rps"] = both("c1", lambda x: x["rps"])
    if rounds and "c32" in rounds[0]:
        out["c32"] = {"rps": both("c32", lambda x: x["rps"]),
                      "p50": both("c32", lambda x: x["latency_ms"]["p50"]),
                      "p99": both("c32", lambda x: x["latency_ms"]["p99"])}
        if "cpu_cores" in rounds[0]["c32"]["gateway"]:
            out["c32"]["cpu_cores_gateway_run"] = {
                k: median_of([r["c32"]["gateway"] for r in rounds],
                             lambda x, k=k: x["cpu_cores"][k])
                for k in rounds[0]["c32"]["gateway"]["cpu_cores"]}
            out["c32"]["cpu_cores_direct_run"] = {
                k: median_of([r["c32"]["direct"] for r in rounds],
                             lambda x, k=k: x["cpu_cores"][k])
                for k in rounds[0]["c32"]["direct"]["cpu_cores"]}
    if rounds and "stream" in rounds[0]:
        out["stream"] = {
            "ttft_p50": both("stream", lambda x: x["ttft_ms"]["p50"]),
            "ttft_p99": both("stream", lambda x: x["ttft_ms"]["p99"]),
            "total_p50": both("stream", lambda x: x["latency_ms"]["p50"]),
            "total_p99": both("stream", lambda x: x["latency_ms"]["p99"]),
            "requests": both("stream", lambda x: x["ok_2xx"]),
        }
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(meta: dict[str, Any], summary: dict[str, Any], ledger: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, str]] = []

    def rng(values: list[float]) -> str:
        return f"{min(values):.2f}..{max(values):.2f}"

    def add(label: str, m: dict[str, Any], fmt: str = "{:.3f}", added: bool = True,
            target: str = "") -> None:
        rows.append((label, fmt.format(m["direct"]), fmt.format(m["gateway"]),
                     f"{m['added']:+.3f}" if added else "",
                     target or f"gw {rng(m['gateway_rounds'])}"))

    if "c1" in summary:
        c1 = summary["c1"]
        ok50 = verdict(c1["p50"]["added"] <= TARGET_ADDED_P50_MS)
        ok99 = verdict(c1["p99"]["added"] <= TARGET_ADDED_P99_MS)
        add("non-stream c=1   p50 ms", c1["p50"],
            target=f"added <= {TARGET_ADDED_P50_MS:g} ms: {ok50}")
        add("non-stream c=1   p99 ms", c1["p99"],
            target=f"added <= {TARGET_ADDED_P99_MS:g} ms: {ok99}")
        add("non-stream c=1   mean ms", c1["mean"])
        add("non-stream c=1   req/s", c1["rps"], "{:.0f}", added=False)
    if "c32" in summary:
        c32 = summary["c32"]
        ok = verdict(c32["rps"]["gateway"] >= TARGET_RPS_C32)
        spread = rng(c32["rps"]["gateway_rounds"])
        add("non-stream c=32  req/s", c32["rps"], "{:.0f}", added=False,
            target=f"gw >= {TARGET_RPS_C32:g}/s: {ok} (gw {spread})")
        add("non-stream c=32  p50 ms", c32["p50"])
        add("non-stream c=32  p99 ms", c32["p99"])
    if "stream" in summary:
        s = summary["stream"]
        add("stream c=1  TTFT p50 ms", s["ttft_p50"])
        add("stream c=1  TTFT p99 ms", s["ttft_p99"])
        add("stream c=1  total p50 ms", s["total_p50"])
        add("stream c=1  total p99 ms", s["total_p99"])
    widths = [max(len(r[i]) for r in [*rows, ("", "direct", "gateway", "added", "")])
              for i in range(5)]
    title = (f"Meterlane {meta['git_commit']} gateway overhead: {meta['database']}, "
             f"{meta['workers']} workers, "
             f"{meta['rounds']} rounds x {meta['duration_s']} s, medians across rounds "
             f"({meta['cpus']} CPUs)")
    print()
    print(title)
    print("-" * len(title))
    head = ("", "direct", "gateway", "added", "target / spread of gateway over rounds")
    for r in [head, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  "
              f"{r[3]:>{widths[3]}}  {r[4]}")
    if "c32" in summary and "cpu_cores_gateway_run" in summary["c32"]:
        cores = summary["c32"]["cpu_cores_gateway_run"]
        print("CPU cores in use during the c=32 gateway run: "
              + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    if meta.get("max_other_cores", 0) > 0.2:
        print(f"WARNING: processes outside this benchmark used up to {meta['max_other_cores']:.2f}"
              f" cores during a measured run ({meta['contended_runs']}): the machine was "
              "shared, figures of those runs are low; see other_processes in the JSON")
    print()
    status = "OK" if ledger["ok"] else "MISMATCH"
    print(f"Ledger check: {status}: GET /v1/usage totals.requests = {ledger['ledger_rows']}; "
          f"requests sent to the gateway = {ledger['sent']} "
          f"(wrk 2xx completed {ledger['wrk_ok_2xx']} + wrk non-2xx {ledger['wrk_non_2xx']} "
          f"+ wrk in flight at its deadline {ledger['wrk_abandoned']} "
          f"+ python client {ledger['python_sent']})")
    print(f"  ledger rows for the wrk runs = {ledger['wrk_ledger_rows']} vs wrk 2xx completed "
          f"{ledger['wrk_ok_2xx']} (+{ledger['wrk_abandoned']} sent but cut off by wrk's timer, "
          "which the gateway completed and metered)")
    for phase in ledger["phases"]:
        if not phase["ok"]:
            print(f"  phase {phase['phase']}: ledger +{phase['ledger_delta']} "
                  f"vs sent {phase['sent']}")
