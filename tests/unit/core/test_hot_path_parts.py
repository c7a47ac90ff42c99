"""The hot path's shortcuts keep what they short-cut: Flask's coroutine check (core.web.App)
and the metrics' labelled children (core.metrics.Metrics)."""

from __future__ import annotations

import functools
from typing import Any

from core.metrics import Metrics
from core.web import App


def test_a_plain_hook_is_used_as_it_is_and_a_coroutine_function_goes_to_flask() -> None:
    app = App("t")

    def plain() -> None:
        return None

    async def coroutine() -> None:
        return None

    assert app.ensure_sync(plain) is plain
    # Flask's own handling of a coroutine function: async_to_sync, which needs asgiref
    # (Flask's async extra); without it Flask refuses the function
    for func in (coroutine, functools.partial(coroutine)):
        try:
            wrapped = app.ensure_sync(func)
        except RuntimeError as exc:
            assert "async" in str(exc)
        else:
            assert wrapped is not func


def _value(metrics: Metrics, name: str, **labels: str) -> Any:
    return metrics.registry.get_sample_value(name, labels)


def test_labelled_children_are_kept_and_the_gauges_follow_each_change() -> None:
    metrics = Metrics()
    assert metrics.labelled(metrics.calls, "chat", "m", "ok") is metrics.calls.labels(
        "chat", "m", "ok")
    for circuit, in_flight in (("closed", 1), ("closed", 0), ("open", 0), ("half-open", 2),
                               ("closed", 1)):
        metrics.upstream_state("up", circuit, in_flight)
        assert _value(metrics, "meterlane_upstream_circuit_state", upstream="up") == {
            "closed": 0, "half-open": 1, "open": 2}[circuit]
        assert _value(metrics, "meterlane_upstream_in_flight", upstream="up") == in_flight
    metrics.upstream_state("other", "closed", 0)  # another upstream has its own gauge
    assert _value(metrics, "meterlane_upstream_circuit_state", upstream="other") == 0
