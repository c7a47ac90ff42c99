"""The limits engine: reserve before a call, settle after it, and the quota a user sees.

Each limit of the caller's plan becomes a `Check` on a counter keyed by what is counted
(metric, window, model), not by plan: a user who changes plan keeps the usage already spent.
User-scope counters carry the end user's hash tag, app-wide ones the app's; a reservation
is one atomic store step per tag (one for nearly every plan), all or nothing."""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from core.background import background_runner
from core.config import ModelConfig
from core.errors import (
    DomainError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    ServiceUnavailableError,
)
from metering.leases import (
    COUNTER_GRACE_MS,
    Applied,
    Heartbeat,
    Lease,
    QuotaLine,
    Unsettled,
    app_tag,
    charges,
    counter_key,
    lease_tags,
    reserve_tags,
    user_tag,
)
from metering.limits_replay import catch_up, rebuild
from metering.limits_text import quota_headers, shown, unit_of, utc_iso
from metering.limits_track import TrackItem, track_many
from metering.limitstore import Actual, Check, LimitStore, Settlement
from metering.models import LimitRefusal
from metering.outage import LimitStoreUnavailableError, store_down_is_503, store_errors
from metering.pricing import TokenUsage
from metering.thresholds import (
    LimitEvent,
    LimitHook,
    Usage,
    batch_usages,
    counter_period,
    crossed,
    limit_info,
)
from plans.catalog import ALLOWANCE_ID, Catalog, LimitSpec, Plan
from plans.service import Assignment, PlanService
from plans.windows import Window, bucket_params, epoch_ms, from_epoch_ms, period_of, rolling_slots

log = logging.getLogger(__name__)
SETTLE_BATCH = 64
SETTLE_WAIT_S = 1.0  # the longest a call waits for its user's last answers to settle
METRIC_CODE = {"tokens": "t", "credits": "w", "requests": "r", "cost_usd": "c",
               "concurrent": "g"}
ExtraAllowance = Callable[[int, int, Assignment, datetime], int]  # app, end user, ...


def now_utc() -> datetime:
    return datetime.now(UTC)


class LimitsService:
    def __init__(self, catalog: Catalog, store: LimitStore, plans: PlanService, engine: Engine,
                 models: tuple[ModelConfig, ...] = (), *, lease_seconds: int = 600,
                 clock: Callable[[], datetime] = now_utc,
                 extra_allowance: ExtraAllowance | None = None) -> None:
        self.catalog = catalog
        self.models = {m.name: m for m in models}
        # the price in force (the finance catalog's; the config's without one)
        self.price_of: Callable[[ModelConfig, datetime], Any] = lambda m, _at: m.price
        self.store = store
        self.plans = plans
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.clock = clock
        # How far past its plan's allowance an end user may go (credits, overage); None: not
        self.extra_allowance = extra_allowance
        self._periods: dict[tuple[int, datetime | None], tuple[int, int, str, int]] = {}
        self._queue: deque[tuple[Lease, Actual | None]] = deque()
        self._draining = False
        self._background = background_runner()
        self.unsettled = Unsettled()
        self.catch_up_needed = threading.Event()
        self.catching_up = threading.Lock()
        # Set by the paywall: called on a quota refusal and when a call's usage crosses one of
        # `thresholds` (percent of a quota; rate limits have none).
        self.on_limit_event: LimitHook | None = None
        self.thresholds: tuple[int, ...] = (50, 80, 100)

    @property
    def enabled(self) -> bool:
        return self.catalog.enabled

    # -- resolving limits into checks -------------------------------------------------------

    def checks_for(self, app_id: int, end_user_id: int, assignment: Assignment,
                 model: ModelConfig | None, now: datetime, *, prompt_tokens: int = 0,
                 out_per_token: int = 1, extra: bool = True, meter: str | None = None,
                 meter_charge: int = 0) -> list[Applied]:
        """The checks of the plan's limits on a call (or on a meter event of `meter`, which
        charges `meter_charge` micro-units; "*": every limit, as the quota shows them)."""
        plan = assignment.plan
        limits = plan.limits_for(model.name) if model else plan.limits
        # a meter's limits count its events only; its events count on no other limit
        limits = tuple(x for x in limits if meter == "*" or (x.meter == meter if meter
                                                              else x.meter is None))
        credits = plan.terms.credits_per_token(model.tier) if model else 1
        price = self.price_of(model, now) if model and any(
            limit.metric == "cost_usd" for limit in limits) else None
        out: list[Applied] = []
        for limit in limits:
            fixed, per_out = (meter_charge, 0) if limit.meter is not None else charges(
                limit, model, prompt_tokens, out_per_token, credits, price)
            if fixed is None:
                continue
            tag = user_tag(app_id, end_user_id) if limit.scope == "user" else app_tag(app_id)
            amount = limit.amount
            if limit.id == ALLOWANCE_ID and extra:
                amount += self._extra(app_id, end_user_id, assignment, now)
            check = self._check(limit, assignment, now, fixed, per_out, amount)
            out.append(Applied(limit, tag, check))
        return out

    def _extra(self, app_id: int, end_user_id: int, assignment: Assignment,
               now: datetime) -> int:
        if self.extra_allowance is None:
            return 0
        try:
            return self.extra_allowance(app_id, end_user_id, assignment, now)
        except OperationalError:  # the database is down: the allowance alone, never more
            log.exception("could not read the credits of end user %s", end_user_id)
            return 0

    def _check(self, limit: LimitSpec, assignment: Assignment, now: datetime, fixed: int,
               per_out: int, amount: int | None = None) -> Check:
        w: Window = limit.window
        code = METRIC_CODE.get(limit.metric, "r")  # a meter's charge stays, as a request's
        amount = limit.amount if amount is None else amount
        if w.kind in ("calendar", "cycle"):
            key, expires = self._period_key(limit, assignment, now)
            return Check(key=key, kind="counter", metric=code, amount=amount,
                         fixed=fixed, per_out=per_out, expires_ms=expires)
        key = counter_key(limit)
        if w.kind == "rolling":
            slots = rolling_slots(w, now)
            return Check(key=key, kind="rolling", metric=code, amount=amount, fixed=fixed,
                         per_out=per_out, slot_ms=slots.size * 1000, slots=slots.count,
                         slot=slots.current)
        if w.kind == "bucket":
            refill, interval_ms = bucket_params(w)
            return Check(key=key, kind="bucket", metric=code, amount=amount, fixed=fixed,
                         per_out=per_out, refill=refill, interval_ms=interval_ms)
        return Check(key=key, kind="gauge", metric=code, amount=amount, fixed=fixed,
                     per_out=per_out)

    def _period_key(self, limit: LimitSpec, assignment: Assignment,
                    now: datetime) -> tuple[str, int]:
        """The counter key of the period holding `now`, and when the key may go; periods are
        cached until they end (working them out in a time zone is most of a reservation's
        own CPU)."""
        anchor = assignment.anchored_at if limit.window.kind == "cycle" else None
        cache_key = (id(limit), anchor)
        now_ms = epoch_ms(now)
        hit = self._periods.get(cache_key)
        if hit is not None and hit[0] <= now_ms < hit[1]:
            return hit[2], hit[3]
        period = period_of(limit.window, now, anchor)
        found = (f"{counter_key(limit)}|{period.id}", epoch_ms(period.end) + COUNTER_GRACE_MS)
        if len(self._periods) > 100_000:
            self._periods.clear()
        self._periods[cache_key] = (epoch_ms(period.start), epoch_ms(period.end), *found)
        return found

    # -- reserve / settle / release ---------------------------------------------------------

    def reserve(self, *, app_id: int, end_user_id: int, model: ModelConfig, prompt_tokens: int,
                want_out: int | None, min_out: int, out_per_token: int = 1,
                request_id: str = "", keep: bool = False, paywall: bool = True) -> Lease:
        """Reserve the call's estimate against every limit of the user's plan, all or nothing.
        Raises QuotaExceededError / RateLimitedError naming the limit, or
        ServiceUnavailableError when the store is down and the plan fails closed. With
        `keep`, a lease no limit applies to is stored all the same (the metering API settles
        it by id later); the gateway keeps such leases only in memory. `want_out` None: the
        plan's default_max_output_tokens."""
        now = self.clock()
        assignment = self.plans.plan_of(end_user_id)
        plan = assignment.plan
        if not plan.terms.allows_tier(model.tier):
            err = PermissionDeniedError(
                f"Model {model.name!r} is in tier {model.tier!r}, which plan {plan.id!r} does "
                f"not include (it may call: {', '.join(plan.terms.tiers or ())}).",
                param="model")
            err.openai_code = "model_not_in_plan"
            raise err
        if want_out is None:
            want_out = plan.default_max_output_tokens
        applied = self.checks_for(app_id, end_user_id, assignment, model, now,
                                prompt_tokens=prompt_tokens, out_per_token=out_per_token)
        lease_id = f"ls_{app_id}_{end_user_id}_{uuid.uuid4().hex}"
        bounded = any(a.check.per_out > 0 for a in applied)
        credits = plan.terms.credits_per_token(model.tier)
        lease = Lease(lease_id, plan, model.name, applied, want_out if bounded else None, now,
                      credits_per_token=credits,
                      meta={"app_id": app_id, "end_user_id": end_user_id, "model": model.name,
                            "plan": plan.id, "request_id": request_id, "w": credits})
        if not applied and not keep:
            return lease
        tags = lease.tags or [user_tag(app_id, end_user_id)]
        lease.meta["tags"] = tags
        now_ms = epoch_ms(now)
        expires = now_ms + self.lease_seconds * 1000
        lease.expires = from_epoch_ms(expires)
        reserved: list[str] = []
        waited = False
        try:
            while True:
                grant, hit = reserve_tags(self.store, lease, tags, reserved, now_ms, expires,
                                          want_out, min_out)
                # This user's last answers may still be held here at their estimates (each is
                # settled just after its answer): only when that may have clipped or refused
                # this call is it reserved again once they are settled (Unsettled).
                if waited or (hit is None and (grant >= want_out or not bounded)) \
                        or not self.unsettled.pending(tags):
                    break
                self._release_tags(lease.id, reserved, now)
                reserved.clear()
                self.unsettled.wait(tags, SETTLE_WAIT_S)
                waited = True
                lease.id = f"ls_{app_id}_{end_user_id}_{uuid.uuid4().hex}"
            if hit is not None:
                need = hit.check.fixed + hit.check.per_out * max(min_out, 1)
                raise self._refusal(lease, hit, now, app_id, end_user_id, request_id, need,
                                    paywall=paywall)
        except LimitStoreUnavailableError as exc:
            self._release_tags(lease.id, reserved, now)
            if plan.on_store_failure == "open":
                log.warning("limit store unavailable, failing open for plan %s: %s", plan.id, exc)
                self.catch_up_needed.set()
                lease.fail_open, lease.out = True, None
                return lease
            raise ServiceUnavailableError(
                "The limits store is unavailable, and this plan does not allow calls it cannot "
                "count; try again shortly.", headers={"Retry-After": "1"}) from exc
        except DomainError:
            self._release_tags(lease.id, reserved, now)
            raise
        lease.out = grant if bounded else None
        if self.catch_up_needed.is_set():
            self._start_catch_up()
        return lease

    def _release_tags(self, lease_id: str, tags: list[str], now: datetime) -> None:
        for tag in tags:
            try:
                self.store.settle(tag, lease_id, None, now_ms=epoch_ms(now))
            except Exception:  # noqa: BLE001 - the lease expires by itself
                log.warning("could not release lease %s on %s; it will expire", lease_id, tag)

    def _refusal(self, lease: Lease, hit: Applied, now: datetime, app_id: int,
                 end_user_id: int, request_id: str, need: int,
                 paywall: bool = True) -> DomainError:
        limit, state = hit.limit, hit.state
        used = state.used if state else 0
        resets = hit.resets_at(now, need)
        rate = limit.is_rate
        unit = unit_of(limit)
        detail = (f"{'Rate limit' if rate else 'Quota'} {limit.id!r} of plan {lease.plan.id!r} "
                  f"reached: {shown(limit, used)} of {shown(limit, hit.check.amount)} {unit} used"
                  + (f"; resets at {utc_iso(resets)}" if resets else
                     "; frees up as running calls end") + ".")
        info = limit_info(limit, used, hit.check.amount, resets)
        headers: dict[str, str] = {}
        if resets is not None:
            wait = max(1, -(-int((resets - now).total_seconds() * 1000) // 1000))
            headers["Retry-After"] = str(wait)
        elif rate:
            headers["Retry-After"] = "1"
        headers.update(quota_headers([hit], now))
        err: DomainError = (RateLimitedError if rate else QuotaExceededError)(
            detail, headers=headers, limit=info, plan=lease.plan.id)
        self._record_refusal(app_id, end_user_id, request_id, lease, limit, used, resets,
                             "rate_limited" if rate else "quota_exceeded", now)
        if not rate and paywall and self.on_limit_event is not None:
            event = LimitEvent(app_id, end_user_id, lease.plan, limit, info, used,
                               hit.check.amount, counter_period(hit.check, now), None,
                               request_id)
            block: dict[str, Any] | None
            try:
                block = self.on_limit_event(event)
            except Exception:  # noqa: BLE001 - the refusal stands without its paywall event
                log.exception("the paywall could not record the refusal of %s", request_id)
                block = None
            if block is not None:
                err.extra["paywall"] = block
        return err

    def _crossings(self, lease: Lease, actual: Actual) -> list[LimitEvent]:
        """The thresholds of its quotas that this call's usage crossed (from the states its
        reservation saw: no store round trip)."""
        app_id, end_user_id = lease.meta.get("app_id"), lease.meta.get("end_user_id")
        if not isinstance(app_id, int) or not isinstance(end_user_id, int):
            return []
        now = self.clock()
        usages = []
        for a in lease.applied:
            if a.state is not None:
                c = a.check
                before = max(a.state.used - (c.fixed + c.per_out * (lease.out or 0)), 0)
                usages.append(Usage(a.limit, c, before, before + actual.charge(c, c.fixed),
                                    a.resets_at(now)))
        return crossed(app_id, end_user_id, lease.plan, usages, self.thresholds, now,
                       str(lease.meta.get("request_id") or ""))

    def _crossings_now(self, app_id: int, end_user_id: int, model: ModelConfig | None,
                       actual: Actual, request_id: str = "") -> None:
        self._crossings_many([(app_id, end_user_id, model, actual, request_id)])

    def _crossings_many(self, items: list[tuple[int, int, ModelConfig | None, Actual, str]]
                        ) -> None:
        """For usage counted without a reservation's states (the metering API): read the
        counters after it (one round trip where the store batches) and emit the thresholds
        it crossed."""
        if self.on_limit_event is None:
            return
        try:
            now = self.clock()
            peeks: list[tuple[str, list[Check]]] = []
            seen: list[tuple[Plan, list[tuple[list[Applied], int]]]] = []
            for app_id, end_user_id, model, _, _ in items:
                assignment = self.plans.plan_of(end_user_id)
                applied = self.checks_for(app_id, end_user_id, assignment, model, now)
                if model is None:  # a per-model limit of another model saw none of it
                    applied = [a for a in applied if a.limit.model is None]
                parts = []
                for tag in dict.fromkeys(a.tag for a in applied):
                    group = [a for a in applied if a.tag == tag]
                    parts.append((group, len(peeks)))
                    peeks.append((tag, [a.check for a in group]))
                seen.append((assignment.plan, parts))
            states = self.store.peek_many(peeks, now_ms=epoch_ms(now))
            found = batch_usages([(i[3], parts) for i, (_, parts) in zip(items, seen,
                                                                        strict=True)],
                                 states, now)
            for (app_id, end_user_id, _, _, request_id), (plan, _), usages in zip(
                    items, seen, found, strict=True):
                self._emit(crossed(app_id, end_user_id, plan, usages, self.thresholds, now,
                                   request_id))
        except Exception:  # noqa: BLE001 - a threshold event is a notice, never a failure
            log.exception("could not check the thresholds of %d end users", len(items))

    def _emit(self, events: list[LimitEvent]) -> None:
        assert self.on_limit_event is not None
        for event in events:
            try:
                self.on_limit_event(event)
            except Exception:  # noqa: BLE001 - a threshold event is a notice, never a failure
                log.exception("the paywall could not record a threshold of %s", event.limit.id)

    def _record_refusal(self, app_id: int, end_user_id: int, request_id: str, lease: Lease,
                        limit: LimitSpec, used: int, resets: datetime | None, kind: str,
                        now: datetime) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(LimitRefusal).values(
                    app_id=app_id, end_user_id=end_user_id, request_id=request_id[:40],
                    plan_id=lease.plan.id, limit_id=limit.id, metric=limit.metric,
                    window=limit.window.spec, kind=kind, used=used, amount=limit.amount,
                    resets_at=resets, model=lease.model, created_at=now))
        except Exception:  # noqa: BLE001 - a refusal stands even if its record cannot be kept
            log.exception("could not record the refusal of request %s", request_id)

    def settle(self, lease: Lease, usage: TokenUsage | None, cost_pico: int | None) -> str:
        """Settle with the real usage (None: release it all). Idempotent."""
        if lease.done or lease.fail_open or not lease.applied:
            lease.done = True
            return "settled" if usage is not None else "released"
        lease.done = True
        return self._settle_batch([(lease, _actual(lease, usage, cost_pico))])[0]

    def settle_soon(self, lease: Lease, usage: TokenUsage | None,
                    cost_pico: int | None) -> None:
        """Settle without holding up the caller: under gevent one greenlet per worker settles
        whatever has queued up, in one store round trip; elsewhere it settles at once."""
        if lease.done or lease.fail_open or not lease.applied:
            lease.done = True
            return
        lease.done = True
        actual = _actual(lease, usage, cost_pico)
        if actual is not None and self.on_limit_event is not None:
            try:
                crossed = self._crossings(lease, actual)
            except Exception:  # noqa: BLE001 - never in the way of the settle below
                log.exception("checking the thresholds of lease %s failed", lease.id)
                crossed = []
            if crossed:
                self._background(functools.partial(self._emit, crossed))
        self.unsettled.hold(lease.tags)
        if not self.store.batches:
            # One settle per round trip (a SQL transaction, a cluster): settle each on its own
            # so that a backlog can never hold reservations past their lease time.
            self._background(functools.partial(self._settle_one, lease, actual))
            return
        self._queue.append((lease, actual))
        if not self._draining:
            self._draining = True
            self._background(self._drain)

    def _drain(self) -> None:
        while True:
            try:
                while self._queue:
                    batch: list[tuple[Lease, Actual | None]] = []
                    while self._queue and len(batch) < SETTLE_BATCH:
                        batch.append(self._queue.popleft())
                    try:
                        self._settle_batch(batch)
                    except Exception:  # the leases expire by themselves; the ledger has them
                        log.exception("settling %d limits leases failed", len(batch))
                    finally:
                        self.unsettled.done([t for lease, _ in batch for t in lease.tags])
            finally:
                self._draining = False
            # A lease queued just as the loop ended (another thread) must not wait for the next.
            if not self._queue or self._draining:
                return
            self._draining = True

    def _settle_one(self, lease: Lease, actual: Actual | None) -> None:
        try:
            self._settle_batch([(lease, actual)])
        except Exception:  # the lease expires by itself; the ledger has the call
            log.exception("settling the limits lease %s failed", lease.id)
        finally:
            self.unsettled.done(lease.tags)

    def _settle_batch(self, batch: list[tuple[Lease, Actual | None]]) -> list[str]:
        now = self.clock()
        items = [(tag, lease, actual) for lease, actual in batch for tag in lease.tags]
        try:
            with store_errors():  # the gateway settles once: no answer to remember
                results = self.store.settle_many(
                    [(tag, lease.id, actual) for tag, lease, actual in items],
                    now_ms=epoch_ms(now), remember_ms=0)
        except LimitStoreUnavailableError:
            log.error("limit store unavailable settling %d leases; their reservations are "
                      "held until they expire, and the ledger has the calls", len(batch))
            self.catch_up_needed.set()
            return ["unavailable"] * len(batch)
        outcomes: dict[str, str] = {}
        for (tag, lease, actual), result in zip(items, results, strict=True):
            if result.outcome == "expired" and actual is not None:
                # The call outlived its lease: its reservation was returned, so count it now.
                group = [a.check for a in lease.applied if a.tag == tag]
                with store_errors():
                    self.store.commit(tag, f"late:{lease.id}", group, actual,
                                      now_ms=epoch_ms(now))
            outcomes[lease.id] = result.outcome
        return [outcomes[lease.id] for lease, _ in batch]

    def release(self, lease: Lease) -> str:
        return self.settle(lease, None, None)

    def renew(self, lease: Lease) -> bool:
        """Push the lease's expiry lease_seconds out from now, on every tag holding it;
        False once it is no longer active anywhere."""
        if lease.done or lease.fail_open or not lease.applied:
            return False
        now_ms = epoch_ms(self.clock())
        expires = now_ms + self.lease_seconds * 1000
        alive = False
        for tag in lease.tags:
            with store_errors():
                alive = self.store.renew(tag, lease.id, now_ms=now_ms, expires_ms=expires) \
                    or alive
        if alive:
            lease.expires = from_epoch_ms(expires)
        return alive

    def keep_alive(self, lease: Lease) -> Heartbeat | None:
        """A heartbeat renewing the lease while its call runs (a third of its lifetime
        apart); the caller stops it when the call ends."""
        if lease.done or lease.fail_open or not lease.applied:
            return None
        return Heartbeat(lambda: self.renew(lease), max(1.0, self.lease_seconds / 3))

    def lease_info(self, lease_id: str) -> dict[str, Any] | None:
        """What a lease id names (app, end user, model, tags), if it is ours and still known."""
        named = lease_tags(lease_id)
        if named is None:
            return None
        app_id, _user, tag = named
        for candidate in (tag, app_tag(app_id)):
            with store_down_is_503():
                meta = self.store.lease_meta(candidate, lease_id)
            if meta is not None:
                return dict(meta)
        return None

    def settle_by_id(self, lease_id: str, tags: list[str], usage: TokenUsage | None,
                     cost_pico: int | None, *, credits_per_token: int = 1) -> Settlement:
        """Settle (or, with no usage, release) a lease known only by id: the metering API."""
        now = self.clock()
        actual = None if usage is None else Actual(
            usage.total_tokens, cost_pico or 0, usage.total_tokens * credits_per_token)
        first: Settlement | None = None
        for tag in tags:
            with store_down_is_503():
                result = self.store.settle(tag, lease_id, actual, now_ms=epoch_ms(now))
            first = first or result
        ids = lease_tags(lease_id)
        if actual is not None and ids is not None and first is not None \
                and first.outcome == "settled":
            self._background(functools.partial(self._crossings_now, ids[0], ids[1], None,
                                               actual, lease_id))
        return first or Settlement("unknown")

    # -- the quota a user sees --------------------------------------------------------------

    def quota(self, app_id: int, end_user_id: int) -> tuple[Plan, list[QuotaLine]]:
        now = self.clock()
        assignment = self.plans.plan_of(end_user_id)
        applied = self.checks_for(app_id, end_user_id, assignment, None, now, meter="*")
        lines: list[QuotaLine] = []
        for tag in dict.fromkeys(a.tag for a in applied):
            group = [a for a in applied if a.tag == tag]
            with store_down_is_503():
                states = self.store.peek(tag, [a.check for a in group], now_ms=epoch_ms(now))
            for a, st in zip(group, states, strict=True):
                hit = Applied(a.limit, a.tag, a.check, st)
                lines.append(QuotaLine(a.limit, st.used, max(0, st.remaining),
                                       hit.resets_at(now), a.limit.model))
        order = {id(limit): i for i, limit in enumerate(assignment.plan.limits)}
        lines.sort(key=lambda line: order.get(id(line.limit), 0))
        return assignment.plan, lines

    def allowance_used(self, app_id: int, end_user_id: int, assignment: Assignment,
                       now: datetime) -> int:
        """Credits on the allowance counter of the cycle holding `now` (settled and held)."""
        found = [a for a in self.checks_for(app_id, end_user_id, assignment, None, now,
                                          extra=False) if a.limit.id == ALLOWANCE_ID]
        if not found:
            return 0
        with store_down_is_503():
            [state] = self.store.peek(found[0].tag, [found[0].check], now_ms=epoch_ms(now))
        return state.used

    # -- the ledger is the truth: catch-up and rebuild (limits_replay.py) --------------------

    def needs_catch_up(self) -> None:  # usage recorded, not counted: count it when back
        self.catch_up_needed.set()

    def catch_up_soon(self) -> None:  # recorded, not counted (a dead worker's calls): now
        self.catch_up_needed.set()
        self._start_catch_up()

    def _start_catch_up(self) -> None:
        if self.catching_up.locked():
            return
        threading.Thread(target=self.catch_up, daemon=True, name="limits-catch-up").start()

    def catch_up(self) -> int:
        """Count in the store the calls that were let through while it was down."""
        return catch_up(self)

    def rebuild(self, progress: Callable[[int], None] | None = None) -> int:
        """Set the current periods' counters from the ledger; see limits_replay.rebuild."""
        return rebuild(self, progress)

    def track(self, *, app_id: int, end_user_id: int, model: ModelConfig, usage: TokenUsage,
              cost_pico: int | None, event_id: str, at: datetime | None = None) -> bool:
        """Count usage the app reports for a call it made itself (once per event id)."""
        return self.track_many([(app_id, end_user_id, model, usage, cost_pico, event_id)],
                               [at])[0]

    def track_many(self, items: list[TrackItem], times: list[datetime | None] | None = None
                   ) -> list[bool]:
        """Count reported calls, each once per event id; see limits_track.track_many."""
        return track_many(self, items, times)


def _actual(lease: Lease, usage: TokenUsage | None, cost_pico: int | None) -> Actual | None:
    if usage is None:
        return None
    return Actual(usage.total_tokens, cost_pico or 0, usage.total_tokens * lease.credits_per_token)
