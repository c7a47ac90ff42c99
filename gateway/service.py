"""The metered call: resolve the end user and model, forward, relay, settle into the ledger."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from core.auth import Principal, Role, validate_user_id
from core.config import Config, ModelConfig
from core.db import DATABASE_DOWN, utcnow
from core.errors import (
    DATABASE_UNAVAILABLE,
    ConflictError,
    DomainError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    UpstreamUnavailableError,
)
from core.logs import note
from core.metrics import Metrics
from core.tenancy import TenancyService
from gateway import anthropic
from gateway.outage import record_database_refusal
from gateway.protocol import UsageReading, metered_items, read_usage, texts_of_choices
from gateway.router import Route, Router
from gateway.telemetry import CallTrace
from gateway.upstream import UpstreamClient, error_from_response, malformed_answer
from gateway.upstream_http import Response, TransportError
from gateway.wire import (
    MessagesWire,
    Wire,
    choices_of,
    is_answer,
    is_event_stream,
    least_output,
    loads,
    parse_body,
    requested_output,
    responses_call,
    upstream_payload,
)
from metering.leases import Lease
from metering.limits import LimitsService
from metering.limits_text import QuotaHeaders
from metering.pricing import TokenUsage
from metering.service import (
    ENDPOINT_CHAT,
    ENDPOINT_COMPLETIONS,
    ENDPOINT_EMBEDDINGS,
    CallOutcome,
    MeteringService,
)
from plans.catalog import Plan
from plans.service import PlanService

log = logging.getLogger(__name__)
MAX_IDEMPOTENCY_KEY = 255
# What OpenAI generates for /v1/completions when max_tokens is not given.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
PATHS = {"chat.completions": "/chat/completions", "completions": "/completions",
         "embeddings": "/embeddings", "responses": "/responses"}


@dataclass
class GatewayResponse:
    status: int
    body: bytes | Iterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    streaming: bool = False
    # Run once the response has been sent: settling the limits lease is off the latency path
    # (the reservation already holds at least what the call used, so nothing can overspend).
    after: Callable[[], None] | None = None


@dataclass(frozen=True)
class CallContext:
    principal: Principal
    request_id: str
    user_header: str | None
    idempotency_key: str | None
    trace: CallTrace | None = None  # the call's spans, log fields and metrics


class GatewayService:
    def __init__(self, config: Config, tenancy: TenancyService, metering: MeteringService,
                 upstreams: dict[str, UpstreamClient], metrics: Metrics,
                 limits: LimitsService | None = None, plans: PlanService | None = None,
                 router: Router | None = None) -> None:
        self.config = config
        self.tenancy = tenancy
        self.metering = metering
        self.upstreams = upstreams
        self.metrics = metrics
        self.limits = limits if limits is not None and limits.enabled else None
        self.plans = plans
        self.router = router or Router(config)
        self.clock = utcnow  # when a call happened (tests freeze it with the limits' clock)

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
            for m in self.config.models]}

    def call(self, ctx: CallContext, endpoint: str, raw: bytes) -> GatewayResponse:
        """One metered call. Bad input raises before anything is forwarded or written."""
        _may_call(ctx.principal)
        body = parse_body(raw)
        return self._call(ctx, endpoint, body, raw, Wire(body))

    def messages(self, ctx: CallContext, raw: bytes) -> GatewayResponse:
        """Anthropic's Messages API, served as the chat call it translates to."""
        _may_call(ctx.principal)
        body = anthropic.to_chat(parse_body(raw))
        if ctx.principal.role == Role.USER or ctx.user_header is not None:
            # metadata.user_id is the client's own opaque id (Claude Code sets one): it names
            # the end user only when neither the key nor the header does.
            body.pop("user", None)
        return self._call(ctx, ENDPOINT_CHAT, body, None, MessagesWire(body["model"]))

    def responses(self, ctx: CallContext, raw: bytes) -> GatewayResponse:
        """OpenAI's Responses API: as it is to an upstream that speaks it, else as a chat call."""
        _may_call(ctx.principal)
        return self._call(ctx, *responses_call(self.config, parse_body(raw), raw))

    def _call(self, ctx: CallContext, endpoint: str, body: dict[str, Any], raw: bytes | None,
              wire: Wire) -> GatewayResponse:
        started = time.perf_counter()
        try:
            outcome, route = self._prepare(ctx, endpoint, body)
        except DATABASE_DOWN as exc:
            record_database_refusal(
                self.metering, self.tenancy, self.config, principal=ctx.principal,
                request_id=ctx.request_id, user_header=ctx.user_header,
                endpoint=wire.api or endpoint, body=body, started=started, at=self.clock(),
                exc=exc)
            raise
        (ctx.trace or CallTrace(self.metrics)).attach(outcome)
        try:
            return self._forward(outcome, route, started, endpoint, raw, wire)
        except DATABASE_DOWN:
            if outcome.record is None and not outcome.accepted:  # refused before forwarding
                try:  # (the ledger spools the row while the database is away)
                    self._finish(outcome, started, status="database_unavailable",
                                 http_status=503, error=DATABASE_UNAVAILABLE.detail)()
                except Exception:  # noqa: BLE001 - the answer is a 503 either way
                    log.exception("recording refused request %s failed", outcome.request_id)
            raise

    def _forward(self, outcome: CallOutcome, route: Route | None, started: float,
                 endpoint: str, raw: bytes | None, wire: Wire) -> GatewayResponse:
        outcome.api = wire.api
        stream = outcome.stream
        candidates = route.candidates if route is not None else [outcome.model]
        for i, model in enumerate(candidates):
            last = i == len(candidates) - 1
            if route is not None:
                why = self.router.acquire(model.upstream, routed=True)
                if why is not None:
                    route.skipped(model, why)
                    continue
                outcome.route_reason = route.reason(model)
            else:
                self.router.acquire(model.upstream, routed=False)
            outcome.model = model
            upstream = self.upstreams[model.upstream]
            try:
                resp, limit_headers = self._attempt(outcome, started, endpoint, raw, route, last)
            except _FallbackError:
                self.router.leave(upstream.name)
                continue
            except BaseException:
                self.router.leave(upstream.name)
                raise
            break
        else:  # every candidate was skipped or failed before answering
            raise self._no_candidate(outcome, route, started)
        outcome.accepted = True
        if stream and not is_event_stream(resp):
            # not a stream: fail before the first byte, billing what the body says it served
            try:
                data = resp.read(1 << 20)
            except Exception:  # noqa: BLE001 - nothing readable: the prompt is counted
                data = b""
            doc = loads(data)
            if is_answer(outcome.endpoint, doc):  # an upstream that ignored stream: true
                _take_usage(outcome, read_usage(doc))
                outcome.output_texts = lambda: texts_of_choices(doc)
            self._malformed(outcome, started, upstream, resp, data, limit_headers)
        if stream:
            return GatewayResponse(200, self._relay(outcome, started, upstream, resp, wire),
                                   {"Content-Type": "text/event-stream; charset=utf-8",
                                    "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                    **limit_headers},
                                   streaming=True)
        data = resp.data
        doc = loads(data)
        if not is_answer(outcome.endpoint, doc):
            self._malformed(outcome, started, upstream, resp, data, limit_headers)
        self.router.leave(upstream.name)  # the body is read: the call holds the upstream no more
        self.router.succeeded(upstream.name)
        _take_usage(outcome, read_usage(doc))
        outcome.output_texts = lambda: texts_of_choices(doc)
        outcome.metered_items = lambda: metered_items(doc)
        after = self._finish(outcome, started)
        assert outcome.record is not None
        return GatewayResponse(200, wire.response(data, doc, outcome.record),
                               {"Content-Type": "application/json", **limit_headers},
                               after=None if after is _nothing else after)

    def _attempt(self, outcome: CallOutcome, started: float, endpoint: str, raw: bytes | None,
                 route: Route | None, last: bool
                 ) -> tuple[Response, dict[str, str]]:
        """Reserve for this candidate and send the call. Raises _FallbackError when a routed call
        should go on to the next candidate (nothing is written then), or the error to answer
        with (its ledger row written)."""
        model, stream = outcome.model, outcome.stream
        upstream = self.upstreams[model.upstream]
        fallback = route is not None and not last
        try:
            clip = self._reserve(outcome, started, final=not fallback) \
                if self.limits is not None else None
        except (QuotaExceededError, RateLimitedError) as exc:
            if route is not None and fallback:  # another candidate may have room
                route.skipped(model, exc.detail)
                raise _FallbackError from exc
            raise
        lease: Lease | None = outcome.lease
        limit_headers = QuotaHeaders(lease)  # worked out while the upstream works
        payload = upstream_payload(raw, outcome.request, model, stream, clip, endpoint)
        # before the upstream can serve it: if this worker dies, the call is still recorded
        _name, cap = requested_output(endpoint, outcome.request, "max_tokens")
        self.metering.intents.open(self.metering.intent_of(
            outcome, outcome.prompt_estimate or len(payload) // 4,
            lease.out if lease is not None and lease.out is not None else cap))
        traced = outcome.trace.upstream_call(model, endpoint, outcome.request)
        try:
            resp = upstream.post(PATHS[endpoint], payload, stream=stream, meanwhile=limit_headers,
                                 request_id=outcome.request_id, extra=traced)
            status = resp.status
            outcome.trace.answered(status, resp.headers)
            err = None
            if status >= 300:
                try:
                    err = error_from_response(upstream.name, status, resp.data, resp.headers,
                                              outcome.request_id)
                except TransportError as exc:  # the error body did not arrive
                    err = upstream.translate(exc)
                resp.release()
        except DomainError as exc:
            self.router.failed(upstream.name)
            if route is not None and fallback:  # fall back before the first byte
                route.failed(model, exc.detail)
                self._release(outcome)
                raise _FallbackError from exc
            self._note_failure(outcome, route, model, exc.detail)
            failure = "timeout" if exc.status == 504 else "upstream_unavailable"
            self._finish(outcome, started, status=failure, http_status=exc.status,
                         error=exc.detail)()
            exc.headers.update(limit_headers())
            raise
        if err is not None:
            retryable = status == 429 or status >= 500
            if retryable:
                self.router.failed(upstream.name)
                if route is not None and fallback:
                    route.failed(model, f"HTTP {status}")
                    self._release(outcome)
                    raise _FallbackError
            else:
                self.router.succeeded(upstream.name)  # it answered: the upstream is up
            self._note_failure(outcome, route, model, f"HTTP {status}")
            self._finish(outcome, started, status="upstream_error", http_status=err.status,
                         error=err.detail)()
            err.headers.update(limit_headers())
            raise err
        return resp, limit_headers()

    def _malformed(self, outcome: CallOutcome, started: float, upstream: UpstreamClient,
                   resp: Response, body: bytes,
                   limit_headers: dict[str, str]) -> NoReturn:
        """A 2xx that is not the answer asked for: a 502, recorded as an upstream error with
        the tokens the upstream was sent (counted; nothing came back to count)."""
        resp.close()
        self.router.leave(upstream.name)
        self.router.failed(upstream.name)
        err = malformed_answer(upstream.name, resp.status, outcome.request_id, body)
        if outcome.reported is None:
            outcome.usage_problem = "the answer was not a model answer"
        self._finish(outcome, started, status="upstream_error", http_status=err.status,
                     error=err.detail)()
        err.headers.update(limit_headers)
        raise err

    @staticmethod
    def _note_failure(outcome: CallOutcome, route: Route | None, model: ModelConfig,
                      why: str) -> None:
        if route is not None:
            route.failed(model, why)
            outcome.route_reason = route.reason(model)

    def _release(self, outcome: CallOutcome) -> None:
        """Give back the reservation of a candidate that failed before it answered, before the
        next candidate reserves (so the two never count at once)."""
        lease, outcome.lease = outcome.lease, None
        _stop_heartbeat(outcome)
        self.metering.intents.close(outcome.request_id)  # this attempt is over: no row for it
        if lease is not None and self.limits is not None:
            try:
                self.limits.release(lease)
            except Exception:  # the lease expires by itself
                log.exception("releasing the limits lease %s failed", lease.id)

    def _no_candidate(self, outcome: CallOutcome, route: Route | None,
                      started: float) -> DomainError:
        assert route is not None  # a direct call always has its one model to try
        detail = (f"No model of alias {route.alias!r} could take the call: "
                  + "; ".join(route.notes) + ".")
        err = UpstreamUnavailableError(detail, headers={
            "Retry-After": str(self.router.retry_after())})
        err.status, err.openai_code = 503, "no_model_available"
        outcome.route_reason = route.reason(None)
        self._finish(outcome, started, status="upstream_unavailable", http_status=503,
                     error=detail)()
        return err

    def _reserve(self, outcome: CallOutcome, started: float,
                 final: bool = True) -> tuple[str, int] | None:
        """Reserve the call's estimate; returns the output-token field to set and its value
        when the grant is below what the call would otherwise generate."""
        assert self.limits is not None
        body, endpoint, model = outcome.request, outcome.endpoint, outcome.model
        field_name, requested = requested_output(endpoint, body, model.max_tokens_param)
        choices = choices_of(endpoint, body)
        want: int | None
        if endpoint == ENDPOINT_EMBEDDINGS:
            want, least = 0, 0
        elif requested is not None:
            want, least = requested, least_output(endpoint, requested)
        else:  # chat: the plan's default cap; completions: OpenAI's own default
            want = COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == ENDPOINT_COMPLETIONS else None
            least = least_output(endpoint, None)
        prompt = outcome.prompt_estimate = self.metering.prompt_tokens(model, endpoint, body,
                                                                       outcome.app_id)
        try:
            with outcome.trace.reserving():
                lease = self.limits.reserve(
                    app_id=outcome.app_id, end_user_id=outcome.end_user_id, model=model,
                    prompt_tokens=prompt, want_out=want, min_out=least, out_per_token=choices,
                    request_id=outcome.request_id, paywall=final)
        except (QuotaExceededError, RateLimitedError) as exc:
            if final:  # else the router tries the next candidate: no row for this one
                status = "quota_exceeded" if exc.status == 402 else "rate_limited"
                self._finish(outcome, started, status=status, http_status=exc.status,
                             error=exc.detail)()
            raise
        except DomainError as exc:
            self._finish(outcome, started, status="limits_unavailable", http_status=exc.status,
                         error=exc.detail)()
            raise
        outcome.lease = lease
        outcome.heartbeat = self.limits.keep_alive(lease)  # a long call keeps its reservation
        outcome.limits_pending = lease.fail_open
        if endpoint == ENDPOINT_EMBEDDINGS or lease.out is None:
            return None
        if requested is None or lease.out < requested:
            return field_name, lease.out
        return None

    def _prepare(self, ctx: CallContext, endpoint: str,
                 body: dict[str, Any]) -> tuple[CallOutcome, Route | None]:
        """Validate the call and name its end user, model (or route) and idempotency key."""
        name = self._model_name(body)
        requested_output(endpoint, body, "max_tokens")  # every cap field in range, limits
        choices_of(endpoint, body)                         # or none: a 400 before anything
        if not isinstance(body.get("stream"), bool | None):  # "true", 1: an upstream streams
            raise InvalidRequestError("stream must be true or false.", param="stream")
        model = self.config.model(name)
        if model is None and not self.router.is_alias(name):
            err = NotFoundError(f"The model '{name}' does not exist or is not configured.",
                                param="model")
            err.openai_code = "model_not_found"
            raise err
        end_user_id = self._end_user(ctx, body)
        route = None
        if model is None:
            route = self.router.route(name, self._plan(end_user_id), body)
            if route is None:  # another plan's alias
                err = NotFoundError(f"The model '{name}' is not an alias of this user's plan.",
                                    param="model")
                err.openai_code = "model_not_found"
                raise err
            model = route.candidates[0]
        app_id = ctx.principal.app_id
        assert app_id is not None  # app and user keys always belong to an app
        stream = body.get("stream") is True and endpoint != ENDPOINT_EMBEDDINGS
        outcome = CallOutcome(
            app_id=app_id, end_user_id=end_user_id, request_id=ctx.request_id,
            idempotency_key=self._idempotency_key(ctx, app_id, stream), endpoint=endpoint,
            model=model, stream=stream, request=body, created_at=self.clock(), latency_ms=0)
        if route is not None:
            outcome.route_alias, outcome.route_allowed = route.alias, route.allowed
        return outcome, route

    def _plan(self, end_user_id: int) -> Plan | None:
        if self.plans is None or not self.plans.catalog.plans:
            return None  # no plans: every model is allowed
        return self.plans.plan_of(end_user_id).plan

    def _relay(self, outcome: CallOutcome, started: float, upstream: UpstreamClient,
               resp: Response, wire: Wire) -> Iterator[bytes]:
        """Forward each complete SSE event as soon as it arrives; settle however it ends."""
        relay = wire.relay()
        settled = False
        after: Callable[[], None] = _nothing

        def settle(status: str, error: str | None = None) -> None:
            nonlocal settled, after
            self.router.leave(upstream.name)
            if relay.done:
                resp.release()
            else:
                resp.close()  # stop the upstream generating for nobody
            if status == "stream_error":
                self.router.failed(upstream.name)
            elif status == "ok":
                self.router.succeeded(upstream.name)
            _take_usage(outcome, relay.reading)
            outcome.output_texts, outcome.metered_items = relay.texts, relay.metered_items
            settled = True
            after = self._finish(outcome, started, status=status, error=error)

        try:
            last = b""
            try:
                for data in upstream.chunks(resp):
                    out = relay.feed(data)
                    if out:
                        if outcome.ttft_ms is None:
                            outcome.ttft_ms = _ms_since(started)
                        yield wire.part(out)
                tail = relay.flush()
                if tail:
                    yield wire.part(tail)
                if relay.upstream_error is not None:
                    raise _MidStreamError
                if relay.done:
                    settle("ok")
                    assert outcome.record is not None
                    last = wire.end(outcome.record)
                else:
                    error = f"upstream '{upstream.name}' closed the stream before [DONE]"
                    settle("stream_error", error)
                    last = wire.error(502, error, "upstream_error", "upstream_stream_error")
            except (DomainError, _MidStreamError) as exc:
                if relay.upstream_error is not None:  # its type and code, not its words
                    note(log, logging.WARNING, "request %s: upstream %s sent an error "
                         "mid-stream: %s", outcome.request_id, upstream.name,
                         relay.upstream_error)
                    error = (f"Upstream '{upstream.name}' failed mid-stream (request "
                             f"{outcome.request_id}).")
                    settle("stream_error", error)
                    last = wire.error(502, error, "upstream_error", "upstream_stream_error")
                else:
                    assert isinstance(exc, DomainError)
                    settle("stream_error", exc.detail)
                    last = wire.error(exc.status, exc.detail, exc.openai_type,
                                      exc.openai_code or "")
            # Sent after the ledger row (served: journaled, committed just after; a read waits
            # for that commit): a client that has seen the end can read its usage.
            yield last
        finally:
            if not settled:  # the client went away mid-stream
                settle("client_disconnected")
            after()  # queues the lease's settling: it does not hold up the stream's end

    def _finish(self, outcome: CallOutcome, started: float, *, status: str = "ok",
                http_status: int = 200, error: str | None = None) -> Callable[[], None]:
        """Write the call's ledger row; returns the settling of its limits lease, for the
        caller to run once the client has its answer."""
        _stop_heartbeat(outcome)  # the call is over: its lease is settled from here
        outcome.latency_ms = _ms_since(started)
        outcome.status, outcome.http_status, outcome.error = status, http_status, error
        if status != "ok" and outcome.idempotency_key != outcome.request_id:
            # only an answered call holds the client's key: a retry after this one runs
            outcome.idempotency_key = f"{outcome.idempotency_key}#{outcome.request_id}"
        try:
            with outcome.trace.settling():  # its row is written (served: journaled)
                record = self.metering.settle(outcome)
        except Exception:
            # The ledger spools on database failure; anything else here is a bug to see.
            log.exception("settling request %s failed", outcome.request_id)
            self.metrics.errors.labels(kind="settle_failed").inc()
            if outcome.lease is not None:
                self._settle_limits(outcome.lease, None)
            raise
        self.metrics.observe_call(record, time.perf_counter() - started)
        lease = outcome.lease
        if lease is None:
            return _nothing
        usage = None if record.usage_source == "none" else TokenUsage(
            input_tokens=record.input_tokens, output_tokens=record.output_tokens)
        return functools.partial(self._settle_limits, lease, usage, record.cost_pico_usd)

    def _settle_limits(self, lease: Lease, usage: TokenUsage | None,
                       cost_pico: int | None = None) -> None:
        assert self.limits is not None
        try:
            self.limits.settle_soon(lease, usage, cost_pico)
        except Exception:  # the lease expires by itself; the ledger has the call
            log.exception("settling the limits lease %s failed", lease.id)
            self.metrics.errors.labels(kind="limits_settle_failed").inc()

    @staticmethod
    def _model_name(body: dict[str, Any]) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("you must provide a model parameter", param="model")
        return name

    def _end_user(self, ctx: CallContext, body: dict[str, Any]) -> int:
        principal = ctx.principal
        named = [v for v in (ctx.user_header, body.get("user")) if v is not None]
        if principal.role == Role.USER:
            assert principal.end_user_id is not None
            for value in named:
                if value != principal.end_user:
                    raise PermissionDeniedError(
                        "This end-user key acts only for its own user; it cannot name another.")
            return principal.end_user_id
        _may_call(principal)
        assert principal.app_id is not None  # (an app key: _may_call said so)
        if not named:
            raise InvalidRequestError(
                "Name the end user: set the 'user' field or the X-Meterlane-User header.",
                param="user")
        named = [validate_user_id(v) for v in named]  # a non-string is a 400, not a 500
        if len(set(named)) > 1:
            raise InvalidRequestError(
                "The 'user' field and the X-Meterlane-User header name different users.",
                param="user")
        user = validate_user_id(named[0])
        return self.tenancy.ensure_end_user(principal.app_id, user)

    def _idempotency_key(self, ctx: CallContext, app_id: int, stream: bool) -> str:
        """The call's ledger key. A retry of a non-streamed call is answered before it gets
        here (core/idempotency.py); a stream's answer is not kept, so its key is checked
        against the ledger, where only an answered call holds it (_finish)."""
        key = ctx.idempotency_key
        if key is None:
            return ctx.request_id
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise InvalidRequestError(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters.")
        if stream and self.metering.is_key_used(app_id, key):
            raise ConflictError(f"Idempotency-Key {key!r} was already used for a call.")
        return key


def _may_call(principal: Principal) -> None:
    """Only app and end-user keys call models: any other is a 403 before its body is read (a
    finance key's malformed body is refused for the key, not the body)."""
    user = principal.role == Role.USER and principal.end_user_id is not None
    if not user and (principal.role != Role.APP or principal.app_id is None):
        raise PermissionDeniedError(
            f"A {principal.role.value} key cannot make model calls; use an app or user key.")


def _nothing() -> None:
    return None


def _stop_heartbeat(outcome: CallOutcome) -> None:
    beat, outcome.heartbeat = outcome.heartbeat, None
    if beat is not None:
        beat.stop()


def _take_usage(outcome: CallOutcome, reading: UsageReading) -> None:
    outcome.reported = reading.usage
    outcome.usage_problem, outcome.reported_total = reading.problem, reading.total
    outcome.usage_note, outcome.count_output = reading.note, reading.count_output


class _MidStreamError(Exception):
    """The upstream sent an error event in the middle of a stream."""


class _FallbackError(Exception):
    """This candidate could not take a routed call; the next one is tried."""


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
