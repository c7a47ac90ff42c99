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
