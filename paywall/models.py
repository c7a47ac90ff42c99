"""Paywall events: a quota reached or a threshold of it crossed, one per threshold and period."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, BigIntPK


class PaywallEvent(Base):
    __tablename__ = "paywall_events"
    __table_args__ = (Index("ix_paywall_events_app_user_created", "app_id", "end_user_id",
                            "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)  # = the outbox event's id
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    trigger: Mapped[str] = mapped_column(String(24))  # limit_reached | threshold_crossed
    threshold: Mapped[int | None]  # percent, for threshold_crossed
    limit_id: Mapped[str] = mapped_column(String(80))
    used: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    resets_at: Mapped[datetime | None]
    plan_id: Mapped[str] = mapped_column(String(64))
    plan_version: Mapped[int]
    # One event per (user, limit, period, trigger, threshold): repeats return the first.
    dedupe_key: Mapped[str] = mapped_column(String(300), unique=True)
    body: Mapped[str] = mapped_column(Text)  # the event's data, as its webhook carries it
    created_at: Mapped[datetime]


class OfferVersion(Base):
    """An offer version: immutable content (from a draft and the plan it sells), hashed;
    served and sold only once published."""

    __tablename__ = "offer_versions"
    __table_args__ = (UniqueConstraint("app_id", "offer_id", "version"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    offer_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))  # draft | published
    content: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    published_at: Mapped[datetime | None]


class ConsentRecord(Base):
    """What an end user was shown and agreed to (CNS-02): written once, never changed; kept
    for the retention period (REC-01: at least 3 years, and a year past the subscription)."""

    __tablename__ = "consent_records"
    __table_args__ = (Index("ix_consent_records_app_user", "app_id", "end_user_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    consent_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    type: Mapped[str] = mapped_column(String(24))
    offer_id: Mapped[str] = mapped_column(String(64))
    offer_version: Mapped[int]
    content_hash: Mapped[str] = mapped_column(String(64))
    plan_id: Mapped[str | None] = mapped_column(String(64))
    disclosure_text: Mapped[str] = mapped_column(Text)  # the snapshot shown
    disclosure_sha256: Mapped[str] = mapped_column(String(64))
    rendered_price: Mapped[str] = mapped_column(String(64))
    cta_label: Mapped[str] = mapped_column(String(200))
    locale: Mapped[str] = mapped_column(String(16))
    platform: Mapped[str] = mapped_column(String(16))
    jurisdiction: Mapped[str] = mapped_column(String(16))
    render_manifest: Mapped[str] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(500))
    captured_at: Mapped[datetime]
    retain_until: Mapped[datetime]


class ConsentUse(Base):
    """The checkout a consent was used for: once (a second use is a replay)."""

    __tablename__ = "consent_uses"

    consent_id: Mapped[str] = mapped_column(ForeignKey("consent_records.consent_id"),
                                            primary_key=True)
    checkout_session_id: Mapped[str | None] = mapped_column(String(255))
    used_at: Mapped[datetime]


class CancellationRecord(Base):
    """A cancellation as confirmed to the user (CXL-01, CXL-05): written once, never changed."""

    __tablename__ = "cancellation_records"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    cancellation_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    # More than one when a cancel was undone (Stripe's portal, a plan change) and made again.
    subscription_id: Mapped[str] = mapped_column(String(255), index=True)
    plan: Mapped[str] = mapped_column(String(80))
    mode: Mapped[str] = mapped_column(String(24))  # at_period_end
    channel: Mapped[str] = mapped_column(String(32))
    steps_count: Mapped[int]
    requested_at: Mapped[datetime]
    effective_at: Mapped[datetime | None]
    confirmation_event_id: Mapped[str] = mapped_column(String(40))
    retain_until: Mapped[datetime]


class Acknowledgment(Base):
    """What a subscriber was told right after checkout (ACK-01): terms, how to cancel, the
    first charge, the EU withdrawal right; one per checkout, never changed."""

    __tablename__ = "acknowledgments"
    __table_args__ = (Index("ix_acknowledgments_app_user", "app_id", "end_user_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    ack_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    checkout_session_id: Mapped[str] = mapped_column(String(255), unique=True)
    subscription_id: Mapped[str | None] = mapped_column(String(255), index=True)
    consent_id: Mapped[str | None] = mapped_column(String(40))
    plan: Mapped[str] = mapped_column(String(80))
    jurisdiction: Mapped[str] = mapped_column(String(16))
    locale: Mapped[str] = mapped_column(String(16))
    # sha256 of the lowercased e-mail Stripe collected: who may cancel without a login (CXL-03)
    email_sha256: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime]
    withdrawal_deadline: Mapped[datetime | None]  # EU/UK: 14 days (CXL-04)
    content: Mapped[str] = mapped_column(Text)  # JSON: the acknowledgment as sent
    event_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime]
    retain_until: Mapped[datetime]


class Notice(Base):
    """A reminder sent to a subscriber (NTC-01 ... NTC-04): one per subscription, type and
    occasion (the trial's end, a renewal, a subscription year, a price change)."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("subscription_id", "notice_type", "occasion"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    notice_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), index=True)
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    subscription_id: Mapped[str] = mapped_column(String(255))
    notice_type: Mapped[str] = mapped_column(String(24))
    occasion: Mapped[str] = mapped_column(String(80))  # e.g. the date of the event noticed
    event_at: Mapped[datetime]                          # the trial end, renewal, change ...
    jurisdiction: Mapped[str] = mapped_column(String(16))
    window: Mapped[str] = mapped_column(String(80))     # "7-21 days before" (as applied)
    sent_at: Mapped[datetime]
    on_time: Mapped[bool]                               # inside the window when sent
    content: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str] = mapped_column(String(40))
    retain_until: Mapped[datetime]


class PriceChange(Base):
    """A plan version's subscribers moving to a new price on a date: scheduled only with the
    notice period ahead (NTC-04)."""

    __tablename__ = "price_changes"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    change_id: Mapped[str] = mapped_column(String(40), unique=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int]
    to_version: Mapped[int]
    effective_at: Mapped[datetime]
    created_at: Mapped[datetime]


class Withdrawal(Base):
    """An EU/UK withdrawal from a subscription within its withdrawal period (CXL-04), with
    the refund as computed: never changed."""

    __tablename__ = "withdrawals"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    withdrawal_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    subscription_id: Mapped[str] = mapped_column(String(255), unique=True)
    requested_at: Mapped[datetime]
    deadline: Mapped[datetime]
    early_start: Mapped[bool]  # the user asked to start at once (CNS-05): pro-rata refund
    days_used: Mapped[int]
    term_days: Mapped[int]
    paid: Mapped[int] = mapped_column(BigInteger)    # minor units
    refund: Mapped[int] = mapped_column(BigInteger)  # minor units
    currency: Mapped[str] = mapped_column(String(3))
    refund_ref: Mapped[str | None] = mapped_column(String(255))  # Stripe's re_... (,-joined)
    event_id: Mapped[str] = mapped_column(String(40))
    retain_until: Mapped[datetime]
    # pending: recorded, Stripe not yet done (a retry resumes it); done: ended and refunded
    state: Mapped[str] = mapped_column(String(16), server_default="done")
    refund_plan: Mapped[str] = mapped_column(Text, server_default="[]")  # [[invoice, amount]]


class CancelDeclaration(Base):
    """A cancellation declared through the public German button flow (CXL-03), as received,
    matched to a subscription or not: its receipt is confirmed either way."""

    __tablename__ = "cancel_declarations"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    declaration_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), index=True)
    received_at: Mapped[datetime]
    name: Mapped[str] = mapped_column(String(200))
    email_sha256: Mapped[str] = mapped_column(String(64))
    contract_ref: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # ordinary | extraordinary
    reason: Mapped[str | None] = mapped_column(String(1000))
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    cancellation_id: Mapped[str | None] = mapped_column(String(40))
    # received | cancelled | unmatched | throttled | failed: what came of it
    outcome: Mapped[str] = mapped_column(String(16), server_default="received")
    event_id: Mapped[str] = mapped_column(String(40))
    retain_until: Mapped[datetime]
