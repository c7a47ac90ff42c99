"""bench/hotpath.py's results: medians across rounds, what each target adds to the direct call,
Meterlane as a share of the bare forwarder, the issue's targets, the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench._hotpath_servers import BARE, DIRECT, ML_PG, ML_PG_MEM

# Issue 20's targets, judged with limits on (ml-pg+redis); shown for every Meterlane target.
ADDED_P50_MS = 1.5
ADDED_P99_MS = 4.0
C32_SHARE_OF_BARE = 0.60
TTFT_ADDED_MS = 1.5
RSS_MB = 150.0
RSS_STREAMS = 1000

# (row label, scenario, getter, kind): kind "ms" shows what the target adds to direct,
# "rate" the target's share of the bare forwarder's rate.
METRICS: list[tuple[str, str, Callable[[dict[str, Any]], float], str]] = [
    ("non-streamed c=1 p50 ms", "c1", lambda x: x["latency_ms"]["p50"], "ms"),
    ("non-streamed c=1 p99 ms", "c1", lambda x: x["latency_ms"]["p99"], "ms"),
    ("non-streamed c=32 req/s", "c32", lambda x: x["rps"], "rate"),
    ("streamed c=1 TTFT p50 ms", "stream", lambda x: x["ttft_ms"]["p50"], "ms"),
    ("streamed c=1 TTFT p99 ms", "stream", lambda x: x["ttft_ms"]["p99"], "ms"),
    ("streamed c=32 streams/s", "s32", lambda x: x["rps"], "rate"),
]


def _med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarise(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per metric and target: the median across rounds, the median of the per-round
    differences to direct ("added") and of the per-round ratios to bare ("of_bare")."""
    out: dict[str, Any] = {}
    for label, scen, get, kind in METRICS:
        if not rounds or scen not in rounds[0]:
            continue
        row: dict[str, Any] = {"kind": kind}
        for name in names:
            vals = [get(r[scen][name]) for r in rounds]
            cell: dict[str, Any] = {"median": _med(vals), "rounds": vals}
            if kind == "ms" and name != DIRECT:
                cell["added"] = _med([get(r[scen][name]) - get(r[scen][DIRECT]) for r in rounds])
            if kind == "rate" and name not in (DIRECT, BARE):
                cell["of_bare"] = _med([get(r[scen][name]) / max(get(r[scen][BARE]), 1e-9)
                                        for r in rounds])
            row[name] = cell
        out[label] = row
    return out


def check_targets(summary: dict[str, Any], rss: dict[str, Any] | None,
                  names: list[str]) -> list[dict[str, Any]]:
    """The issue's targets for each Meterlane target (the issue judges ml-pg+redis)."""
    out = []

    def add(name: str, text: str, value: float, ok: bool) -> None:
        out.append({"target_of": name, "target": text, "value": value, "pass": ok,
                    "judged": name == ML_PG})

    for name in names:
        if name in (DIRECT, BARE):
            continue
        if "non-streamed c=1 p50 ms" in summary:
            v = summary["non-streamed c=1 p50 ms"][name]["added"]
            add(name, f"added p50 at c=1 <= {ADDED_P50_MS} ms", v, v <= ADDED_P50_MS)
            v = summary["non-streamed c=1 p99 ms"][name]["added"]
            add(name, f"added p99 at c=1 <= {ADDED_P99_MS} ms", v, v <= ADDED_P99_MS)
        if "non-streamed c=32 req/s" in summary:
            v = summary["non-streamed c=32 req/s"][name]["of_bare"]
            add(name, f"c=32 throughput >= {C32_SHARE_OF_BARE:.0%} of bare", v,
                v >= C32_SHARE_OF_BARE)
        if "streamed c=1 TTFT p50 ms" in summary:
            v = summary["streamed c=1 TTFT p50 ms"][name]["added"]
            add(name, f"streamed TTFT added (p50) <= {TTFT_ADDED_MS} ms", v, v <= TTFT_ADDED_MS)
        if rss and name in rss:
            r = rss[name]
            ok = r["rss_peak_max_mb"] <= RSS_MB and r["all_open"] and r["failed"] == 0 \
                and r["streams"] >= RSS_STREAMS
            add(name, f"RSS per worker <= {RSS_MB:g} MB with {r['streams']} open streams",
                r["rss_peak_max_mb"], ok)
    return out


def _cell(row: dict[str, Any], name: str) -> str:
    cell = row[name]
    if row["kind"] == "ms":
        text = f"{cell['median']:.3f}"
        return text + (f" (+{cell['added']:.3f})" if "added" in cell else "")
    text = f"{cell['median']:,.0f}"
    return text + (f" ({cell['of_bare']:.0%} of bare)" if "of_bare" in cell else "")


def table(summary: dict[str, Any], rss: dict[str, Any] | None, names: list[str]) -> list[str]:
    """The one-run table, as Markdown (bench/README.md takes it as printed)."""
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for label, row in summary.items():
        lines.append(f"| {label} | " + " | ".join(_cell(row, n) for n in names) + " |")
    if rss:
        streams = max(r["streams"] for r in rss.values())
        cells = []
        for n in names:
            r = rss.get(n)
            cells.append("" if r is None else
                         f"{r['rss_peak_max_mb']:.0f} (idle "
                         f"{max(r['rss_idle_mb'].values()):.0f})"
                         + ("" if r["all_open"] and not r["failed"] else " INCOMPLETE"))
        lines.append(f"| RSS MB, largest worker, {streams} open streams | "
                     + " | ".join(cells) + " |")
    return lines


def print_report(meta: dict[str, Any], summary: dict[str, Any], rss: dict[str, Any] | None,
                 targets: list[dict[str, Any]], ledgers: dict[str, Any],
                 names: list[str]) -> None:
    title = (f"Meterlane {meta['git_commit']} hot path: {meta['workers']} workers each, "
             f"{meta['rounds']} interleaved rounds x {meta['duration_s']} s, medians "
             f"({meta['cpus']} CPUs, load {' '.join(meta['loadavg_at_start'])} at start)")
    print()
    print(title)
    print("-" * len(title))
    print("ms rows: (+ what the target adds to direct, median of per-round differences); "
          "rate rows: (share of the bare forwarder's rate, median of per-round ratios)")
    print()
    for line in table(summary, rss, names):
        print(line)
    print()
    for t in targets:
        value = f"{t['value']:.0%}" if "throughput" in t["target"] else f"{t['value']:+.3f}" \
            if "ms" in t["target"] and "RSS" not in t["target"] else f"{t['value']:.1f} MB"
        judged = "" if t["judged"] else ("  (for information: limits in the worker's memory)"
                                         if t["target_of"] == ML_PG_MEM
                                         else "  (for information: limits off)")
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target_of']}: {t['target']}: "
              f"{value}{judged}")
    if meta.get("contended_runs"):
        print(f"WARNING: other processes used > 0.2 cores during: {meta['contended_runs']}")
    print()
    for name, check in ledgers.items():
        print(f"Ledger check {name}: {'OK' if check['ok'] else 'MISMATCH'}: "
              f"{check['ledger_rows']} rows for {check['sent']} requests sent (wrk in flight "
              f"at its deadline, completed and metered: {check['wrk_abandoned']}); rows "
              f"not yet committed as a load ended, at most "
              f"{max((p.get('behind_at_end', 0) for p in check['phases']), default=0)}")
        for phase in check["phases"]:
            if not phase["ok"]:
                print(f"  phase {phase['phase']}: ledger +{phase['ledger_delta']} vs sent "
                      f"{phase['sent']}")
