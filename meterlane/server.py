"""gunicorn, configured in code: gevent workers, so each holds many open streams at once."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class MeterlaneServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Imported here, inside the worker, after gevent has patched the standard library.
        from meterlane.app import create_app

        app = create_app()
        # Each worker sends the webhooks that are due (deliveries are claimed: never twice).
        app.extensions["wiring"].events.start()
        return app


def run(*, host: str, port: int, workers: int, timeout: int) -> None:
    MeterlaneServer({
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
        "preload_app": False,
    }).run()
