"""gunicorn, configured in code: gevent workers, so each holds many open streams at once."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger

from core import logs
from core.config import Config

log = logging.getLogger(__name__)
RESTART_PAUSE = (1.0, 60.0)  # the worker beside serve: first pause before a restart, longest
STOPPING = threading.Event()  # set as gunicorn's master begins to stop its workers


class _Arbiter(Arbiter):  # type: ignore[misc]
    def stop(self, graceful: bool = True) -> None:
        STOPPING.set()  # what exits from now on is stopping with serve: never started again
        super().stop(graceful)


class MeterlaneServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, factory: str, options: dict[str, Any]) -> None:
        self.factory = factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # The factory ("module:function", as gunicorn names apps) is imported here, inside the
        # worker, after gevent has patched the standard library.
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)()

    def run(self) -> None:  # BaseApplication.run, with an arbiter that says when it stops
        try:
            _Arbiter(self).run()
        except RuntimeError as e:
            print(f"\nError: {e}\n", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)


def run(factory: str, *, host: str, port: int, workers: int, timeout: int,
        log_format: str = "text") -> None:
    MeterlaneServer(factory, {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gevent",
        "worker_connections": 2000,
        "timeout": timeout,
        "graceful_timeout": 30,
        "keepalive": 75,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        # gunicorn's lines and the app's (one per request) in one format, on stderr
        "logger_class": type("FormattedLogger", (FormattedLogger,), {"log_format": log_format}),
        "child_exit": _child_exit,
        "preload_app": False,
        # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl): two
        # services on one machine would take each other's. Meterlane is run by its command.
        "control_socket_disable": True,
    }).run()


@contextlib.contextmanager
def worker_beside(enabled: bool) -> Iterator[int | None]:
    """`meterlane worker` as a child of serve while the block runs (its first pid; None when
    not enabled): started again whenever it exits (the scheduled jobs, overage reports among
    them, must not stop with it), stopped after its run in progress when serve stops, and
    stopping by itself if serve is killed."""
    if not enabled:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    owner = os.getpid()
    kept = _Kept([sys.executable, "-P", "-m", "app", "worker", "--exit-with", str(owner)], env)
    try:
        yield kept.proc.pid
    finally:
        # only in serve itself: a gunicorn worker forked inside the block leaves it too, as it
        # exits, and must not stop the jobs' worker
        if os.getpid() == owner:
            kept.stop()


class _Kept:
    """A child process kept running: when it exits it is started again, after a pause that
    doubles (from 1 s to a minute) while it keeps exiting within a minute of its start."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc = self._start()
        threading.Thread(target=self._watch, name="worker-beside", daemon=True).start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv, env=self.env)  # noqa: S603

    def _watch(self) -> None:
        pause = RESTART_PAUSE[0]
        while True:
            proc, started = self.proc, time.monotonic()
            code = proc.wait()  # (0 when gunicorn's arbiter reaped it first: unknown)
            if time.monotonic() - started > RESTART_PAUSE[1]:
                pause = RESTART_PAUSE[0]
            if self._stopping.is_set() or STOPPING.is_set():
                return
            log.warning("the worker beside serve (pid %d) exited (code %s); starting another "
                        "in %.0f s", proc.pid, code, pause)
            while True:  # until one starts: a start that fails (no memory, the program gone
                # in a deploy) is tried again, never leaving the jobs without a worker
                if self._stopping.wait(pause):
                    return
                pause = min(pause * 2, RESTART_PAUSE[1])
                with self._lock:
                    if self._stopping.is_set() or STOPPING.is_set():
                        return
                    try:
                        self.proc = self._start()
                        break
                    except OSError as exc:
                        log.error("could not start the worker beside serve (%s); trying again "
                                  "in %.0f s", exc, pause)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FormattedLogger(Logger):  # type: ignore[misc]
    """gunicorn's own lines in the service's log format, and the app's (the root logger,
    which the workers inherit) set up in the same; no access log: each request's line is
    the app's (core/observe.py), which knows the call."""

    log_format = "text"

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(logs.formatter(self.log_format))
        logs.configure(self.log_format)

    def access(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def _child_exit(_server: Any, worker: Any) -> None:
    """A worker is gone: its gauges (calls in flight, its queue) leave /metrics' sums."""
    from core.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def say(config: Config, text: str) -> None:
    """A start-up line on stderr, in the log format (MLANE_LOG_FORMAT)."""
    if config.log_format != "json":
        click.echo(f"meterlane: {text}", err=True)
        return
    warning = text.startswith("warning: ")
    click.echo(logs.json_line("meterlane.serve", text.removeprefix("warning: "),
                              "warning" if warning else "info", event="startup"), err=True)


def size_pools(config: Config, workers: int) -> None:
    """Pools that fit the database's max_connections, for the workers to read (a child
    process asks Postgres: the master must not load its driver); said at start."""
    if config.embedded or "MLANE_DB_POOL_SIZE" in os.environ:
        return
    script = ("import sys; from core.config import Config; "
              "from core.db import make_engine, pool_budget; "
              "print(pool_budget(make_engine(Config.from_env().database_url), "
              "int(sys.argv[1])))")
    # (the workers, and two more: a CLI command or a worker starting while one stops)
    found = subprocess.run([sys.executable, "-P", "-c", script, str(workers + 2)],  # noqa: S603
                           capture_output=True, text=True, check=False)
    try:
        limit, size, overflow = _eval_tuple(found.stdout)
    except ValueError:
        say(config, "could not read the database's max_connections; keeping the default "
            "pools")
        return
    os.environ["MLANE_DB_POOL_SIZE"], os.environ["MLANE_DB_MAX_OVERFLOW"] = str(size), \
        str(overflow)
    if (size, overflow) != (config.db_pool_size, config.db_max_overflow):
        say(config, f"the database takes {limit} connections; {workers} workers get "
            f"{size}+{overflow} each (MLANE_DB_POOL_SIZE / MLANE_DB_MAX_OVERFLOW to choose)")
    if size * 3 < 10:
        say(config, f"warning: {limit} connections are few for {workers} workers: calls "
            "may wait for a connection (raise max_connections or run fewer workers)")


def _eval_tuple(text: str) -> tuple[int, int, int]:
    """The (limit, size, overflow) the child printed."""
    parts = text.strip().strip("()").split(",")
    if len(parts) != 3:
        raise ValueError(text)
    limit, size, overflow = (int(p) for p in parts)
    return limit, size, overflow
