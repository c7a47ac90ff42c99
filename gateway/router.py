"""The router: a model alias resolved to the model that serves a call.

An alias (a global [[aliases]] entry, or one a plan defines) names candidate models. For a
call, the candidates are those the user's plan may call; the call's difficulty (a cheap
estimate from the prompt: its length, tools, code, the reasoning effort asked for) picks the
ones able to serve it, cheapest first, so a local GPU (no list price) comes before cloud
models. The rest follow as fallbacks: a call goes to the next candidate when an upstream's
circuit is open, when it is saturated (calls in flight at its cap: local first, cloud
overflow), or when it fails before the first byte (connection, timeout, 429, 5xx).

Circuit and in-flight state is per gateway process: each worker learns an upstream's health
from its own calls, which needs no shared store on the hot path. Each change goes to the
metrics' gauges (a circuit's state as of its last change: an open circuit shows half-open once
a call probes it).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.config import Config, ModelConfig
from core.errors import PermissionDeniedError
from core.metrics import Metrics
from plans.catalog import Plan

# Prompt length (characters; about 4 per token) at which a call is moderate, and hard.
LONG_PROMPT_CHARS = 16_000
VERY_LONG_PROMPT_CHARS = 64_000
# Linear-time patterns only (no nested or unbounded gaps), over a bounded prefix of the prompt.
_CODE = re.compile(
    r"```|^[ \t]*(?:def|class|import|from [\w.]+ import|fn|func|public|#include)\b|"
    r"\bfunction[ \t]*\w{0,64}[ \t]*\(|=>[ \t]*\{|\bSELECT\b[^;]{1,300}?\bFROM\b|;[ \t]*$",
    re.MULTILINE)
CODE_SCAN_CHARS = 32_000
MAX_REASON = 500


@dataclass(frozen=True)
class Difficulty:
    level: int  # 1 simple, 2 moderate, 3 hard: the least model level able to serve it
    signals: tuple[str, ...]

    def describe(self) -> str:
        return f"level {self.level}" + (f" ({', '.join(self.signals)})" if self.signals else "")


def difficulty(body: dict[str, Any]) -> Difficulty:
    """A cheap estimate of how hard a call is, from what it sends (no model involved)."""
    text = _prompt_text(body)
    signals: list[str] = []
    if body.get("tools") or body.get("functions"):
        signals.append("tools")
    if _CODE.search(text, 0, CODE_SCAN_CHARS):
        signals.append("code")
    if len(text) >= VERY_LONG_PROMPT_CHARS:
        signals.append("very long prompt")
    elif len(text) >= LONG_PROMPT_CHARS:
        signals.append("long prompt")
    level = 1 if not signals else 2 if len(signals) == 1 else 3
    if "very long prompt" in signals:
        level = 3
    effort = body.get("reasoning_effort")
    if isinstance(body.get("reasoning"), dict):  # the Responses-style {"effort": ...}
        effort = body["reasoning"].get("effort", effort)
    if effort in ("high", "xhigh", "max"):
        signals.append(f"reasoning effort {effort}")
        level = 3
    elif effort == "medium":
        signals.append("reasoning effort medium")
        level = max(level, 2)
    return Difficulty(level, tuple(signals))


def _prompt_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    return "\n".join(parts)


def price_rank(model: ModelConfig) -> Decimal:
    """What a token costs on the model's list price (no price, e.g. a local GPU: zero)."""
    if model.price is None:
        return Decimal(0)
    return model.price.input + model.price.output


@dataclass
class Route:
    """One call's routing: the order to try candidates in, and what happened to each."""

    alias: str
    candidates: list[ModelConfig]
    allowed: tuple[ModelConfig, ...]  # every candidate the plan may call (the savings baseline)
    difficulty: Difficulty
    notes: list[str] = field(default_factory=list)

    def skipped(self, model: ModelConfig, why: str) -> None:
        self.notes.append(f"{model.name} skipped: {_short(why)}")

    def failed(self, model: ModelConfig, why: str) -> None:
        self.notes.append(f"{model.name} failed: {_short(why)}")

    def reason(self, served: ModelConfig | None) -> str:
        """Why this model: the difficulty, the first choice and why, and what happened to
        each candidate tried or skipped before it."""
        first = self.candidates[0]
        why = ("cheapest able" if first.level >= self.difficulty.level
               else "most capable allowed")
        text = f"{self.difficulty.describe()}; {first.name} {why}"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if served is not None and served is not first:
            text += f"; served by {served.name}"
        return text[:MAX_REASON]


@dataclass
class _Circuit:
    failures: int = 0  # in a row
    open_until: float = 0.0  # 0: closed; past: half-open (one probe at a time)
    probe_until: float = 0.0  # a half-open probe is out until then
    in_flight: int = 0


class Router:
    def __init__(self, config: Config, plan_aliases: frozenset[str] = frozenset(),
                 clock: Callable[[], float] = time.monotonic, *,
                 metrics: Metrics | None = None) -> None:
        self.models = {m.name: m for m in config.models}
        self.aliases = {a.name: a.models for a in config.aliases}
        self.upstreams = {u.name: u for u in config.upstreams}
        self.plan_aliases = plan_aliases
        self.clock = clock
        self._circuits = {name: _Circuit() for name in self.upstreams}
        self._lock = threading.Lock()
        self.metrics = metrics
        for name, circuit in self._circuits.items():
            self._show(name, circuit, 0.0)

    def _show(self, upstream: str, circuit: _Circuit, now: float) -> None:
        """The circuit's state and calls in flight, to the gauges (under the lock)."""
        if self.metrics is not None:
            self.metrics.upstream_state(upstream, "open" if circuit.open_until > now else
                                        "half-open" if circuit.open_until else "closed",
                                        circuit.in_flight)

    def is_alias(self, name: str) -> bool:
        """Whether any plan or the config defines this alias."""
        return name in self.aliases or name in self.plan_aliases

    def route(self, name: str, plan: Plan | None, body: dict[str, Any]) -> Route | None:
        """The candidates for an alias, in the order to try them; None when not an alias."""
        names = (plan.alias(name) if plan is not None else None) or self.aliases.get(name)
        if names is None:
            return None
        models = [self.models[n] for n in names]
        allowed = [m for m in models if plan is None or plan.terms.allows_tier(m.tier)]
        if not allowed:
            assert plan is not None
            err = PermissionDeniedError(
                f"No model of alias {name!r} is allowed on plan {plan.id!r}: its models are in "
                f"tiers {', '.join(sorted({m.tier for m in models}))}, and the plan may call "
                f"{', '.join(plan.terms.tiers or ()) or 'none'}.", param="model")
            err.openai_code = "model_not_in_plan"
            raise err
        hard = difficulty(body)
        able = [m for m in allowed if m.level >= hard.level]
        if not able:  # nothing allowed is able: the most capable that is
            top = max(m.level for m in allowed)
            able = [m for m in allowed if m.level == top]
        able.sort(key=price_rank)  # stable: the alias's own order breaks ties
        rest = sorted((m for m in allowed if m not in able),
                      key=lambda m: (-m.level, price_rank(m)))
        return Route(name, able + rest, tuple(allowed), hard)

    # -- upstream health ----------------------------------------------------------------------

    def acquire(self, upstream: str, *, routed: bool) -> str | None:
        """Take a slot on the upstream for a call, or say why a routed call should not go
        there now (its circuit is open, a probe is already out, it is saturated). Checking and
        taking happen under one lock, so a burst cannot overshoot the cap. A direct call (one
        model, no alternative) always goes."""
        circuit = self._circuits[upstream]
        if not routed:
            with self._lock:
                circuit.in_flight += 1
                self._show(upstream, circuit, self.clock())
            return None
        config = self.upstreams[upstream]
        now = self.clock()
        with self._lock:
            if circuit.open_until > now:
                return "circuit open"
            cap = config.max_concurrency
            if cap is not None and circuit.in_flight >= cap:
                return f"saturated ({circuit.in_flight} calls in flight)"
            if circuit.open_until:  # half-open: one probe decides
                if circuit.probe_until > now:
                    return "circuit half-open, a probe is out"
                circuit.probe_until = now + config.breaker_cooldown_s
            circuit.in_flight += 1
            self._show(upstream, circuit, now)
        return None

    @property
    def in_flight(self) -> int:
        """Calls holding a slot on any upstream in this process."""
        return sum(circuit.in_flight for circuit in self._circuits.values())

    def alone(self) -> bool:
        """Whether the process serves at most one call upstream (the caller's own)."""
        return self.in_flight <= 1

    def retry_after(self) -> int:
        """Seconds until the first open circuit half-opens (at least 1)."""
        now = self.clock()
        with self._lock:
            waits = [c.open_until - now for c in self._circuits.values() if c.open_until > now]
        return max(1, int(min(waits)) + 1) if waits else 1

    def leave(self, upstream: str) -> None:
        with self._lock:
            circuit = self._circuits[upstream]
            circuit.in_flight = max(0, circuit.in_flight - 1)
            self._show(upstream, circuit, self.clock())

    def succeeded(self, upstream: str) -> None:
        circuit = self._circuits[upstream]
        if not (circuit.failures or circuit.open_until):  # closed already: nothing to write
            return
        with self._lock:
            circuit.failures, circuit.open_until, circuit.probe_until = 0, 0.0, 0.0
            self._show(upstream, circuit, 0.0)

    def failed(self, upstream: str) -> None:
        config = self.upstreams[upstream]
        with self._lock:
            circuit = self._circuits[upstream]
            circuit.failures += 1
            half_open = circuit.open_until != 0.0
            if half_open or circuit.failures >= config.breaker_failures:
                now = self.clock()
                circuit.open_until = now + config.breaker_cooldown_s
                circuit.probe_until = 0.0
                self._show(upstream, circuit, now)

    def status(self) -> list[dict[str, Any]]:
        """Each upstream's circuit and calls in flight (this process)."""
        now = self.clock()
        with self._lock:
            return [{"upstream": name, "in_flight": c.in_flight, "failures": c.failures,
                     "circuit": "open" if c.open_until > now
                     else "half-open" if c.open_until else "closed",
                     "max_concurrency": self.upstreams[name].max_concurrency}
                    for name, c in self._circuits.items()]


def _short(text: str) -> str:
    """A note's reason, at most 120 characters (an upstream's error may be long)."""
    return text if len(text) <= 120 else text[:117] + "..."
