"""Metering use cases: settle a finished call into the ledger, and usage totals."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.engine import Engine

from core.background import background_runner, run_inline
from core.config import ModelConfig, ModelPrice
from core.db import utcnow
from metering.intents import IntentJournal
from metering.ledger import LedgerWriter
from metering.models import UsageEvent
from metering.pricing import MAX_PICO, TokenUsage, cost_or_none
from metering.records import CallRecord
from metering.store import UsageQuery, UsageStore, UsageTotals
from metering.tokens import (
    TokenizerRegistry,
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_responses_prompt,
    count_texts,
)
from metering.unwritten import Unwritten


class Relayed(Protocol):
    """Records the meter events a relayed call caused upstream: metering/relayed.py (named
    by its shape, as it reaches the meters, which reach the limits that read this ledger)."""

    def record(self, call: CallRecord, items: Iterable[tuple[str, str]]) -> int: ...

    def record_items(self, row: dict[str, Any], items: Iterable[Any]) -> int: ...

    def spooled(self) -> int: ...

    def replay(self) -> int: ...


log = logging.getLogger(__name__)
ENDPOINT_CHAT = "chat.completions"
ENDPOINT_COMPLETIONS = "completions"
ENDPOINT_EMBEDDINGS = "embeddings"
ENDPOINT_RESPONSES = "responses"  # OpenAI's Responses API (as the ledger names its calls)
# Served, how long the commit of rows already answered may wait for the next calls' rows
# (bench/README.md, "Answered rows share their group commit"): reads wait that much longer.
COMMIT_LINGER_S = 0.004


@dataclass
class CallOutcome:
    """What the gateway knows once a call has ended, however it ended."""

    app_id: int
    end_user_id: int
    request_id: str
    idempotency_key: str
    endpoint: str
    model: ModelConfig
    stream: bool
    request: dict[str, Any]
    created_at: datetime
    latency_ms: int
    status: str = "ok"
    http_status: int = 200
    error: str | None = None
    ttft_ms: int | None = None
    reported: TokenUsage | None = None
    # The upstream's usage could not be trusted (why), or gave only a total: counted instead.
    usage_problem: str | None = None
    reported_total: int | None = None
    usage_note: str | None = None  # how reported usage was adjusted (capped details)
    count_output: bool = False  # the upstream reported the input only: count the output
    # True once the upstream accepted the call (a 2xx), so tokens were consumed.
    accepted: bool = False
    output_texts: Callable[[], list[str]] = field(default=lambda: [])
    # (meter id, item id) of what the answer shows the upstream did that a [[meters]] entry
    # may count: the web searches a Responses upstream ran (recorded after the ledger row).
    metered_items: Callable[[], list[tuple[str, str]]] = field(default=lambda: [])
    # Let through while the limit store was down: count it into the limits later.
    limits_pending: bool = False
    lease: Any = None  # the limits lease held for the call (metering.limits.Lease)
    heartbeat: Any = None  # renews the lease while the call runs (metering.leases.Heartbeat)
    prompt_estimate: int | None = None  # the tokenizer's count of the prompt, when made
    # The API the call came in through when it is not `endpoint` (e.g. Anthropic's messages,
    # served as a chat call): the ledger records this name.
    api: str | None = None
    record: CallRecord | None = None  # the ledger row, once settled
    # Set when the router served the call: the alias, its decision, and the candidates the
    # plan allowed (the most expensive of them prices the baseline the savings report uses).
    route_alias: str | None = None
    route_reason: str | None = None
    route_allowed: tuple[ModelConfig, ...] = ()
    trace: Any = None  # the gateway's telemetry of the call (gateway.telemetry.CallTrace)


def _baseline(usage: TokenUsage, allowed: tuple[ModelConfig, ...]) -> int | None:
    """The usage priced at the most expensive allowed candidate (None: none has a price)."""
    costs = [c for c in (cost_or_none(usage, m.price) for m in allowed)
             if c is not None and c <= MAX_PICO]
    return max(costs) if costs else None


@dataclass(frozen=True)
class DirectCall:
    """A call the app made itself and reports (POST /v1/meter/track/batch)."""

    app_id: int
    end_user_id: int
    model: ModelConfig
    usage: TokenUsage
    cost_pico: int | None
    request_id: str
    idempotency_key: str
    at: datetime | None = None  # when the call happened, if the app says (else: now)
    endpoint: str = "meter.track"


class MeteringService:
    def __init__(self, engine: Engine, ledger: LedgerWriter,
                 tokenizers: TokenizerRegistry) -> None:
        self.ledger = ledger
        self.tokenizers = tokenizers
        self.intents = IntentJournal(ledger.spool_dir)
        # Served under gevent, a call is answered before its row is committed (the row is in
        # the intent journal first; metering/unwritten.py); elsewhere after (None).
        runner = background_runner()
        self._background = None if runner is run_inline else runner
        if self._background is not None:  # answered rows share their commits
            ledger.linger_s = COMMIT_LINGER_S
        self.unwritten = Unwritten(ledger.spool_dir)
        self.clock = utcnow
        self.usage_store = UsageStore(engine)
        # The price catalog (finance): the price in force when a call happens. Without one,
        # the config's price.
        self.prices: Any = None
        # The plan an end user is on (for the ledger row of a call the app reports itself).
        self.plan_of: Callable[[int], str | None] | None = None
        # Whether a plan's usage is accounted against an allowance (the row is then marked
        # credits_pending for the accounting).
        self.accounted: Callable[[str | None], bool] = lambda _plan: False
        # Records the meter events a relayed call caused upstream (none: not recorded).
        self.relayed: Relayed | None = None

    def price_of(self, model: ModelConfig, at: datetime) -> ModelPrice | None:
        return self.prices.price_at(model.name, at) if self.prices is not None else model.price

    def usage_of(self, outcome: CallOutcome) -> tuple[TokenUsage, str, str | None]:
        """The upstream's usage when reported and sound; else a tokenizer count of what passed
        through (a call the upstream accepted is never recorded as zero tokens), with a note
        saying why it was counted."""
        reported = outcome.reported
        if reported is not None and reported.output_tokens == 0 and not outcome.count_output \
                and outcome.endpoint != ENDPOINT_EMBEDDINGS and any(outcome.output_texts()):
            outcome.count_output = True  # no output reported for a call that generated some
        if reported is not None and (not outcome.count_output
                                     or outcome.endpoint == ENDPOINT_EMBEDDINGS):
            note = f"upstream usage adjusted: {outcome.usage_note}" if outcome.usage_note \
                else None
            return reported, "reported", note
        if not outcome.accepted:
            return TokenUsage(), "none", None
        if reported is not None:  # its input as reported, its output counted
            tok = self.tokenizers.for_model(outcome.model.upstream_model,
                                            outcome.model.tokenizer)
            output = count_texts(tok, outcome.output_texts())
            return (replace(reported, output_tokens=output, reasoning_tokens=0), "counted",
                    "upstream reported no output for a call that generated some: the output "
                    "was counted")
        prompt = self.prompt_tokens(outcome.model, outcome.endpoint, outcome.request,
                                    outcome.app_id)
        total = outcome.reported_total
        if total is not None:  # a total alone: the prompt's count splits it
            note = f"upstream reported only total_tokens ({total}): split by counting"
            return TokenUsage(input_tokens=min(prompt, total),
                              output_tokens=total - min(prompt, total)), "counted", note
        tok = self.tokenizers.for_model(outcome.model.upstream_model, outcome.model.tokenizer)
        output = count_texts(tok, outcome.output_texts())
        why = (f"upstream usage not used ({outcome.usage_problem}): counted"
               if outcome.usage_problem else None)
        return TokenUsage(input_tokens=prompt, output_tokens=output), "counted", why

    def prompt_tokens(self, model: ModelConfig, endpoint: str, body: dict[str, Any],
                      app_id: int) -> int:
        """The tokenizer's count of what `app_id`'s call sends (the estimate a reservation
        holds). A conversation's texts (chat, Responses) are remembered for the app's next
        calls (PromptMemo), which send most of them again; completion prompts and embedding
        inputs are rarely sent twice, and are counted afresh."""
        if endpoint in (ENDPOINT_CHAT, ENDPOINT_RESPONSES):
            tok = self.tokenizers.for_prompt(model.upstream_model, model.tokenizer, app_id)
            if endpoint == ENDPOINT_CHAT:
                return count_chat_prompt(tok, body.get("messages") or [], body.get("tools"))
            return count_responses_prompt(tok, body)
        tok = self.tokenizers.for_model(model.upstream_model, model.tokenizer)
        if endpoint == ENDPOINT_COMPLETIONS:
            return count_completion_prompt(tok, body.get("prompt"))
        return count_embedding_input(tok, body.get("input"))

    def settle(self, outcome: CallOutcome) -> CallRecord:
        """Price the call and append it to the ledger (idempotent on the idempotency key)."""
        usage, source, note = self.usage_of(outcome)
        plan_id = outcome.lease.plan.id if outcome.lease is not None else None
        price = self.price_of(outcome.model, outcome.created_at)
        cost = cost_or_none(usage, price)
        if cost is not None and cost > MAX_PICO:
            cost, price = None, None
            note = "; ".join(filter(None, [note, "cost past 64-bit pico-USD: not priced"]))
        record = CallRecord(
            app_id=outcome.app_id, end_user_id=outcome.end_user_id,
            request_id=outcome.request_id, idempotency_key=outcome.idempotency_key,
            endpoint=outcome.api or outcome.endpoint, requested_model=outcome.model.name,
            upstream=outcome.model.upstream, upstream_model=outcome.model.upstream_model,
            stream=outcome.stream, input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens, output_tokens=usage.output_tokens,
            reasoning_tokens=usage.reasoning_tokens, usage_source=source,
            cost_pico_usd=cost, priced=price is not None, usage_note=note,
            status=outcome.status, http_status=outcome.http_status,
            error=outcome.error, latency_ms=outcome.latency_ms, ttft_ms=outcome.ttft_ms,
            created_at=outcome.created_at, limits_pending=outcome.limits_pending,
            route_alias=outcome.route_alias, route_reason=outcome.route_reason,
            baseline_cost_pico_usd=_baseline(usage, outcome.route_allowed),
            cache_write_tokens=usage.cache_write_tokens, plan_id=plan_id,
            credits_pending=self.accounted(plan_id),
        )
        outcome.record = record
        row = record.row()
        items = self._items(outcome)
        if self._background is None:
            self._write(record, row, items)
            return record
        # Served: answered once the row (and the meter events the call caused) is in the
        # journal; committed beside the next calls.
        self.intents.settled(record.request_id, row, items)
        self.unwritten.answering()
        self._background(functools.partial(self._write, record, row, items))
        return record

    def _items(self, outcome: CallOutcome) -> list[tuple[str, str]]:
        """The meter events a relayed call caused upstream (its web searches), if recorded."""
        if self.relayed is None or not outcome.accepted:
            return []
        try:
            return list(outcome.metered_items())
        except Exception:  # noqa: BLE001 - never in the way of the call's own row
            log.exception("reading the meter events of request %s failed", outcome.request_id)
            return []

    def _write(self, record: CallRecord, row: dict[str, Any],
               items: list[tuple[str, str]]) -> None:
        try:
            # never raises: written, spooled or quarantined
            self.ledger.record_row(row, answered=self._background is not None)
            if items and self.relayed is not None:
                self.relayed.record(record, items)  # never raises
            self.intents.close(record.request_id)  # only now: the journal has the events too
        finally:
            if self._background is not None:
                self.unwritten.written()

    def record_direct(self, *, app_id: int, end_user_id: int, model: ModelConfig,
                      usage: TokenUsage, cost_pico: int | None, request_id: str,
                      idempotency_key: str, endpoint: str, at: datetime | None = None) -> str:
        """Record a call the app made itself (reported through the metering API); returns the
        ledger's answer: written, duplicate (this key was recorded before) or spooled."""
        plan_id = self.plan_of(end_user_id) if self.plan_of is not None else None
        record = CallRecord(
            app_id=app_id, end_user_id=end_user_id, request_id=request_id,
            idempotency_key=idempotency_key, endpoint=endpoint, requested_model=model.name,
            upstream=model.upstream or None, upstream_model=model.upstream_model, stream=False,
            input_tokens=usage.input_tokens, cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens, reasoning_tokens=usage.reasoning_tokens,
            usage_source="reported", cost_pico_usd=cost_pico,
            priced=cost_pico is not None, status="ok", http_status=200, error=None, latency_ms=0,
            ttft_ms=None, created_at=at or self.clock(),
            cache_write_tokens=usage.cache_write_tokens, plan_id=plan_id,
            credits_pending=self.accounted(plan_id))
        return self.ledger.record(record, dedupe=True)

    def record_direct_many(self, calls: list[DirectCall]) -> list[str]:
        """Record many calls the app made itself, in group commits: each call's answer."""
        now = self.clock()
        plans = {c.end_user_id: self.plan_of(c.end_user_id) if self.plan_of is not None else None
                 for c in calls}
        records = [CallRecord(
            app_id=c.app_id, end_user_id=c.end_user_id, request_id=c.request_id,
            idempotency_key=c.idempotency_key, endpoint=c.endpoint,
            requested_model=c.model.name, upstream=c.model.upstream or None,
            upstream_model=c.model.upstream_model, stream=False,
            input_tokens=c.usage.input_tokens, cached_input_tokens=c.usage.cached_input_tokens,
            output_tokens=c.usage.output_tokens, reasoning_tokens=c.usage.reasoning_tokens,
            usage_source="reported", cost_pico_usd=c.cost_pico, priced=c.cost_pico is not None,
            status="ok", http_status=200, error=None, latency_ms=0, ttft_ms=None,
            created_at=c.at or now, cache_write_tokens=c.usage.cache_write_tokens,
            plan_id=plans[c.end_user_id], credits_pending=self.accounted(plans[c.end_user_id]))
            for c in calls]
        return self.ledger.record_batch(records)

    def intent_of(self, outcome: CallOutcome, prompt_tokens: int,
                  max_output: int | None) -> dict[str, Any]:
        """What the intent journal keeps of a call about to be forwarded."""
        model = outcome.model
        return {"request_id": outcome.request_id, "app_id": outcome.app_id,
                "end_user_id": outcome.end_user_id,
                "idempotency_key": outcome.idempotency_key,
                "endpoint": outcome.api or outcome.endpoint, "model": model.name,
                "upstream": model.upstream, "upstream_model": model.upstream_model,
                "stream": outcome.stream, "prompt_tokens": prompt_tokens,
                "max_output": max_output, "created_at": outcome.created_at.isoformat(),
                "plan_id": outcome.lease.plan.id if outcome.lease is not None else None}

    def record_lost(self, intent: dict[str, Any]) -> None:
        """A call a worker forwarded and died before recording: recorded as worker_lost, with
        what it may have used (the prompt, and the output it was allowed), unless the ledger
        has it. A call it had answered before the commit has its row: spooled as it was (the
        spool's replay writes it once, whether or not the commit had happened)."""
        if "settled" in intent:
            self.ledger.spool_row(intent["settled"])
            if intent.get("meters") and self.relayed is not None:  # once each, by their keys
                self.relayed.record_items(intent["settled"], intent["meters"])
            return
        app_id, key = int(intent["app_id"]), str(intent["idempotency_key"])
        if self.ledger.key_used(app_id, key):
            return
        at = datetime.fromisoformat(str(intent["created_at"]))
        output = intent.get("max_output")
        usage = TokenUsage(input_tokens=int(intent.get("prompt_tokens") or 0),
                           output_tokens=int(output or 0))
        model = ModelConfig(str(intent["model"]), str(intent.get("upstream") or ""),
                            str(intent.get("upstream_model") or intent["model"]))
        price = self.price_of(model, at)
        cost = cost_or_none(usage, price)
        plan_id = intent.get("plan_id")
        record = CallRecord(
            app_id=app_id, end_user_id=int(intent["end_user_id"]),
            request_id=str(intent["request_id"]), idempotency_key=key,
            endpoint=str(intent["endpoint"]), requested_model=model.name,
            upstream=model.upstream or None, upstream_model=model.upstream_model,
            stream=bool(intent.get("stream")), input_tokens=usage.input_tokens,
            cached_input_tokens=0, output_tokens=usage.output_tokens, reasoning_tokens=0,
            usage_source="estimated", cost_pico_usd=cost if cost is None or cost <= MAX_PICO
            else None, priced=price is not None, status="worker_lost", http_status=0,
            error="the worker serving the call stopped before recording it", latency_ms=0,
            ttft_ms=None, created_at=at, limits_pending=True, plan_id=plan_id,
            usage_note=("estimated: the prompt as counted, and all the output it was allowed"
                        if output else "estimated: the prompt as counted; output unknown"),
            credits_pending=self.accounted(plan_id))
        self.ledger.record(record)

    def recover_lost(self) -> int:
        """Record the calls of workers that died mid-call (their intent journals)."""
        lost = self.intents.recover(self.record_lost)
        if lost:
            self.ledger.replay()  # the rows of calls answered before their commit
        return lost

    def mark_limits_pending_many(self, app_id: int, keys: list[str]) -> int:
        """Flag rows the limits could not count yet (the catch-up counts them)."""
        if not keys:
            return 0
        with self.usage_store.engine.begin() as conn:
            return int(conn.execute(update(UsageEvent).where(
                UsageEvent.app_id == app_id, UsageEvent.idempotency_key.in_(keys))
                .values(limits_pending=True)).rowcount)

    def mark_limits_pending(self, app_id: int, idempotency_key: str) -> None:
        """Flag a ledger row whose usage could not be counted into the limits yet."""
        with self.usage_store.engine.begin() as conn:
            conn.execute(update(UsageEvent).where(
                UsageEvent.app_id == app_id, UsageEvent.idempotency_key == idempotency_key
            ).values(limits_pending=True))

    def is_key_used(self, app_id: int, idempotency_key: str) -> bool:
        return self.ledger.key_used(app_id, idempotency_key)

    def usage_totals(self, query: UsageQuery) -> tuple[UsageTotals, list[UsageTotals]]:
        return self.usage_store.totals(query)

    def routing_savings(self, query: UsageQuery) -> list[dict[str, Any]]:
        """Per alias: routed calls, what they cost, what the same tokens would have cost on
        the most expensive model the plan allowed, and the models that served them."""
        by_alias: dict[str, dict[str, Any]] = {}
        for row in self.usage_store.routed(query):
            entry = by_alias.setdefault(row.alias, {
                "alias": row.alias, "calls": 0, "cost_pico": 0, "baseline_pico": 0,
                "unpriced_calls": 0, "served": []})
            entry["calls"] += row.calls
            entry["cost_pico"] += row.cost_pico_usd
            entry["baseline_pico"] += row.baseline_pico_usd
            entry["unpriced_calls"] += row.unpriced_calls
            entry["served"].append({"model": row.model, "calls": row.calls,
                                    "cost_pico": row.cost_pico_usd})
        return list(by_alias.values())
