"""The long-lived parts of one app instance, found by their type.

app.py builds every part once (create_app, or a command's build) and registers it here. An
edge (a blueprint, a command) asks for the part it needs by its class, so it imports only that
class: the dependency is visible in its imports, where the layering test can check it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

T = TypeVar("T")
log = logging.getLogger(__name__)


class Parts:
    """Parts by exact type; one part per type."""

    def __init__(self, values: Iterable[object]) -> None:
        self._by_type: dict[type, object] = {}
        for value in values:
            if value is None:
                continue
            kind = type(value)
            if kind in self._by_type and self._by_type[kind] is not value:
                raise ValueError(f"two parts of type {kind.__name__}")
            self._by_type[kind] = value

    def get(self, kind: type[T]) -> T:
        found = self._by_type.get(kind)
        if found is None:
            raise LookupError(f"this app instance has no {kind.__name__}")
        return cast(T, found)


class Readiness:
    """Named checks /readyz runs (each returns None when fine, else what is wrong), and gauges
    read when asked (/readyz shows them, /metrics exports them; they never fail readiness).
    A check added with `fails=False` is reported only: a problem of background work (late
    scheduled jobs) must not take every instance out of a load balancer's rotation."""

    def __init__(self) -> None:
        self.checks: dict[str, Callable[[], str | None]] = {}
        self.reported_only: set[str] = set()
        self.gauges: dict[str, tuple[str, Callable[[], int]]] = {}
        self.exporters: list[Callable[[], bytes]] = []

    def add(self, name: str, check: Callable[[], str | None], *, fails: bool = True) -> None:
        self.checks[name] = check
        if not fails:
            self.reported_only.add(name)

    def failing(self, results: dict[str, str]) -> dict[str, str]:
        """Of `run()`'s results, those that make the service unready."""
        return {k: v for k, v in results.items() if v != "ok" and k not in self.reported_only}

    def add_gauge(self, name: str, help_text: str, read: Callable[[], int]) -> None:
        self.gauges[name] = (help_text, read)

    def add_exporter(self, render: Callable[[], bytes]) -> None:
        """More metrics for /metrics, in Prometheus' text format (e.g. the scheduled jobs')."""
        self.exporters.append(render)

    def gauge_values(self) -> dict[str, int | None]:
        """Each gauge's value (None when it could not be read)."""
        values: dict[str, int | None] = {}
        for name, (_help, read) in self.gauges.items():
            try:
                values[name] = int(read())
            except Exception:  # noqa: BLE001 - a gauge that cannot be read is left out
                values[name] = None
        return values

    def prometheus(self) -> bytes:
        """The gauges in Prometheus' text format."""
        lines = []
        for name, value in self.gauge_values().items():
            if value is not None:
                lines += [f"# HELP meterlane_{name} {self.gauges[name][0]}",
                          f"# TYPE meterlane_{name} gauge", f"meterlane_{name} {value}"]
        body = ("\n".join(lines) + "\n").encode() if lines else b""
        for render in self.exporters:
            try:
                body += render()
            except Exception:  # noqa: BLE001 - metrics that cannot be read are left out
                log.warning("metrics exporter %r failed", render, exc_info=True)
        return body

    def run(self) -> dict[str, str]:
        results: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                problem = f"error: {exc.__class__.__name__}"
            results[name] = problem or "ok"
        return results
