"""Results of the limits bench: medians across rounds, the targets, the printed tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench._report import TARGET_ADDED_P50_MS, TARGET_ADDED_P99_MS, TARGET_RPS_C32, verdict

TARGET_LIMITS_P50_MS = 0.5
GATEWAYS = ("direct", "limits_off", "limits_on")
LABELS = {"direct": "direct", "limits_off": "limits off", "limits_on": "limits on"}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


# -- store throughput ------------------------------------------------------------------------


def summarise_store(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds of each store phase and EVALSHA ceiling, and their ratios."""
    phases: dict[str, Any] = {}
    for name in rounds[0]["phases"] if rounds else []:
        runs = [r["phases"][name] for r in rounds if name in r["phases"]]

        def med(get: Callable[[dict[str, Any]], float], runs: list[Any] = runs) -> float:
            return _median([get(x) for x in runs])

        phases[name] = {
            "store": runs[0]["store"], "mode": runs[0]["mode"], "clients": runs[0]["clients"],
            "users": runs[0]["users"], "pairs_per_s": med(lambda x: x["pairs_per_s"]),
            "pairs_per_s_rounds": [x["pairs_per_s"] for x in runs],
            "pair_p50_ms": med(lambda x: x["pair_ms"]["p50"]),
            "pair_p99_ms": med(lambda x: x["pair_ms"]["p99"]),
            "failed": sum(x["failed"] for x in runs),
            "cpu_cores": {k: med(lambda x, k=k: x["cpu_cores"].get(k, 0.0))
                          for k in runs[0]["cpu_cores"]},
        }
        if "server" in runs[0]:
            phases[name]["server_usec_per_script"] = med(
                lambda x: x["server"]["server_usec_per_call"])
    ceilings: dict[str, Any] = {}
    for clients in rounds[0]["evalsha"] if rounds else []:
        runs = [r["evalsha"][clients] for r in rounds if clients in r["evalsha"]]
        ceilings[clients] = {
            "clients": int(clients),
            "evalsha_per_s": _median([x["evalsha_per_s"] for x in runs]),
            "evalsha_per_s_rounds": [x["evalsha_per_s"] for x in runs],
            "server_usec_per_call": _median([x["server"]["server_usec_per_call"] for x in runs])}
    for phase in phases.values():
        if phase["store"] not in ("redis", "engine"):
            continue
        same = ceilings.get(str(phase["clients"]))
        top = max(ceilings.values(), key=lambda c: c["evalsha_per_s"], default=None)
        phase["scripts_per_s"] = round(2 * phase["pairs_per_s"], 1)
        if same:
            phase["vs_evalsha_same_clients"] = {
                "clients": same["clients"], "evalsha_per_s": same["evalsha_per_s"],
                "pairs_share": round(phase["pairs_per_s"] / same["evalsha_per_s"], 4),
                "scripts_share": round(2 * phase["pairs_per_s"] / same["evalsha_per_s"], 4)}
        if top:
            phase["vs_evalsha_ceiling"] = {
                "clients": top["clients"], "evalsha_per_s": top["evalsha_per_s"],
                "pairs_share": round(phase["pairs_per_s"] / top["evalsha_per_s"], 4),
                "scripts_share": round(2 * phase["pairs_per_s"] / top["evalsha_per_s"], 4)}
    return {"phases": phases, "evalsha": ceilings}


def print_store(summary: dict[str, Any], meta: dict[str, Any]) -> None:
    title = (f"Limit store throughput: reserve + settle pairs, plan of 3 checks (tokens/day, "
             f"requests/minute, concurrent); medians of {meta['rounds']} rounds x "
             f"{meta['duration_s']} s")
    print()
    print(title)
    print("-" * len(title))
    head = ("", "pairs/s", "scripts/s", "vs EVALSHA same c", "pair p50", "pair p99",
            "redis cores", "client cores", "srv us/script")
    rows = [head]
    for name, p in summary["phases"].items():
        same = p.get("vs_evalsha_same_clients")
        cores = p["cpu_cores"]
        rows.append((
            name, f"{p['pairs_per_s']:,.0f}",
            f"{p['scripts_per_s']:,.0f}" if "scripts_per_s" in p else "",
            f"{100 * same['scripts_share']:.1f}% of {same['evalsha_per_s']:,.0f}" if same else "",
            f"{p['pair_p50_ms']:.3f} ms", f"{p['pair_p99_ms']:.3f} ms",
            f"{cores.get('redis-server', 0):.2f}" if p["store"] != "sql" else "",
            f"{cores.get('store clients', 0):.2f}",
            f"{p['server_usec_per_script']:.1f}" if "server_usec_per_script" in p else ""))
    for c in summary["evalsha"].values():
        rows.append((f"redis-benchmark EVALSHA 'return 1', c={c['clients']}", "",
                     f"{c['evalsha_per_s']:,.0f}", "", "", "", "", "",
                     f"{c['server_usec_per_call']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                        for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    print("scripts/s = 2 x pairs/s (a pair is one reserve and one settle script call); "
          "'vs EVALSHA same c': scripts/s as a share of redis-benchmark's rate with as many "
          "connections; srv us/script: Redis server time per EVALSHA (INFO commandstats)")
    busy = {n: p["cpu_cores"].get("other processes", 0.0) for n, p in summary["phases"].items()}
    if max(busy.values(), default=0.0) > 0.2:
        print("WARNING: processes outside this benchmark used CPU during store runs ("
              + ", ".join(f"{n} {v:.2f} cores" for n, v in busy.items() if v > 0.2)
              + "): the machine was shared, figures of those runs are low")
    top = max(summary["evalsha"].values(), key=lambda c: c["evalsha_per_s"], default=None)
    if top:
        for name, p in summary["phases"].items():
            if "vs_evalsha_ceiling" in p:
                v = p["vs_evalsha_ceiling"]
                print(f"  {name}: {p['pairs_per_s']:,.0f} pairs/s = {100 * v['pairs_share']:.1f}%"
                      f" of the EVALSHA ceiling ({top['evalsha_per_s']:,.0f}/s at "
                      f"c={top['clients']}); as script calls {100 * v['scripts_share']:.1f}%")


# -- the gateway -----------------------------------------------------------------------------


def summarise_gateway(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def metric(scenario: str, get: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
        per = {t: [get(r[scenario][t]) for r in rounds] for t in GATEWAYS}
        out: dict[str, Any] = {t: _median(v) for t, v in per.items()}
        for name, a, b in (("off_added", "limits_off", "direct"),
                           ("on_added", "limits_on", "direct"),
                           ("limits_added", "limits_on", "limits_off")):
            diffs = [x - y for x, y in zip(per[a], per[b], strict=True)]
            out[name] = _median(diffs)
            out[f"{name}_rounds"] = [round(d, 3) for d in diffs]
        out["rounds"] = per
        return out

    out: dict[str, Any] = {"contended_runs": {
        f"r{i + 1} {scenario} {t}": run["cpu_cores"]["other processes"]
        for i, rnd in enumerate(rounds) for scenario in ("c1", "c1paced", "c32")
        for t, run in rnd.get(scenario, {}).items()
        if run.get("cpu_cores", {}).get("other processes", 0.0) > 0.2}}
    if rounds and "c1" in rounds[0]:
        out["c1"] = {k: metric("c1", lambda x, k=k: x["latency_ms"][k])
                     for k in ("p50", "p99", "mean")}
        out["c1"]["rps"] = metric("c1", lambda x: x["rps"])
    if rounds and "c1paced" in rounds[0]:
        out["c1paced"] = {k: metric("c1paced", lambda x, k=k: x["latency_ms"][k])
                          for k in ("p50", "p99", "mean")}
    if rounds and "c32" in rounds[0]:
        out["c32"] = {"rps": metric("c32", lambda x: x["rps"]),
                      "p50": metric("c32", lambda x: x["latency_ms"]["p50"]),
                      "p99": metric("c32", lambda x: x["latency_ms"]["p99"])}
        if "cpu_cores" in rounds[0]["c32"]["limits_on"]:
            out["c32"]["cpu_cores"] = {
                t: {k: _median([r["c32"][t]["cpu_cores"][k] for r in rounds])
                    for k in rounds[0]["c32"][t]["cpu_cores"]} for t in GATEWAYS}
    return out


def check_gateway_targets(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, met, figures) for each target the summary has figures for."""
    out = []
    if "c1" in summary:
        p50, p99 = summary["c1"]["p50"], summary["c1"]["p99"]
        out.append((f"limits add <= {TARGET_LIMITS_P50_MS:g} ms p50 at c=1 (on - off)",
                    p50["limits_added"] <= TARGET_LIMITS_P50_MS,
                    f"{p50['limits_added']:+.3f} ms (rounds {p50['limits_added_rounds']})"))
        out.append((f"gateway, limits on: added p50 <= {TARGET_ADDED_P50_MS:g} ms at c=1",
                    p50["on_added"] <= TARGET_ADDED_P50_MS,
                    f"{p50['on_added']:+.3f} ms (limits off: {p50['off_added']:+.3f} ms)"))
        out.append((f"gateway, limits on: added p99 <= {TARGET_ADDED_P99_MS:g} ms at c=1",
                    p99["on_added"] <= TARGET_ADDED_P99_MS,
                    f"{p99['on_added']:+.3f} ms (limits off: {p99['off_added']:+.3f} ms)"))
    if "c1paced" in summary:
        paced = summary["c1paced"]["p50"]
        out.append((f"limits add <= {TARGET_LIMITS_P50_MS:g} ms p50 at c=1 paced (on - off)",
                    paced["limits_added"] <= TARGET_LIMITS_P50_MS,
                    f"{paced['limits_added']:+.3f} ms (rounds {paced['limits_added_rounds']})"))
    if "c32" in summary:
        rps = summary["c32"]["rps"]
        out.append((f"gateway, limits on: >= {TARGET_RPS_C32:,.0f} req/s at c=32",
                    rps["limits_on"] >= TARGET_RPS_C32,
                    f"{rps['limits_on']:,.0f} req/s (limits off: {rps['limits_off']:,.0f}; "
                    f"rounds {rps['rounds']['limits_on']})"))
    return out


def print_gateway(summary: dict[str, Any], meta: dict[str, Any]) -> None:
    title = (f"Gateway with limits off vs on ({meta['database']} ledger, Redis limit store, "
             f"{meta['workers']} workers each); medians of {meta['rounds']} rounds x "
             f"{meta['duration_s']} s")
    print()
    print(title)
    print("-" * len(title))
    head = ("", "direct", "limits off", "limits on", "off-direct", "on-direct", "on-off")
    rows = [head]

    def add(label: str, m: dict[str, Any], fmt: str = "{:.3f}", diffs: bool = True) -> None:
        rows.append((label, *(fmt.format(m[t]) for t in GATEWAYS),
                     *((f"{m[k]:+.3f}" for k in ("off_added", "on_added", "limits_added"))
                       if diffs else ("", "", ""))))

    if "c1" in summary:
        c1 = summary["c1"]
        add("c=1 p50 ms", c1["p50"])
        add("c=1 p99 ms", c1["p99"])
        add("c=1 mean ms", c1["mean"])
        add("c=1 req/s", c1["rps"], "{:,.0f}", diffs=False)
    if "c1paced" in summary:
        paced = summary["c1paced"]
        add(f"c=1 paced {meta['pace_ms']} ms p50 ms", paced["p50"])
        add(f"c=1 paced {meta['pace_ms']} ms p99 ms", paced["p99"])
    if "c32" in summary:
        c32 = summary["c32"]
        add(f"c={meta['concurrency']} req/s", c32["rps"], "{:,.0f}", diffs=False)
        add(f"c={meta['concurrency']} p50 ms", c32["p50"])
        add(f"c={meta['concurrency']} p99 ms", c32["p99"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                        for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    if "c1paced" in summary:
        print(f"c=1: closed loop, the next request is sent as soon as a reply arrives, so work "
              f"a gateway does after answering (the deferred settle) delays it; c=1 paced: wrk "
              f"waits {meta['pace_ms']} ms after each reply, so that work is not in the latency")
    cores = summary.get("c32", {}).get("cpu_cores")
    if cores:
        for t in ("limits_off", "limits_on"):
            print(f"CPU cores during the c={meta['concurrency']} {LABELS[t]} run: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in cores[t].items()))
    if summary["contended_runs"]:
        print("WARNING: processes outside this benchmark used CPU during gateway runs ("
              + ", ".join(f"{k} {v:.2f} cores" for k, v in summary["contended_runs"].items())
              + "): the machine was shared, figures of those runs are low")
    print()
    for target, ok, figures in check_gateway_targets(summary):
        print(f"{verdict(ok)}  {target}: {figures}")
