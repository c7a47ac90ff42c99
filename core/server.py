"""gunicorn, configured in code: gevent workers, so each holds many open streams at once."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from core import logs


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
    """`meterlane worker` as a child of serve while the block runs (its pid; None when not
    enabled): stopped after its run in progress when serve stops, and stopping by itself if
    serve is killed."""
    if not enabled:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "app", "worker",  # noqa: S603
                             "--exit-with", str(os.getpid())], env=env)
    try:
        yield proc.pid
    finally:
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
