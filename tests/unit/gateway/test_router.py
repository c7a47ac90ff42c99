"""The router's decisions (no I/O): difficulty, candidate order by plan tiers, level and price,
and the circuit breaker's states on an injected clock."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from core.config import AliasConfig, Config, ModelConfig, ModelPrice, UpstreamConfig
from core.errors import PermissionDeniedError
from core.metrics import Metrics
from gateway.router import CODE_SCAN_CHARS, LONG_PROMPT_CHARS, Router, difficulty
from plans.catalog import Plan
from plans.terms import Terms


def _model(name: str, level: int, price: str | None, tier: str = "standard",
           upstream: str = "cloud") -> ModelConfig:
    return ModelConfig(name=name, upstream=upstream, upstream_model=name, level=level, tier=tier,
                       price=ModelPrice(Decimal(price), Decimal(price)) if price else None)


MODELS = (_model("local", 1, None, upstream="gpu"), _model("small", 2, "0.2"),
          _model("mid", 2, "1"), _model("big", 3, "10", tier="premium"))
CONFIG = Config(upstreams=(UpstreamConfig("gpu", "http://g", breaker_failures=2,
                                          breaker_cooldown_s=5),
                           UpstreamConfig("cloud", "http://c")),
                models=MODELS, aliases=(AliasConfig("auto", ("big", "mid", "small", "local")),))


def _chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize(("body", "level", "signals"), [
    (_chat(), 1, ()),
    (_chat(tools=[{}]), 2, ("tools",)),
    (_chat("```py\nprint(1)\n```"), 2, ("code",)),
    (_chat("SELECT name FROM users WHERE id = 1"), 2, ("code",)),
    (_chat("x" * LONG_PROMPT_CHARS), 2, ("long prompt",)),
    (_chat("x" * LONG_PROMPT_CHARS * 4), 3, ("very long prompt",)),
    (_chat("def f():\n  pass", tools=[{}]), 3, ("tools", "code")),
    (_chat(reasoning_effort="medium"), 2, ("reasoning effort medium",)),
    (_chat(reasoning_effort="high"), 3, ("reasoning effort high",)),
    (_chat(reasoning={"effort": "high"}), 3, ("reasoning effort high",)),
    ({"prompt": "import os\nos.listdir()"}, 2, ("code",)),
])
def test_difficulty(body: dict[str, Any], level: int, signals: tuple[str, ...]) -> None:
    found = difficulty(body)
    assert (found.level, found.signals) == (level, signals)


def _names(route: Any) -> list[str]:
    return [m.name for m in route.candidates]


def test_able_models_cheapest_first_then_the_rest_strongest_first() -> None:
    router = Router(CONFIG)
    assert _names(router.route("auto", None, _chat())) == ["local", "small", "mid", "big"]
    assert _names(router.route("auto", None, _chat(tools=[{}]))) == [
        "small", "mid", "big", "local"]
    assert _names(router.route("auto", None, _chat(reasoning_effort="high"))) == [
        "big", "small", "mid", "local"]
    assert router.route("small", None, _chat()) is None  # not an alias


def test_plan_tiers_filter_and_plan_aliases_come_first() -> None:
    plan = Plan(id="free", name="free", terms=Terms(tiers=("standard",)),
                aliases=(("auto", ("mid", "local")),))
    router = Router(CONFIG, frozenset({"auto"}))
    route = router.route("auto", plan, _chat(reasoning_effort="high"))
    assert route is not None and _names(route) == ["mid", "local"]
    assert route.reason(route.candidates[0]).endswith("mid most capable allowed")
    premium = Plan(id="p", name="p", terms=Terms(tiers=("premium",)))
    with pytest.raises(PermissionDeniedError, match="No model of alias 'auto' is allowed"):
        Router(CONFIG).route("auto", Plan(id="g", name="g", terms=Terms(
            tiers=("gold",))), _chat())
    route = Router(CONFIG).route("auto", premium, _chat())
    assert route is not None and _names(route) == ["big"]


def test_the_circuit_opens_half_opens_with_one_probe_and_closes() -> None:
    now = [100.0]
    router = Router(CONFIG, clock=lambda: now[0])

    def take() -> str | None:
        why = router.acquire("gpu", routed=True)
        if why is None:
            router.leave("gpu")
        return why

    router.failed("gpu")
    assert take() is None  # one failure of two
    router.failed("gpu")
    assert take() == "circuit open"
    assert router.acquire("gpu", routed=False) is None  # a direct call always goes
    router.leave("gpu")
    assert router.retry_after() == 6
    now[0] += 5
    assert router.acquire("gpu", routed=True) is None  # half-open: this call is the probe
    assert take() == "circuit half-open, a probe is out"
    router.failed("gpu")  # the probe failed: open again at once
    router.leave("gpu")
    assert take() == "circuit open"
    now[0] += 5
    assert router.acquire("gpu", routed=True) is None
    router.succeeded("gpu")  # the probe answered: closed
    router.leave("gpu")
    router.failed("gpu")
    assert take() is None  # closed again: counting from zero
    assert [s["circuit"] for s in router.status()] == ["closed", "closed"]


def test_the_gauges_follow_the_circuit_and_the_calls_in_flight() -> None:
    now = [100.0]
    metrics = Metrics()
    router = Router(CONFIG, clock=lambda: now[0], metrics=metrics)

    def gauges(upstream: str) -> tuple[float | None, float | None]:
        labels = {"upstream": upstream}
        return (metrics.registry.get_sample_value("meterlane_upstream_circuit_state", labels),
                metrics.registry.get_sample_value("meterlane_upstream_in_flight", labels))

    assert gauges("gpu") == gauges("cloud") == (0, 0)  # every upstream from the start
    assert router.acquire("gpu", routed=True) is None
    assert router.acquire("gpu", routed=False) is None
    assert gauges("gpu") == (0, 2)
    router.failed("gpu")
    router.failed("gpu")
    assert gauges("gpu") == (2, 2)  # open
    router.leave("gpu")
    router.leave("gpu")
    assert gauges("gpu") == (2, 0)
    now[0] += 5
    assert router.acquire("gpu", routed=True) is None
    assert gauges("gpu") == (1, 1)  # half-open: a probe is out
    router.succeeded("gpu")
    router.leave("gpu")
    assert gauges("gpu") == (0, 0)
    assert gauges("cloud") == (0, 0)


def test_the_concurrency_cap_is_taken_atomically() -> None:
    capped = Config(upstreams=(UpstreamConfig("gpu", "http://g", max_concurrency=2),),
                    models=(_model("local", 1, None, upstream="gpu"),))
    router = Router(capped)
    assert router.acquire("gpu", routed=True) is None
    assert router.acquire("gpu", routed=True) is None
    assert router.acquire("gpu", routed=True) == "saturated (2 calls in flight)"
    router.leave("gpu")
    assert router.acquire("gpu", routed=True) is None


def test_code_is_looked_for_in_a_bounded_prefix_only() -> None:
    assert difficulty(_chat("x" * 10 + "\n```py\n")).signals == ("code",)
    late = "word " * (CODE_SCAN_CHARS // 5) + "\n```py\n"
    assert "code" not in difficulty(_chat(late)).signals
    # inputs that made the old patterns backtrack for seconds (not code: no FROM, no code line)
    assert "code" not in difficulty(_chat("SELECT " * 5000)).signals
    assert "code" not in difficulty(_chat("\n" * 50_000 + "x")).signals
