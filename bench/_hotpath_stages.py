"""Where a call's time goes (bench/hotpath.py --profile), two ways:

  * wall time per stage at one connection: a one-worker `meterlane serve` of the same setup
    (same config, database, Redis) whose app has a stopwatch on each stage
    (bench/_stage_app.py), under `wrk -c1`: microseconds per call and share of the call's
    time in the worker;
  * CPU per stage at 32 connections: py-spy samples the setup's own workers under wrk -c32;
    each sample goes to the innermost stage on its stack (the stages of _stage_app.STAGES),
    else to the package it is in.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._hotpath_servers import Servers
from bench._load import Target, run_python_client, run_wrk
from bench._procs import ROOT, Processes, free_port, http_get, log, wait_healthy
from bench._profile import _area, analyse_profile, profile_workers, read_stacks
from bench._stage_app import STAGES


def _stage_server(procs: Processes, env: dict[str, str], tmp: Path) -> tuple[int, int]:
    port = free_port()
    log_path = tmp / "stage-app.log"
    proc = procs.start("meterlane serve (stage timing)", [
        sys.executable, "-m", "bench._stage_app", "--port", str(port), "--workers", "1"],
        stop_signal=signal.SIGINT, env=env, cwd=ROOT, stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT)
    wait_healthy(proc, port, 1, log_path)
    return proc.pid, port


def _stage_times(s: Servers, name: str, body: bytes, streamed: bytes,
                 args: argparse.Namespace, procs: Processes, tmp: Path
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage table at c=1 for non-streamed calls (wrk), then for streams (one client,
    read to the end: the stream's stages up to its first token and after)."""
    main = s.targets[name]
    pid, port = _stage_server(procs, s.envs[name], tmp)
    # The same name: its calls go to the setup's ledger and count in its ledger check.
    target = Target(name, "127.0.0.1", port, main.path, main.headers)

    def c1(seconds: int) -> Any:
        return lambda: run_wrk(target, body, connections=1, threads=1, duration=seconds,
                               workdir=tmp, procs=procs, probe=None)

    s.phase(target, "stage timing warm-up", c1(2))
    http_get_post(port)
    result = s.phase(target, "stage timing c=1", c1(args.profile_seconds))
    plain = _read_stages(port, result["latency_ms"])
    http_get_post(port)
    result = s.phase(target, "stage timing, streams", lambda: run_python_client(
        target, streamed, duration=args.profile_seconds, stream=True, probe=None))
    streams = _read_stages(port, result["ttft_ms"])
    procs.stop(next(p for _n, p, _s in procs.procs if p.pid == pid), signal.SIGINT)
    return plain, streams


def _read_stages(port: int, latency: dict[str, float]) -> dict[str, Any]:
    # The last call's settle and commit run after its answer: wait for the requests counted
    # to stop moving (each is counted once its body is closed), then read.
    _, data = http_get("127.0.0.1", port, "/_bench/stages")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.1)
        _, again = http_get("127.0.0.1", port, "/_bench/stages")
        if again == data:
            break
        data = again
    doc = json.loads(data)
    n = max(doc["requests"], 1)
    total = doc["stages"].get("request total (in the worker)", {"seconds": 0.0})["seconds"]
    rows = []
    inside = 0.0
    for stage, v in sorted(doc["stages"].items(), key=lambda kv: -kv[1]["seconds"]):
        if stage.startswith("request total"):
            continue
        if "[outside a request]" not in stage:
            inside += v["seconds"]
        rows.append({"stage": stage, "us_per_call": round(1e6 * v["seconds"] / n, 1),
                     "calls_per_request": round(v["calls"] / n, 2),
                     "share_pct": round(100 * v["seconds"] / total, 1) if total else None})
    rows.append({"stage": "other in the worker (fast path glue, logging, writing the answer)",
                 "us_per_call": round(1e6 * (total - inside) / n, 1), "calls_per_request": 1,
                 "share_pct": round(100 * (total - inside) / total, 1) if total else None})
    return {"requests": doc["requests"], "worker_total_us": round(1e6 * total / n, 1),
            "wrk_p50_ms": latency["p50"], "wrk_mean_ms": latency["mean"], "stages": rows,
            "switches": {k: round(v / n, 2) for k, v in doc.get("switches", {}).items()}}


def http_get_post(port: int) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/_bench/stages")
    conn.getresponse().read()
    conn.close()


def _match_rules() -> list[tuple[str, str, str]]:
    """(file suffix, function name, stage) for the py-spy frames."""
    return [(module.replace(".", "/") + ".py", path, stage) for module, path, stage in STAGES]


def classify(files: list[Path]) -> dict[str, Any]:
    """Each busy sample to the innermost stage on its stack, else to its leaf's package."""
    rules = _match_rules()
    counts: Counter[str] = Counter()
    total = 0
    for frames, count in read_stacks(files):
        total += count
        stage = None
        for m in reversed(frames):
            # (py-spy names a method Class.method, as the rules do)
            stage = next((st for suffix, func, st in rules
                          if m["func"] == func and m["file"].endswith(suffix)), None)
            if stage:
                break
        counts[stage or f"not in a stage: {_area(frames[-1]['file'])}"] += count
    return {"samples": total, "stages": [(k, round(100 * v / total, 1))
                                         for k, v in counts.most_common(30)] if total else []}


def _pyspy(s: Servers, name: str, body: bytes, args: argparse.Namespace, procs: Processes,
           tmp: Path) -> dict[str, Any]:
    workers, rate = s.workers[name], 250
    spies = profile_workers(workers, args.profile_seconds, rate, tmp, procs)
    time.sleep(0.5)  # let py-spy attach before the load starts
    s.phase(s.targets[name], "py-spy c=32", lambda: run_wrk(
        s.targets[name], body, connections=args.concurrency, threads=1,
        duration=args.profile_seconds + 1, workdir=tmp, procs=procs, probe=None))
    for _pid, _out, spy in spies:
        spy.wait(timeout=60)
    files = [out for _pid, out, _spy in spies]
    out = analyse_profile(files, rate, args.profile_seconds)
    out["by_stage"] = classify(files)
    out["raw_files"] = [str(f) for f in files]
    return out


def profile_stages(s: Servers, name: str, body: bytes, streamed: bytes,
                   args: argparse.Namespace, procs: Processes, tmp: Path) -> dict[str, Any]:
    log(f"profiling {name}: stage timing at c=1 ({args.profile_seconds} s), then py-spy "
        f"under c={args.concurrency}")
    plain, streams = _stage_times(s, name, body, streamed, args, procs, tmp)
    out: dict[str, Any] = {"setup": name, "stage_times": plain, "stream_stage_times": streams}
    try:
        out["pyspy"] = _pyspy(s, name, body, args, procs, tmp)
    except Exception as exc:  # noqa: BLE001 - py-spy needs ptrace rights; the rest stands
        log(f"py-spy profile skipped: {exc}")
        out["pyspy"] = None
    return out


def print_stages(p: dict[str, Any]) -> None:
    _print_table(p["stage_times"], f"Wall time per stage, {p['setup']}, c=1", "wrk p50")
    if p.get("stream_stage_times"):
        _print_table(p["stream_stage_times"], f"Wall time per stage, {p['setup']}, streams "
                     "one at a time (the whole stream)", "first token p50")
    spy = p.get("pyspy")
    if spy:
        print(f"\nCPU per stage, {p['setup']}, py-spy under c=32 ({spy['samples']} busy "
              f"samples; workers busy {spy['busy_share_pct']}% of the time)")
        for stage, pct in spy["by_stage"]["stages"]:
            print(f"  {pct:5.1f}%  {stage}")
        if p.get("raw_kept"):
            print(f"  raw stacks: {', '.join(spy['raw_files'])}")
        else:
            print("  (py-spy's raw stacks are kept with --keep-tmp)")


def _print_table(st: dict[str, Any], title: str, what: str) -> None:
    print(f"\n{title} ({st['requests']} calls; {st['worker_total_us']:.0f} us a call in the "
          f"worker; {what} {st['wrk_p50_ms']:.3f} ms, mean {st['wrk_mean_ms']:.3f} ms, on the "
          "stage-timed server)")
    print("| stage | us per call | calls per call | share of the worker's time |")
    print("| --- | --- | --- | --- |")
    for row in st["stages"]:
        share = "" if row["share_pct"] is None or "[outside" in row["stage"] \
            else f"{row['share_pct']:.1f}%"
        print(f"| {row['stage']} | {row['us_per_call']:.1f} | {row['calls_per_request']} "
              f"| {share} |")
    if st.get("switches"):  # BENCH_SWITCHES=1
        print("Where a call's greenlet gave the hub a turn (times per call):")
        for where, per_call in st["switches"].items():
            print(f"  {per_call:6.2f}  {where}")
