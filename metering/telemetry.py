"""The log line and metrics of a metering request (usage an app reports, its leases, meter
events, CloudEvents): core/observe.py's RequestDetail for those routes, as the gateway's
CallTrace is for a model call.

The line is bounded whatever the request carries: a batch gives counts and sums (events,
tokens by kind, cost), never a list per event; the end user and the model only when the
request has one. The metrics are counted when the request has ended, off its latency path:
the tokens of the calls newly recorded (by kind, the model labelled only when the operator
configured or priced it: a reported call names any model it likes) and each limit refusal."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Response, g
from opentelemetry.trace import Span

from core import observe
from core.errors import DomainError
from core.metrics import TOKEN_KINDS, Metrics
from core.web import config, part
from metering.pricing import TokenUsage

OTHER_MODEL = "other"  # the metrics' label of a model the operator neither configured nor priced
REFUSALS = {402: "quota_exceeded", 429: "rate_limited"}
_MANY = object()  # more than one end user, or model, in the request
F = TypeVar("F", bound=Callable[..., Response])


class MeterLine:
    """What one metering request did: its events, their end user and model (when one), the
    tokens and cost they reported, what the limits said."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.events = 0
        self.outcomes: dict[str, int] = {}
        self.tokens = dict.fromkeys((kind for kind, _ in TOKEN_KINDS), 0)
        self.cost: int | None = None
        self.limit: dict[str, Any] | None = None  # None: the request checks no limit
        self.refusals: dict[tuple[str, str], int] = {}
        self._user: object = None
        self._model: object = None
        self._counted: dict[tuple[str, str], int] = {}  # (model label, kind): new tokens

    def user(self, end_user_id: int) -> None:
        self._user = end_user_id if self._user in (None, end_user_id) else _MANY

    def model(self, name: str) -> None:
        self._model = name if self._model in (None, name) else _MANY

    def call(self, end_user_id: int, model: str, usage: TokenUsage, cost: int | None,
             outcome: str, *, priced: bool) -> None:
        """A reported call: `outcome` is the ledger's answer (written, spooled: new)."""
        new = outcome in ("written", "spooled")  # in the ledger (or on its way): counted once
        self.event("tracked" if new else outcome, end_user_id, model, cost)
        for kind, attribute in TOKEN_KINDS:
            self.tokens[kind] += getattr(usage, attribute)
        if new:
            label = model if priced or config().model(model) is not None else OTHER_MODEL
            for kind, attribute in TOKEN_KINDS:
                count = getattr(usage, attribute)
                if count:
                    key = (label, kind)
                    self._counted[key] = self._counted.get(key, 0) + count

    def event(self, outcome: str, end_user_id: int | None = None, model: str | None = None,
              cost: int | None = None) -> None:
        self.events += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if end_user_id is not None:
            self.user(end_user_id)
        if model is not None:
            self.model(model)
        if cost is not None:
            self.cost = (self.cost or 0) + cost

    def checked(self, enabled: bool) -> None:
        """The request's limits were checked, and let it through."""
        if self.limit is None:
            self.limit = {"outcome": "allowed" if enabled else "off"}

    def refused(self, exc: DomainError) -> bool:
        """A limit refused the request (or one event of a batch); whether it was a refusal."""
        kind = REFUSALS.get(exc.status)
        info = exc.extra.get("limit")
        if kind is None or not isinstance(info, dict):  # a limit's refusal names the limit
            return False
        metric = str(info.get("metric") or "unknown")
        key = (kind, metric)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if self.limit is None or self.limit.get("outcome") != "refused":
            self.limit = {"outcome": "refused", "kind": kind, "metric": metric,
                          "id": info.get("id")}
        return True

    # -- RequestDetail -------------------------------------------------------------------

    def response_headers(self) -> dict[str, str]:
        return {}

    def finish(self, fields: dict[str, Any], span: Span | None) -> None:
        fields["events"] = self.events
        if self.outcomes:
            fields["outcomes"] = self.outcomes
        if isinstance(self._user, int):
            fields["end_user_id"] = self._user
        if isinstance(self._model, str):
            fields["model"] = self._model
        if any(self.tokens.values()):
            fields["tokens"] = self.tokens
        if self.cost is not None:
            fields["cost_pico_usd"] = self.cost
        if self.limit is not None:
            refused = sum(self.refusals.values())
            fields["limit"] = {**self.limit, "refused": refused} if refused > 1 \
                else self.limit
        metrics = self.metrics
        for (label, kind), count in self._counted.items():
            metrics.labelled(metrics.tokens, label, kind).inc(count)
        for (kind, metric), count in self.refusals.items():
            metrics.labelled(metrics.refusals, kind, metric).inc(count)
        if span is not None and isinstance(self._user, int):
            span.set_attribute("meterlane.end_user_id", self._user)


def line() -> MeterLine:
    """This request's MeterLine (made by `metered`)."""
    found = g.get("request_detail")
    if isinstance(found, MeterLine):
        return found
    made = MeterLine(part(Metrics))
    observe.attach(made)
    return made


def metered(view: F) -> F:
    """A metering route: its MeterLine, and a limit's refusal of the whole request on it."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Response:
        found = line()
        try:
            return view(*args, **kwargs)
        except DomainError as exc:
            found.refused(exc)
            raise

    return cast(F, wrapped)
