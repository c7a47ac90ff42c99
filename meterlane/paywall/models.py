"""Paywall events: a quota reached or a threshold of it crossed, one per threshold and period."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from meterlane.core.db import Base, BigIntPK


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
