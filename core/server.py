"""gunicorn, configured in code: gevent workers, so each holds many open streams at once."""

from __future__ import annotations

import importlib
from typing import Any

from gunicorn.app.base import BaseApplication


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
    from core.logs import gunicorn_logconfig

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
        "logconfig_dict": gunicorn_logconfig(log_format),
        "child_exit": _child_exit,
        "preload_app": False,
    }).run()


def _child_exit(_server: Any, worker: Any) -> None:
    """A worker is gone: its gauges (calls in flight, its queue) leave /metrics' sums."""
    from core.metrics import mark_process_dead

    mark_process_dead(worker.pid)
