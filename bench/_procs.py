"""Processes of a run: fake upstream, `meterlane serve`, keys, Postgres database, CPU from /proc."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def guarded(procs: Processes, body: Callable[[], int], cleanup: Callable[[], None]) -> int:
    """A bench's main: body() with Ctrl-C, SIGTERM and SIGHUP turned into a clean stop (exit
    status 130), a BenchError reported (1); then every process stopped and cleanup() run,
    whatever happened."""
    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Also SIGINT: a shell may have started us with it ignored (e.g. a background job).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        return body()
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
        cleanup()


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


def is_beside(pid: int) -> bool:
    """A process serve starts beside its gunicorn workers: `meterlane worker` (the jobs, on
    SQLite) or the tokenizer process (metering/tokenserver.py). Not a web worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"worker\x00--exit-with" in cmdline or b"metering.tokenserver" in cmdline


def serve_workers(pid: int) -> list[int]:
    """The gunicorn workers of serve `pid`."""
    return [p for p in children_of(pid) if not is_beside(p)]


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


def write_config(path: Path, upstream_base: str, extra: str = "") -> None:
    """The bench config: one priced model on the fake upstream, then `extra` (e.g. plans)."""
    path.write_text(f"""
[[upstreams]]
name = "fake"
base_url = "{upstream_base}"

[[models]]
name = "{MODEL}"
upstream = "fake"
price = {{ input = "0.15", output = "0.60" }}
""" + extra)


def serve_env(config: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of the meterlane commands of a run: ours without any MLANE_ setting
    (a developer's shell must not leak into the bench), plus the config and data dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLANE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(MLANE_CONFIG=str(config), MLANE_DATA_DIR=str(data_dir), **extra)
    return env


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


def remove_leftovers(admin_url: str, dbs: list[str], tmp: Path, keep_tmp: bool) -> None:
    """The end of a run: its databases dropped, its work directory removed (or kept)."""
    for name in dbs:
        try:
            drop_postgres_database(admin_url, name)
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"could not drop database {name}: {exc}")
    if keep_tmp:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_postgres_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    libpq = make_url(admin_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


# The service's code: app.py and its packages (DESIGN.md §1).
PACKAGES = ("core", "gateway", "metering", "plans", "paywall", "finance", "migrations")
CODE = ("app.py", *PACKAGES)


def git_version() -> str:
    """HEAD's short hash, with "+dirty" when the service's code has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,  # noqa: S607
                              text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", *CODE) else "")


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app", *args], env=env,  # noqa: S603
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
            if status == 200 and len(serve_workers(proc.pid)) >= workers:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError("meterlane serve did not become healthy:\n" + logfile.read_text()[-3000:])


@dataclass(frozen=True)
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    workers: list[int]
    log: Path
    beside: list[int]  # the jobs worker, the tokenizer process


def start_serve(procs: Processes, env: dict[str, str], *, workers: int, cwd: Path,
                log_path: Path, name: str = "meterlane serve", module: str = "app") -> Served:
    """`meterlane serve` on a free port, once /healthz answers and every worker is up
    (`module`: what `python -m` runs, app's command line or a bench wrapper of it)."""
    port = free_port()
    proc = procs.start(name, [
        sys.executable, "-m", module, "serve", "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers)],
        stop_signal=signal.SIGINT,  # gunicorn's quick shutdown
        env=env, cwd=cwd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, workers, log_path)
    return Served(proc, port, serve_workers(proc.pid), log_path,
                  [p for p in children_of(proc.pid) if is_beside(p)])


# -- CPU use ---------------------------------------------------------------------------------


@dataclass
class CpuProbe:
    """CPU seconds used by each watched process between start() and stop()."""

    pids: dict[str, list[int]]
    dynamic: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    _dynamic_pids: dict[str, list[int]] = field(default_factory=dict)
    _dynamic_start: dict[str, dict[int, float]] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        out["machine total"] = machine_busy_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["bench client"] = usage.ru_utime + usage.ru_stime
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["wrk"] = child.ru_utime + child.ru_stime  # reaped children: only wrk in between
        return out

    def _read_dynamic(self) -> dict[str, dict[int, float]]:
        return {name: {p: cpu_seconds(p) for p in pids}
                for name, pids in self._dynamic_pids.items()}

    def start(self) -> None:
        # Processes found at the start (e.g. Postgres backends of the pooled connections).
        self._dynamic_pids = {name: fn() for name, fn in self.dynamic.items()}
        self._dynamic_start = self._read_dynamic()
        self.before = self._read()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._read()
        for name, now in self._read_dynamic().items():
            start = self._dynamic_start[name]
            # One that exited meanwhile (a pooled backend closed) reads 0: it counts 0, not
            # minus what it had used before the start.
            after[name] = sum(v - start[p] for p, v in now.items() if v)
        wall = time.monotonic() - self.wall
        out = {name: round((after[name] - self.before.get(name, 0.0)) / wall, 3)
               for name in after}
        # Whatever else ran on the machine meanwhile (other tenants, kernel threads).
        ours = sum(v for k, v in out.items() if k != "machine total")
        out["other processes"] = round(max(0.0, out["machine total"] - ours), 3)
        return out
