"""Usage an app reports for calls it made itself, counted into the limits (each event once),
in the windows still holding the time the call happened."""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from core.config import ModelConfig
from metering.eventtime import counts_now
from metering.leases import Applied
from metering.limitstore import Actual, Check, LimitStore
from metering.outage import store_down_is_503
from metering.pricing import TokenUsage
from plans.service import Assignment, PlanService
from plans.windows import epoch_ms

# app, end user, model, usage, cost (pico-USD), event id
TrackItem = tuple[int, int, ModelConfig, TokenUsage, int | None, str]


class Tracker(Protocol):
    """What counting reported calls reads of the limits engine (metering.limits)."""

    store: LimitStore
    plans: PlanService
    clock: Callable[[], datetime]
    catch_up_needed: threading.Event
    _background: Callable[[Callable[[], Any]], Any]

    def checks_for(self, app_id: int, end_user_id: int, assignment: Assignment,
                   model: ModelConfig | None, now: datetime, *, prompt_tokens: int = 0,
                   out_per_token: int = 1, extra: bool = True) -> list[Applied]: ...

    def _start_catch_up(self) -> None: ...

    def _crossings_many(self, items: list[tuple[int, int, ModelConfig | None, Actual, str]]
                        ) -> None: ...


def track_many(self: Tracker, items: list[TrackItem],
               times: list[datetime | None] | None = None) -> list[bool]:
    """Count reported calls (app, end user, model, usage, cost, event id), each once per
    event id, in one store round trip; whether each was new. Thresholds checked after.
    A call that happened earlier (`times`) counts only in the windows still holding it."""
    now = self.clock()
    times = times or [None] * len(items)
    calls: list[tuple[str, str, list[Check], Actual]] = []
    owners: list[int] = []
    actuals: dict[int, Actual] = {}  # the items some limit counts
    for n, (app_id, end_user_id, model, usage, cost, event_id) in enumerate(items):
        assignment = self.plans.plan_of(end_user_id)
        applied = [a for a in self.checks_for(app_id, end_user_id, assignment, model, now,
                                            prompt_tokens=usage.input_tokens)
                   if counts_now(a.limit, assignment.anchored_at, times[n] or now, now)]
        actual = Actual(usage.total_tokens, cost or 0, usage.total_tokens
                        * assignment.plan.terms.credits_per_token(model.tier))
        for tag in dict.fromkeys(a.tag for a in applied):
            calls.append((tag, f"ev:{app_id}:{event_id}",
                          [a.check for a in applied if a.tag == tag], actual))
            owners.append(n)
            actuals[n] = actual
    with store_down_is_503():
        results = self.store.commit_many(calls, now_ms=epoch_ms(now))
    if self.catch_up_needed.is_set():  # the store is back: count what it missed
        self._start_catch_up()
    fresh = [True] * len(items)
    for n, ok in zip(owners, results, strict=True):
        fresh[n] = fresh[n] and ok
    counted: list[tuple[int, int, ModelConfig | None, Actual, str]] = [
        (items[n][0], items[n][1], items[n][2], actual, items[n][5])
               for n, actual in actuals.items() if fresh[n]]  # counted before: no news
    if counted:  # each counter's thresholds once, against the batch's sum (batch_usages)
        self._background(functools.partial(self._crossings_many, counted))
    return fresh



def untrack(self: Tracker, item: TrackItem, at: datetime) -> bool:
    """Give back what a reported call counted (a correction voided or amended it), in the
    limits whose window holding now also holds the call's time `at`: a window already over
    is not re-opened. Once per event id (the correction's own); whether it was new."""
    app_id, end_user_id, model, usage, cost, event_id = item
    now = self.clock()
    assignment = self.plans.plan_of(end_user_id)
    applied = [a for a in self.checks_for(app_id, end_user_id, assignment, model, now,
                                        prompt_tokens=usage.input_tokens)
               if counts_now(a.limit, assignment.anchored_at, at, now)]
    back = Actual(-usage.total_tokens, -(cost or 0), -usage.total_tokens
                  * assignment.plan.terms.credits_per_token(model.tier))
    calls = [(tag, f"un:{app_id}:{event_id}",
              [_given_back(a.check, at) for a in applied if a.tag == tag], back)
             for tag in dict.fromkeys(a.tag for a in applied)]
    if not calls:
        return False
    with store_down_is_503():
        results = self.store.commit_many(calls, now_ms=epoch_ms(now))
    return all(results)


def _given_back(check: Check, at: datetime) -> Check:
    """The check a give-back goes through: its request too (fixed), and for a rolling
    window, from the slot the call was counted in (the one holding its time, for a call
    reported as it happened), not the current one (a slot without usage takes nothing back)."""
    check = dataclasses.replace(check, fixed=-check.fixed)
    if check.kind == "rolling" and check.slot_ms:
        counted = epoch_ms(at) // check.slot_ms
        low = check.slot - check.slots + 1
        check = dataclasses.replace(check, slot=min(check.slot, max(low, counted)))
    return check
