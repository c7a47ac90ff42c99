"""Gateway overhead: the same OpenAI call sent straight to an upstream and through Meterlane.

One run starts the fake upstream (tests.support.upstream) and a real `meterlane serve`
(gunicorn + gevent, metering on: every call writes a ledger row), then measures, in
interleaved rounds, direct vs gateway:

  * non-streaming chat completion at concurrency 1 (wrk --latency): p50 / p99 / mean latency
    and the latency the gateway adds;
  * non-streaming at concurrency 32 (wrk): requests per second;
  * streaming (16 content chunks) at concurrency 1 (a small http.client client): time to
    first token and total time.

It prints a table, writes a JSON result file (--out), checks that the ledger holds exactly one
row per request sent to the gateway, and stops everything it started (also on Ctrl-C).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
USER = "bench-user"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the quick brown fox"}]
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 5.0
TARGET_RPS_C32 = 1000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_INSTALL = "apt-get update && apt-get install -y wrk"


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------


class Processes:
    """Every process this run started; each in its own session so that Ctrl-C reaches only
    us, and stop_all() can end each one (and its children, e.g. gunicorn workers) by id."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], int]] = []

    def start(self, name: str, cmd: list[str], *, stop_signal: int = signal.SIGTERM,
              **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)  # noqa: S603
        self.procs.append((name, proc, stop_signal))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int, timeout: float = 20) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the session (process group) this run created
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in that group (e.g. workers of a killed master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name, proc, sig in reversed(self.procs):
            if proc.poll() is None:
                log(f"stopping {name} (pid {proc.pid})")
            self.stop(proc, sig)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy (anything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def pids_named(comm: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == comm:
                out.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return sorted(out)


# -- setup -----------------------------------------------------------------------------------


def start_upstream(procs: Processes, logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    err = (logdir / "upstream.log").open("wb")
    proc = procs.start("fake upstream",
                       [sys.executable, "-m", "tests.support.upstream", "--port", "0"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        raise BenchError(f"fake upstream did not start (see {logdir / 'upstream.log'})")
    return proc, match.group(1)


def write_config(path: Path, upstream_base: str) -> None:
    path.write_text(f"""
[[upstreams]]
name = "fake"
base_url = "{upstream_base}"

[[models]]
name = "{MODEL}"
upstream = "fake"
price = {{ input = "0.15", output = "0.60" }}
""")


def postgres_database(admin_url: str, name: str) -> str:
    """Drop and create database `name` on the server of admin_url; returns its URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    if name in ("postgres", "template0", "template1") or not re.fullmatch(r"\w+", name):
        raise BenchError(f"refusing to drop and recreate database {name!r}")
    url = make_url(admin_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    libpq = make_url(admin_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def git_version() -> str:
    """HEAD's short hash, with "+dirty" when meterlane/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,  # noqa: S607
                              text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "meterlane") else "")


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meterlane.cli", *args], env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise BenchError(f"meterlane {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_healthy(proc: subprocess.Popen[bytes], port: int, workers: int, logfile: Path,
                 timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"meterlane serve exited with {proc.returncode}:\n"
                             + logfile.read_text()[-3000:])
        try:
            status, _ = http_get("127.0.0.1", port, "/healthz", timeout=2)
            if status == 200 and len(children_of(proc.pid)) >= workers:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError("meterlane serve did not become healthy:\n" + logfile.read_text()[-3000:])


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str  # "direct" or "gateway"
    host: str
    port: int
    path: str
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


def chat_body(*, stream: bool, words: int, chunk_delay_ms: float) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": words}
    if stream:
        # The gateway always asks its upstream for the usage chunk; the client asks too, so
        # that the upstream does the same work on both paths.
        body.update(stream=True, stream_options={"include_usage": True})
        if chunk_delay_ms:
            body["fake"] = {"chunk_delay_ms": chunk_delay_ms}
    return json.dumps(body, separators=(",", ":")).encode()


def lua_quote(text: str) -> str:
    level = "=" * 4
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def wrk_script(target: Target, body: bytes) -> str:
    headers = "\n".join(f"  wrk.headers[ {lua_quote(k)} ] = {lua_quote(v)}"
                        for k, v in target.headers.items())
    return f"""-- generated by bench/gateway_overhead.py
local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  wrk.method = "POST"
  wrk.body = {lua_quote(body.decode())}
{headers}
  req = wrk.format()
end

-- Called once per request written: counts what was sent, so that requests wrk abandoned
-- in flight when its timer expired can be told apart from lost ledger rows.
function request()
  sent = sent + 1
  return req
end

function done(summary, latency, requests)
  -- wrk calls request() once on thread 0 before the run, to check the script
  -- (script_verify_request): that call sent nothing.
  local total_sent = -1
  for _, t in ipairs(threads) do
    total_sent = total_sent + t:get("sent")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"duration_us":%d,"requests":%d,"sent":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}}}\\n',
    summary.duration, summary.requests, total_sent, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


@dataclass
class CpuProbe:
    """CPU seconds used by each watched process between start() and stop()."""

    pids: dict[str, list[int]]
    dynamic: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    _dynamic_pids: dict[str, list[int]] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        for name, pids in self._dynamic_pids.items():
            out[name] = sum(cpu_seconds(p) for p in pids)
        out["machine total"] = machine_busy_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["bench client"] = usage.ru_utime + usage.ru_stime
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["wrk"] = child.ru_utime + child.ru_stime  # reaped children: only wrk in between
        return out

    def start(self) -> None:
        # Processes found at the start (e.g. Postgres backends of the pooled connections).
        self._dynamic_pids = {name: fn() for name, fn in self.dynamic.items()}
        self.before = self._read()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._read()
        wall = time.monotonic() - self.wall
        out = {name: round((after[name] - self.before.get(name, 0.0)) / wall, 3)
               for name in after}
        # Whatever else ran on the machine meanwhile (other tenants, kernel threads).
        ours = sum(v for k, v in out.items() if k != "machine total")
        out["other processes"] = round(max(0.0, out["machine total"] - ours), 3)
        return out


def run_wrk(target: Target, body: bytes, *, connections: int, threads: int, duration: int,
            workdir: Path, procs: Processes, probe: CpuProbe | None) -> dict[str, Any]:
    script = workdir / f"wrk-{target.name}-c{connections}.lua"
    script.write_text(wrk_script(target, body))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", "10s", "--latency", "-s", str(script), target.url]
    if probe:
        probe.start()
    proc = procs.start("wrk", cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=duration + 60)
    cpu = probe.stop() if probe else None
    procs.procs = [p for p in procs.procs if p[1] is not proc]
    text = out.decode(errors="replace")
    match = re.search(r"^BENCHJSON (\{.*\})$", text, re.M)
    if proc.returncode != 0 or match is None or err.strip():
        raise BenchError(f"wrk failed ({proc.returncode}): {err.decode()}\n{text}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    non2xx = raw["errors"]["status"]
    ok = raw["requests"] - non2xx
    result: dict[str, Any] = {
        "tool": "wrk", "connections": connections, "threads": threads,
        "duration_s": round(seconds, 3), "completed": raw["requests"], "ok_2xx": ok,
        "non_2xx": non2xx, "sent": raw["sent"],
        "abandoned_in_flight": raw["sent"] - raw["requests"],
        "socket_errors": {k: v for k, v in raw["errors"].items() if k != "status"},
        "rps": round(ok / seconds, 1),
        "latency_ms": {k: round(lat[k] / 1000, 3)
                       for k in ("mean", "p50", "p90", "p99", "p999", "max", "min")},
    }
    if cpu is not None:
        result["cpu_cores"] = cpu
    if non2xx or any(result["socket_errors"].values()):
        log(f"WARNING {target.name} c={connections}: {non2xx} non-2xx, "
            f"socket errors {result['socket_errors']}")
    return result


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def _first_content(buf: bytes) -> bool:
    """Whether buf holds a complete SSE event with a non-empty content delta."""
    for event in buf.split(b"\n\n")[:-1]:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                doc = json.loads(payload)
            except ValueError:
                continue
            for choice in doc.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    return True
    return False


def run_python_client(target: Target, body: bytes, *, duration: float, stream: bool,
                      probe: CpuProbe | None) -> dict[str, Any]:
    """Sequential requests (concurrency 1) on one keep-alive connection for `duration` s.
    Times: first body byte, first content token (stream), full response."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
    headers = {**target.headers, "Content-Type": "application/json"}
    total: list[float] = []
    ttfb: list[float] = []
    ttft: list[float] = []
    sent = ok = bad = 0
    if probe:
        probe.start()
    started = time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        sent += 1
        conn.request("POST", target.path, body=body, headers=headers)
        resp = conn.getresponse()
        first_byte = first_token = None
        buf = b""
        while True:
            data = resp.read1(65536)
            if not data:
                break
            now = time.perf_counter_ns()
            if first_byte is None:
                first_byte = now
            buf += data
            if stream and first_token is None and _first_content(buf):
                first_token = now
        buf += resp.read()  # b"" here; marks a Content-Length reply done, so the conn is reused
        end = time.perf_counter_ns()
        good = resp.status == 200 and (not stream or b"data: [DONE]" in buf)
        if stream and good:
            chunks = sum(1 for ev in buf.split(b"\n\n") if b'"content":"' in ev
                         and b'"content":""' not in ev)
            good = first_token is not None and chunks > 0
        if not good:
            bad += 1
            continue
        ok += 1
        total.append((end - t0) / 1e6)
        ttfb.append(((first_byte or end) - t0) / 1e6)
        if first_token is not None:
            ttft.append((first_token - t0) / 1e6)
    elapsed = time.perf_counter() - started
    cpu = probe.stop() if probe else None
    conn.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 3) if values else float("nan"),
                "p50": round(percentile(values, 50), 3), "p90": round(percentile(values, 90), 3),
                "p99": round(percentile(values, 99), 3),
                "max": round(max(values), 3) if values else float("nan")}

    result: dict[str, Any] = {
        "tool": "python http.client", "connections": 1, "duration_s": round(elapsed, 3),
        "sent": sent, "completed": ok + bad, "ok_2xx": ok, "non_2xx": bad,
        "abandoned_in_flight": 0, "rps": round(ok / elapsed, 1),
        "latency_ms": summary(total), "first_byte_ms": summary(ttfb),
    }
    if stream:
        result["ttft_ms"] = summary(ttft)
    if cpu is not None:
        result["cpu_cores"] = cpu
    if bad:
        log(f"WARNING {target.name}: {bad} failed requests")
    return result


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


# -- profiling -------------------------------------------------------------------------------


def profile_workers(worker_pids: list[int], seconds: int, rate: int, outdir: Path,
                    procs: Processes, idle: bool = False
                    ) -> list[tuple[int, Path, subprocess.Popen[bytes]]]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    started = []
    for pid in worker_pids:
        out = outdir / f"pyspy-worker-{pid}.txt"
        proc = procs.start(f"py-spy {pid}", [
            pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
            "--format", "raw", "--output", str(out), "--nonblocking",
            *(["--idle"] if idle else [])],
            stdout=subprocess.DEVNULL, stderr=(outdir / f"pyspy-{pid}.log").open("wb"))
        started.append((pid, out, proc))
    return started


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _area(path: str) -> str:
    short = _short(path)
    if short.startswith("meterlane/"):
        return "/".join(short.split("/")[:2]).removesuffix(".py")
    return short.split("/", 1)[0].removesuffix(".py")


def analyse_profile(files: list[Path], rate: int, seconds: int, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of the sampled (non-idle) stacks of every worker."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    area_self: Counter[str] = Counter()
    area_incl: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = []
            for raw in stack.split(";"):
                m = _FRAME.match(raw)
                if m is None:
                    continue
                frames.append((f"{m['func']} ({_short(m['file'])})", _area(m["file"])))
            if not frames:
                continue
            total += count
            self_t[frames[-1][0]] += count
            area_self[frames[-1][1]] += count
            for name in {f[0] for f in frames}:
                incl[name] += count
            for area in {f[1] for f in frames}:
                area_incl[area] += count

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    possible = rate * seconds * len(files)
    return {"samples": total, "possible_samples": possible,
            "busy_share_pct": round(100 * total / possible, 1) if possible else None,
            "self_pct": shares(self_t, top), "inclusive_pct": shares(incl, top),
            "area_self_pct": shares(area_self, 30), "area_inclusive_pct": shares(area_incl, 30)}


# -- the run ---------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - a linear script
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="server to create the bench database on (any database on it)")
    parser.add_argument("--postgres-db", default=None,
                        help="database dropped and recreated for the run "
                             "(default mlane_bench_<pid>, so that runs never collide)")
    parser.add_argument("--keep-db", action="store_true", help="do not drop it afterwards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (1 keeps the load generator to about one core)")
    parser.add_argument("--words", type=int, default=16, help="completion tokens per reply")
    parser.add_argument("--chunk-delay-ms", type=float, default=1.0,
                        help="upstream delay between stream chunks (fake.chunk_delay_ms)")
    parser.add_argument("--key-cache-seconds", type=float, default=None,
                        help="MLANE_KEY_CACHE_SECONDS for the gateway (default: the service's)")
    parser.add_argument("--scenarios", default="c1,c32,stream",
                        help="comma-separated subset of c1,c32,stream")
    parser.add_argument("--loadgen", choices=("wrk", "python"), default="wrk",
                        help="python: c=1 with http.client and no c=32 run (see README)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, py-spy the workers under a c=32 gateway run")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument("--profile-idle", action="store_true",
                        help="sample idle time too (py-spy --idle): shares are then of wall "
                             "time, which shows a worker blocked in a non-cooperative call")
    parser.add_argument("--out", type=Path, default=Path("/tmp/meterlane-bench.json"))
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs, config, SQLite file")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.postgres_db = args.postgres_db or f"mlane_bench_{os.getpid()}"
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        print(f"wrk is not installed; it is the load generator for the non-streaming runs.\n"
              f"Install it with:  {WRK_INSTALL}\n"
              "or run with --loadgen python (c=1 only: a Python load generator would share the "
              "2 cores with the gateway and cap the c=32 figure, so that run is skipped).",
              file=sys.stderr)
        return 2
    if args.loadgen == "python" and "c32" in scenarios:
        log("--loadgen python: skipping the c=32 throughput run (it would measure the client)")
        scenarios.remove("c32")

    load_at_start = Path("/proc/loadavg").read_text().split()[:3]
    code_version = git_version()  # at start: the workers import the code when they start
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="meterlane-bench-"))
    db_created = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Also SIGINT: a shell may have started us with it ignored (e.g. a background job).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        log(f"work dir {tmp}")
        upstream_proc, upstream_base = start_upstream(procs, tmp)
        log(f"fake upstream at {upstream_base} (pid {upstream_proc.pid})")
        write_config(tmp / "meterlane.toml", upstream_base)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MLANE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(MLANE_CONFIG=str(tmp / "meterlane.toml"), MLANE_DATA_DIR=str(tmp / "var"))
        if args.key_cache_seconds is not None:
            env["MLANE_KEY_CACHE_SECONDS"] = str(args.key_cache_seconds)
        if args.database == "postgres":
            db_url = postgres_database(args.postgres_url, args.postgres_db)
            db_created = True
            env["MLANE_DATABASE_URL"] = db_url
            log(f"created database {args.postgres_db}; {cli(env, 'db', 'upgrade').strip()}")
        key = cli(env, "keys", "create", "--role", "app", "--app", "bench").strip().splitlines()[-1]
        port = free_port()
        serve_log = tmp / "serve.log"
        serve = procs.start("meterlane serve", [
            sys.executable, "-m", "meterlane.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(args.workers)],
            stop_signal=signal.SIGINT,  # gunicorn's quick shutdown
            env=env, cwd=tmp, stdout=serve_log.open("wb"), stderr=subprocess.STDOUT)
        wait_healthy(serve, port, args.workers, serve_log)
        workers = children_of(serve.pid)
        log(f"meterlane serve on 127.0.0.1:{port} (master {serve.pid}, workers {workers})")

        up_host, up_port = re.match(r"http://([^:/]+):(\d+)", upstream_base).groups()  # type: ignore[union-attr]
        gateway = Target("gateway", "127.0.0.1", port, "/v1/chat/completions",
                         {"Authorization": f"Bearer {key}", "X-Meterlane-User": USER,
                          "Content-Type": "application/json"})
        direct = Target("direct", up_host, int(up_port), "/v1/chat/completions",
                        {"Authorization": "Bearer sk-bench", "X-Meterlane-User": USER,
                         "Content-Type": "application/json"})
        since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        plain = chat_body(stream=False, words=args.words, chunk_delay_ms=0)
        streamed = chat_body(stream=True, words=args.words, chunk_delay_ms=args.chunk_delay_ms)
        probe = CpuProbe({"gateway workers": workers, "gateway master": [serve.pid],
                          "fake upstream": [upstream_proc.pid]},
                         {"postgres (all processes)": lambda: pids_named("postgres")}
                         if args.database == "postgres" else {})

        phases: list[dict[str, Any]] = []
        ledger_before = ledger_requests(gateway, since)
        if ledger_before:
            raise BenchError(f"the fresh ledger already has {ledger_before} rows")

        def gateway_phase(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            before = ledger_requests(gateway, since)
            result = fn()
            after = wait_ledger(gateway, since, before + result["sent"])
            phases.append({"phase": name, "tool": result["tool"], "sent": result["sent"],
                           "ok_2xx": result["ok_2xx"], "non_2xx": result["non_2xx"],
                           "abandoned": result["abandoned_in_flight"],
                           "ledger_delta": after - before, "ok": after - before == result["sent"]})
            return result

        def nonstream(target: Target, conns: int, seconds: int,
                      use_probe: bool = False) -> Callable[[], dict[str, Any]]:
            if args.loadgen == "python":
                return lambda: run_python_client(target, plain, duration=seconds, stream=False,
                                                 probe=probe if use_probe else None)
            return lambda: run_wrk(target, plain, connections=conns, threads=args.wrk_threads,
                                   duration=seconds, workdir=tmp, procs=procs,
                                   probe=probe if use_probe else None)

        def measure(target: Target, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            result = gateway_phase(name, fn) if target is gateway else fn()
            lat = result.get("ttft_ms") or result["latency_ms"]
            log(f"  {name:<28} {result['rps']:>8.0f} req/s  p50 {lat['p50']:.3f} ms  "
                f"p99 {lat['p99']:.3f} ms")
            return result

        # Warm-up: connections, worker caches (key, end user), SQLAlchemy statement caches.
        log("warming up")
        for target in (direct, gateway):
            measure(target, f"warmup {target.name} c=8",
                    nonstream(target, min(8, args.concurrency), args.warmup))
            measure(target, f"warmup {target.name} stream", lambda t=target: run_python_client(
                t, streamed, duration=min(2, args.warmup), stream=True, probe=None))

        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = (direct, gateway) if r % 2 == 0 else (gateway, direct)
            log(f"round {r + 1}/{args.rounds} ({order[0].name} first)")
            res: dict[str, Any] = {}
            if "c1" in scenarios:
                res["c1"] = {t.name: measure(t, f"r{r + 1} c=1 {t.name}",
                                             nonstream(t, 1, args.duration, use_probe=True))
                             for t in order}
            if "c32" in scenarios:
                res["c32"] = {t.name: measure(t, f"r{r + 1} c={args.concurrency} {t.name}",
                                              nonstream(t, args.concurrency, args.duration,
                                                        use_probe=True)) for t in order}
            if "stream" in scenarios:
                res["stream"] = {t.name: measure(t, f"r{r + 1} stream {t.name}",
                                                 lambda t=t: run_python_client(
                                                     t, streamed, duration=args.duration,
                                                     stream=True, probe=probe)) for t in order}
            rounds.append(res)

        profile: dict[str, Any] | None = None
        if args.profile:
            if args.loadgen != "wrk":
                raise BenchError("--profile needs wrk")
            log(f"profiling {len(workers)} workers with py-spy for {args.profile_seconds} s "
                f"under c={args.concurrency} (not part of the measured rounds)")
            spies = profile_workers(workers, args.profile_seconds, args.profile_rate, tmp, procs,
                                    idle=args.profile_idle)
            time.sleep(0.5)  # let py-spy attach before the load starts
            prof_run = measure(gateway, f"profile c={args.concurrency} gateway", nonstream(
                gateway, args.concurrency, args.profile_seconds + 1, use_probe=True))
            for _pid, _out, spy in spies:
                spy.wait(timeout=60)
            profile = analyse_profile([out for _pid, out, _spy in spies], args.profile_rate,
                                      args.profile_seconds)
            profile["run"] = prof_run
            profile["idle_included"] = args.profile_idle
            profile["raw_files"] = [str(out) for _pid, out, _spy in spies]

        ledger_rows = ledger_requests(gateway, since)
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
        cpu_model = next((line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), platform.processor())
        meta = {
            "database": args.database, "workers": args.workers, "rounds": args.rounds,
            "duration_s": args.duration, "concurrency": args.concurrency,
            "wrk_threads": args.wrk_threads, "words": args.words,
            "chunk_delay_ms": args.chunk_delay_ms, "loadgen": args.loadgen,
            "key_cache_seconds": args.key_cache_seconds, "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "python": platform.python_version(),
            "loadavg_at_start": load_at_start,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": code_version,
            "request_body": plain.decode(), "stream_body": streamed.decode(),
        }
        others = {f"r{i + 1} {scen} {t}": run["cpu_cores"]["other processes"]
                  for i, rnd in enumerate(rounds) for scen, pair in rnd.items()
                  for t, run in pair.items() if "cpu_cores" in run}
        meta["other_processes_cores"] = others
        meta["max_other_cores"] = max(others.values(), default=0.0)
        meta["contended_runs"] = ", ".join(k for k, v in others.items() if v > 0.2)
        summary = summarise(rounds)
        targets = {}
        if "c1" in summary:
            targets["added_p50_ms<=2"] = summary["c1"]["p50"]["added"] <= TARGET_ADDED_P50_MS
            targets["added_p99_ms<=5"] = summary["c1"]["p99"]["added"] <= TARGET_ADDED_P99_MS
        if "c32" in summary:
            targets["c32_rps>=1000"] = summary["c32"]["rps"]["gateway"] >= TARGET_RPS_C32
        result = {"meta": meta, "summary": summary, "targets": targets, "ledger_check": ledger,
                  "rounds": rounds, "profile": profile}
        print_table(meta, summary, ledger)
        if profile:
            print_profile(profile)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
        return 0 if ledger["ok"] else 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if db_created and not args.keep_db:
            with contextlib.suppress(Exception):
                drop_postgres_database(args.postgres_url, args.postgres_db)
        if args.keep_tmp or args.profile:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_profile(profile: dict[str, Any]) -> None:
    if profile.get("idle_included"):
        print(f"\npy-spy --idle profile of the workers under c=32 ({profile['samples']} "
              "samples; shares are of wall time, idle included)")
    else:
        print(f"\npy-spy profile of the workers under c=32 ({profile['samples']} samples; "
              f"workers busy {profile['busy_share_pct']}% of the time; shares are of busy "
              "samples)")
    print("  by package/module (inclusive):")
    for name, pct in profile["area_inclusive_pct"][:15]:
        print(f"    {pct:5.1f}%  {name}")
    print("  by package/module (self):")
    for name, pct in profile["area_self_pct"][:15]:
        print(f"    {pct:5.1f}%  {name}")
    print("  functions (inclusive):")
    for name, pct in profile["inclusive_pct"][:25]:
        print(f"    {pct:5.1f}%  {name}")
    print("  functions (self):")
    for name, pct in profile["self_pct"][:20]:
        print(f"    {pct:5.1f}%  {name}")
    print(f"  raw stacks: {', '.join(profile['raw_files'])}")


if __name__ == "__main__":
    sys.exit(main())
