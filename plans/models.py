"""Which plan an end user is on (no row: the app's default plan), and the plan versions that
were published (immutable from then on)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, BigIntPK


class EndUserPlan(Base):
    __tablename__ = "end_user_plans"

    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), index=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    # The version the user bought; None (rows from before versions): the plan's current one.
    plan_version: Mapped[int | None]
    # The start of the billing cycle: "cycle" windows run monthly from here.
    anchored_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class PlanVersion(Base):
    """A published plan version: its content (what a subscriber buys) may not change."""

    __tablename__ = "plan_versions"

    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)  # JSON, as terms.content_of
    published_at: Mapped[datetime]


class CreditGrant(Base):
    """Credits given to an end user: a top-up, a promotion, a refund or rolled-over allowance.
    Append-only: the balance is derived from grants, burns and expiry."""

    __tablename__ = "credit_grants"
    __table_args__ = (UniqueConstraint("app_id", "external_id"),
                      Index("ix_credit_grants_user", "end_user_id", "granted_at"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    amount: Mapped[int] = mapped_column(BigInteger)  # credits
    source: Mapped[str] = mapped_column(String(16))  # topup | promotion | refund | rollover
    priority: Mapped[int]                             # lower burns first
    granted_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    external_id: Mapped[str] = mapped_column(String(200))  # idempotency key of the grant
    note: Mapped[str | None] = mapped_column(String(500))


class CreditBurn(Base):
    """Credits of a grant spent by one usage event (past the plan's allowance)."""

    __tablename__ = "credit_burns"
    __table_args__ = (UniqueConstraint("usage_event_id", "grant_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("credit_grants.id"), index=True)
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    usage_event_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    burned_at: Mapped[datetime]  # when the usage happened


class CreditOverage(Base):
    """Credits one usage event used past the allowance and every credit: billed as overage."""

    __tablename__ = "credit_overages"

    usage_event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), index=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    plan_version: Mapped[int]
    credits: Mapped[int] = mapped_column(BigInteger)
    happened_at: Mapped[datetime]
    reported_at: Mapped[datetime | None]  # sent to Stripe as a meter event
    # the first send's start: a send that may have landed and is older than Stripe's
    # de-duplication window is checked against Stripe's meter before it is sent again
    report_attempted_at: Mapped[datetime | None]
    # why Stripe refused it (e.g. older than Stripe accepts); not sent again until cleared
    report_error: Mapped[str | None] = mapped_column(String(500))
    # its usage event was voided or amended: never sent if not sent yet; if it was (or may
    # have been), a Stripe meter event adjustment cancels it (cancel_sent_at), or why not
    cancelled_at: Mapped[datetime | None]
    cancel_sent_at: Mapped[datetime | None]
    cancel_error: Mapped[str | None] = mapped_column(String(500))


class CreditUse(Base):
    """How one usage event was accounted: its credits, of which from the plan's allowance and
    not charged at all (before the plan began, or past every credit on a plan without
    overage); the rest are its burns and its overage. credits = allowance + burned + overage
    + uncharged, checked by `billing reconcile` against the raw ledger. Written in the
    transaction that clears the event's mark. NULL figures: accounted before these rows
    were kept (migration 0019)."""

    __tablename__ = "credit_uses"
    __table_args__ = (Index("ix_credit_uses_user", "end_user_id", "happened_at"),)

    usage_event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    tokens: Mapped[int] = mapped_column(BigInteger)  # input + output, as the ledger had them
    credits: Mapped[int | None] = mapped_column(BigInteger)
    allowance: Mapped[int | None] = mapped_column(BigInteger)
    uncharged: Mapped[int | None] = mapped_column(BigInteger)
    happened_at: Mapped[datetime]
    # a correction's: the event it voids or amends (its figures are then the difference)
    supersedes_id: Mapped[int | None] = mapped_column(BigInteger)


class CreditCursor(Base):
    """How far an end user's usage has been accounted against allowance and credits."""

    __tablename__ = "credit_cursors"

    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    cycle_start: Mapped[datetime | None]  # the billing cycle cycle_used belongs to
    cycle_used: Mapped[int] = mapped_column(BigInteger)  # credits used in that cycle


class StripeEvent(Base):
    """A Stripe webhook event, stored by its id before it is handled: a replay is found here
    and not applied twice; an event whose handling failed is handled when Stripe retries."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]          # when Stripe created it (orders subscription states)
    payload: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime]
    handled_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(String(500))


class StripeCustomer(Base):
    """The Stripe customer of an end user."""

    __tablename__ = "stripe_customers"

    customer_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), unique=True)


class Subscription(Base):
    """An end user's subscription as Stripe last told it (newest event wins)."""

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # Stripe's sub_...
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), index=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    plan_version: Mapped[int]
    status: Mapped[str] = mapped_column(String(32))  # trialing | active | past_due | canceled ...
    billing_anchor: Mapped[datetime]
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool]
    trial_end: Mapped[datetime | None]
    last_event_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class RevenueEvent(Base):
    """Money that moved for an end user: an invoice paid, a credit pack bought, a refund
    (negative). Keyed by Stripe's object id, so a replayed event records nothing new."""

    __tablename__ = "revenue_events"
    __table_args__ = (UniqueConstraint("source_id", "kind"),
                      Index("ix_revenue_events_app_occurred", "app_id", "occurred_at"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    source_id: Mapped[str] = mapped_column(String(100))  # in_..., cs_..., ch_...
    kind: Mapped[str] = mapped_column(String(32))  # invoice_paid | credit_purchase | refund
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    amount: Mapped[int] = mapped_column(BigInteger)  # minor units; refunds negative
    currency: Mapped[str] = mapped_column(String(3))
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    occurred_at: Mapped[datetime]
    plan_id: Mapped[str | None] = mapped_column(String(64))  # what an invoice paid for


class AllowanceOffset(Base):
    """Allowance credits used in a cycle before an upgrade that does not carry usage over:
    the new plan's allowance starts from here, as if that usage had not happened."""

    __tablename__ = "allowance_offsets"

    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), primary_key=True)
    cycle_start: Mapped[datetime] = mapped_column(primary_key=True)
    credits: Mapped[int] = mapped_column(BigInteger)


class MeterOverage(Base):
    """What one meter event used of a [[meters]] meter past the plan's allowance of it: billed
    as overage (a Stripe meter event per meter, keyed by the meter event's id)."""

    __tablename__ = "meter_overages"
    __table_args__ = (Index("ix_meter_overages_user_happened", "end_user_id", "happened_at"),)

    meter_event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    meter_id: Mapped[str] = mapped_column(String(64))
    plan_id: Mapped[str] = mapped_column(String(64))
    plan_version: Mapped[int]
    units_micro: Mapped[int] = mapped_column(BigInteger)  # of the meter, past the allowance
    # the plan version's price then: minor units of `currency` per unit of the meter
    price_minor: Mapped[str] = mapped_column(String(40))
    currency: Mapped[str] = mapped_column(String(3))
    # when it counts: in the billing cycle it was counted in (a late event's: the cycle's
    # start), never in an invoice already closed
    happened_at: Mapped[datetime]
    reported_at: Mapped[datetime | None]
    report_attempted_at: Mapped[datetime | None]  # as CreditOverage's
    report_error: Mapped[str | None] = mapped_column(String(500))


class MeterCycleUse(Base):
    """How much of a meter an end user used in a billing cycle (against the plan's allowance
    of it); the meter's events are counted here in the transaction that records them."""

    __tablename__ = "meter_cycle_uses"

    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), primary_key=True)
    meter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    cycle_start: Mapped[datetime] = mapped_column(primary_key=True)
    used_micro: Mapped[int] = mapped_column(BigInteger)
