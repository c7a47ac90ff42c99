"""Reminders to subscribers (NTC-01 ... NTC-04), sent through the app's webhook by
`meterlane notices run` (a cron job; run it as often as you like: each notice is sent once).

- trial_ending (NTC-01): before a trial converts, with the amount, the date and how to cancel.
  Trials over 31 days: 14 days ahead (California: 3-21 days; Visa: at least 7); 8-31 days:
  10 days ahead or at the start (on time from 21 to 7 days ahead); 7 days or fewer: at once
  (Visa's 7 days cannot be met).
- renewal_upcoming (NTC-02): yearly plans, 30 days before the renewal (Colorado: 25-40 days;
  California: 15-45).
- annual_reminder (NTC-03): every subscription, once a subscription year, within the 30 days
  before its anniversary (California AB 2863, Minnesota, Colorado).
- price_change (NTC-04): 21 days before a scheduled price change (California 7-30, New York
  5-30, Visa at least 7); a change must be scheduled 30 days ahead or it is refused (422).

A notice found late (the job did not run in its window) is still sent, marked on_time=false.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import orjson
from babel.dates import format_date
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from core import i18n
from core.audit import Actor, record
from core.db import utcnow
from core.errors import DomainError, InvalidRequestError, NotFoundError
from core.events import EventService, new_event_id
from core.models import EndUser
from core.pagination import trimmed, unknown_cursor
from paywall.acknowledge import day
from paywall.models import Acknowledgment, Notice, PriceChange
from paywall.service import RETENTION, jsonable
from plans import subscriptions
from plans.catalog import Catalog, Plan
from plans.terms import format_minor, minor_exponent

DAY = timedelta(days=1)
PRICE_CHANGE_LEAD = timedelta(days=30)  # NTC-04: scheduled at least this far ahead
LIVE = ("trialing", "active", "past_due")  # past due still renews once paid
NOTICE_TYPES = ("trial_ending", "renewal_upcoming", "annual_reminder", "price_change")


class NoticeWindowError(DomainError):
    status, slug, title = 422, "notice-window-missed", "Too late to give the required notice"


@dataclass(frozen=True)
class Window:
    """Send `target` days before the event; on time between `latest` and `earliest` days."""

    earliest: int
    target: int
    latest: int

    def __str__(self) -> str:
        return f"{self.latest}-{self.earliest} days before"


RENEWAL = Window(40, 30, 25)
ANNUAL = Window(30, 30, 1)
PRICE = Window(30, 21, 7)


def trial_window(trial_days: int) -> Window:
    if trial_days > 31:
        return Window(21, 14, 7)
    if trial_days >= 8:  # a few days' slack before Visa's 7, for a job that runs daily
        return Window(min(21, trial_days), min(10, trial_days), 7)
    return Window(trial_days, trial_days, 0)  # at the trial's start


@dataclass(frozen=True)
class Due:
    notice_type: str
    occasion: str
    event_at: datetime
    window: Window
    facts: dict[str, Any]


def add_years(at: datetime, years: int) -> datetime:
    try:
        return at.replace(year=at.year + years)
    except ValueError:  # 29 February
        return at.replace(year=at.year + years, day=28)


class NoticeService:
    def __init__(self, engine: Engine, events: EventService, catalog: Catalog,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.events = events
        self.catalog = catalog
        self.clock = clock

    # -- price changes (NTC-04) ---------------------------------------------------------------

    def schedule_price_change(self, plan_id: str, to_version: int, effective_at: datetime,
                              from_version: int | None = None,
                              actor: Actor | None = None) -> dict[str, Any]:
        now = self.clock()
        target = self.catalog.get(plan_id, to_version)
        versions = [p for p in self.catalog.plans if p.id == plan_id]
        if target is None or not versions:
            raise NotFoundError(f"No plan version {plan_id}@{to_version}.", param="to_version")
        source = self.catalog.get(plan_id, from_version) if from_version is not None else \
            max((p for p in versions if p.version < to_version), key=lambda p: p.version,
                default=None)
        if source is None or source.version == to_version:
            raise InvalidRequestError(f"Name the version of {plan_id} whose subscribers move to "
                                      f"v{to_version} (from_version).", param="from_version")
        if source.terms.price is None or target.terms.price is None:
            raise InvalidRequestError("Both versions must be priced.", param="to_version")
        if effective_at.tzinfo is None:
            raise InvalidRequestError("effective_at needs a time zone.", param="effective_at")
        if effective_at - now < PRICE_CHANGE_LEAD:
            raise NoticeWindowError(
                f"NTC-04: a price change must be scheduled at least {PRICE_CHANGE_LEAD.days} "
                f"days ahead so that every subscriber gets notice ({PRICE}); "
                f"{day(effective_at)} is {max(0, (effective_at - now).days)} days away.",
                param="effective_at", rule="NTC-04")
        change_id = "pc_" + secrets.token_hex(10)
        values = {"change_id": change_id, "plan_id": plan_id, "from_version": source.version,
                  "to_version": to_version, "effective_at": effective_at, "created_at": now}
        with self.engine.begin() as conn:
            conn.execute(insert(PriceChange).values(**values))
            record(conn, actor, "price_change.schedule", target_type="price_change",
                   target_id=change_id, app_id=None,
                   before={"plan": plan_id, "version": source.version,
                           "price": _price(source)},
                   after={"plan": plan_id, "version": to_version, "price": _price(target),
                          "effective_at": effective_at})
        return {**values, "notice_from": effective_at - timedelta(days=PRICE.target),
                "old_price": _price(source), "new_price": _price(target)}

    def price_changes(self, limit: int = 100, starting_after: str | None = None
                      ) -> tuple[list[dict[str, Any]], bool]:
        """Scheduled price changes in the order they were made, a page at a time."""
        with self.engine.connect() as conn:
            query = select(PriceChange.__table__).order_by(PriceChange.id)
            if starting_after is not None:
                after = conn.execute(select(PriceChange.id).where(
                    PriceChange.change_id == starting_after)).scalar()
                if after is None:
                    raise unknown_cursor(starting_after)
                query = query.where(PriceChange.id > after)
            rows = conn.execute(query.limit(limit + 1)).all()
        page, more = trimmed(rows, limit)
        return [dict(r._mapping) for r in page], more

    # -- the run ------------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None,
            page: int = 500) -> list[dict[str, Any]]:
        """Send every notice that is due and was not sent; returns those sent. Subscriptions
        are read a page at a time (any number of them)."""
        now = self.clock()
        with self.engine.connect() as conn:
            changes = [c for c in conn.execute(select(PriceChange.__table__).where(
                PriceChange.effective_at > now)).all()
                if c.effective_at - timedelta(days=PRICE.target) <= now]
        sent: list[dict[str, Any]] = []
        after, seen = "", 0
        while True:
            with self.engine.connect() as conn:
                subs = subscriptions.page_of(conn, LIVE, after=after, limit=page)
                if not subs:
                    return sent
                ids = [s.id for s in subs]
                sent_keys = {tuple(r) for r in conn.execute(
                    select(Notice.subscription_id, Notice.notice_type, Notice.occasion).where(
                        Notice.subscription_id.in_(ids)))}
                started = {r.subscription_id: r.started_at for r in conn.execute(
                    select(Acknowledgment.subscription_id, Acknowledgment.started_at).where(
                        Acknowledgment.subscription_id.in_(ids)))}
            for sub in subs:
                seen += 1
                if progress is not None:
                    progress(seen)
                plan = self.catalog.get(sub.plan_id, sub.plan_version)
                if plan is None or plan.terms.price is None:
                    continue
                for due in self._due(sub, plan, changes, now, started.get(sub.id)):
                    if (sub.id, due.notice_type, due.occasion) not in sent_keys:
                        notice = self._send(sub, plan, due, now)
                        if notice is not None:
                            sent.append(notice)
            after = subs[-1].id

    def _due(self, sub: Any, plan: Plan, changes: list[Any], now: datetime,
             started: datetime | None) -> list[Due]:
        price = plan.terms.price
        assert price is not None
        due: list[Due] = []
        facts = {"amount": _price(plan), "interval": price.interval}
        end = sub.current_period_end
        if sub.cancel_at_period_end or end is None:
            return due  # nothing renews or converts: nothing to remind of
        trial_end = sub.trial_end
        if sub.status == "trialing" and trial_end is not None and trial_end > now:
            start = started or sub.current_period_start or sub.billing_anchor
            window = trial_window(max(0, round((trial_end - start) / DAY)))
            if trial_end - timedelta(days=window.target) <= now:
                due.append(Due("trial_ending", day(trial_end), trial_end, window,
                               {**facts, "first_charge_date": day(trial_end)}))
        if price.interval == "year" and end > now \
                and end - timedelta(days=RENEWAL.target) <= now:
            due.append(Due("renewal_upcoming", day(end), end, RENEWAL,
                           {**facts, "renews_at": day(end)}))
        # Anniversaries of the purchase (Stripe moves its anchor when the interval changes),
        # one reminder for each, keyed by its date.
        origin = started or sub.billing_anchor
        years = 1
        while add_years(origin, years) <= now:
            years += 1
        anniversary = add_years(origin, years)
        if anniversary - timedelta(days=ANNUAL.target) <= now:
            due.append(Due("annual_reminder", day(anniversary), anniversary, ANNUAL,
                           {**facts, "anniversary": day(anniversary)}))
        for change in changes:
            if (change.plan_id, change.from_version) == (sub.plan_id, sub.plan_version):
                new = self.catalog.get(change.plan_id, change.to_version)
                due.append(Due("price_change", change.change_id, change.effective_at,
                               PRICE, {**facts, "new_amount": _price(new) if new else None,
                                       "new_amount_minor": new.terms.price.amount
                                       if new and new.terms.price else None,
                                       "effective_at": day(change.effective_at)}))
        return due

    def _send(self, sub: Any, plan: Plan, due: Due, now: datetime) -> dict[str, Any] | None:
        before = due.event_at - now
        on_time = timedelta(days=due.window.latest) <= before \
            <= timedelta(days=due.window.earliest)
        notice_id, event_id = "ntc_" + secrets.token_hex(12), new_event_id()
        try:
            with self.engine.begin() as conn:
                ack = self._ack(conn, sub)
                jurisdiction = ack.jurisdiction if ack is not None else "STRICTEST"
                loc = i18n.pick(ack.locale if ack is not None else "en")
                how = (orjson.loads(ack.content).get("how_to_cancel") if ack is not None
                       else None) or i18n.gettext(loc, "account settings")
                user = conn.execute(select(EndUser.external_id).where(
                    EndUser.id == sub.end_user_id)).scalar_one()
                view = {"notice_id": notice_id, "notice_type": due.notice_type,
                        "user": user, "subscription": sub.id, "plan": plan.ref,
                        "plan_name": plan.name, "occasion": due.occasion,
                        "event_at": due.event_at, "jurisdiction": jurisdiction,
                        "window": str(due.window), "on_time": on_time, "sent_at": now,
                        "how_to_cancel": how, **due.facts,
                        "locale": loc, "text": _text(due, plan, how, loc)}
                view = jsonable(view)
                conn.execute(insert(Notice).values(
                    notice_id=notice_id, app_id=sub.app_id, end_user_id=sub.end_user_id,
                    subscription_id=sub.id, notice_type=due.notice_type,
                    occasion=due.occasion, event_at=due.event_at, jurisdiction=jurisdiction,
                    window=str(due.window), sent_at=now, on_time=on_time,
                    content=orjson.dumps(view).decode(), event_id=event_id,
                    retain_until=now + RETENTION))
                self.events.publish_in(conn, sub.app_id, "notice.sent", view,
                                       event_id=event_id)
        except IntegrityError:
            return None  # another run sent it at the same moment
        return view

    @staticmethod
    def _ack(conn: Connection, sub: Any) -> Any:
        return conn.execute(select(Acknowledgment.jurisdiction, Acknowledgment.content,
                                   Acknowledgment.locale).where(
            Acknowledgment.subscription_id == sub.id).order_by(
            Acknowledgment.id.desc()).limit(1)).first()

    def of_subscription(self, app_id: int, subscription_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Notice.content).where(
                Notice.app_id == app_id, Notice.subscription_id == subscription_id).order_by(
                Notice.id)).scalars().all()
        return [orjson.loads(r) for r in rows]


def _price(plan: Plan | None) -> str | None:
    if plan is None or plan.terms.price is None:
        return None
    return format_minor(plan.terms.price.amount, plan.terms.price.currency)


def _text(due: Due, plan: Plan, how: str, loc: str) -> str:
    """The notice in the subscriber's language (the one of the offer they took)."""
    def _(message: str, **values: Any) -> str:
        return i18n.gettext(loc, message, **values)

    f, name = due.facts, plan.name
    price = plan.terms.price
    assert price is not None
    per = _(f["interval"])
    amount = f["amount"] if loc == "en" else i18n.money(
        price.amount, price.currency, minor_exponent(price.currency), loc)

    def on(key: str) -> str:  # facts keep ISO dates; the text writes them as the language does
        value = f[key]
        return value if loc == "en" or not value else str(
            format_date(date.fromisoformat(value), "long", locale=loc))

    cancel = _("To cancel: {how}.", how=how)
    if due.notice_type == "trial_ending":
        text = _("Your free trial of {name} ends on {date}. Unless you cancel before then, "
                 "you will be charged {price} per {per}.", name=name,
                 date=on("first_charge_date"), price=amount, per=per)
    elif due.notice_type == "renewal_upcoming":
        text = _("Your {name} subscription renews on {date} for {price} per {per}.",
                 name=name, date=on("renews_at"), price=amount, per=per)
    elif due.notice_type == "annual_reminder":
        text = _("A yearly reminder: you subscribe to {name} at {price} per {per}, renewing "
                 "automatically.", name=name, price=amount, per=per)
    else:
        new = f.get("new_amount_minor")
        new_price = f["new_amount"] if loc == "en" or new is None else i18n.money(
            new, price.currency, minor_exponent(price.currency), loc)
        text = _("The price of {name} changes from {price} to {new_price} per {per} on "
                 "{date}.", name=name, price=amount, new_price=new_price, per=per,
                 date=on("effective_at"))
    return f"{text} {cancel}"
