"""The usage ledger: one append-only row per model call."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, BigIntPK


class UsageEvent(Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("app_id", "idempotency_key"),
        Index("ix_usage_events_app_created", "app_id", "created_at"),
        Index("ix_usage_events_app_user_created", "app_id", "end_user_id", "created_at"),
        Index("ix_usage_events_created", "created_at"),  # finance roll-ups read a day at a time
        Index("ix_usage_events_limits_pending", "id", postgresql_where=text("limits_pending"),
              sqlite_where=text("limits_pending")),
        Index("ix_usage_events_credits_pending", "end_user_id", "id",
              postgresql_where=text("credits_pending"), sqlite_where=text("credits_pending")),
        Index("ix_usage_events_supersedes", "supersedes_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    request_id: Mapped[str] = mapped_column(String(40))
    idempotency_key: Mapped[str] = mapped_column(String(300))
    endpoint: Mapped[str] = mapped_column(String(32))
    requested_model: Mapped[str] = mapped_column(String(200))
    upstream: Mapped[str | None] = mapped_column(String(100))
    upstream_model: Mapped[str | None] = mapped_column(String(200))
    stream: Mapped[bool]
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    # "reported" by the upstream, "counted" with the tokenizer, "none" when no tokens flowed
    usage_source: Mapped[str] = mapped_column(String(16))
    # Integer pico-USD (1 USD = 10**12); NULL when the model has no price (then priced=False).
    cost_pico_usd: Mapped[int | None] = mapped_column(BigInteger)
    priced: Mapped[bool]
    status: Mapped[str] = mapped_column(String(32))
    http_status: Mapped[int]
    error: Mapped[str | None] = mapped_column(String(500))
    latency_ms: Mapped[int]
    ttft_ms: Mapped[int | None]
    created_at: Mapped[datetime]
    # True for a call let through while the limit store was down ("fail open"): its usage is
    # counted into the limits once the store is back.
    limits_pending: Mapped[bool] = mapped_column(default=False, server_default="0")
    # A call the router served: the alias asked for, why this model (difficulty, skipped and
    # failed candidates), and what its tokens would have cost on the alias's most expensive
    # model the plan allows (NULL when no candidate has a price).
    route_alias: Mapped[str | None] = mapped_column(String(100))
    route_reason: Mapped[str | None] = mapped_column(String(500))
    baseline_cost_pico_usd: Mapped[int | None] = mapped_column(BigInteger)
    # Finance: tokens written to a prompt cache, and the plan the user was on at the call.
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    plan_id: Mapped[str | None] = mapped_column(String(64))
    # Why usage was counted instead of taken as reported (an upstream's malformed or
    # out-of-range usage), or why a call has no cost although its model has a price.
    usage_note: Mapped[str | None] = mapped_column(String(200))
    # Not yet accounted against the plan's allowance, credits and overage: set when the call
    # is recorded on a plan with an allowance, cleared in the transaction that accounts it.
    # Accounting reads these marks, not an id cursor: a row that commits late (after a
    # higher id was accounted) is still found.
    credits_pending: Mapped[bool] = mapped_column(default=False, server_default="0")
    # A correction (metering.corrections): the row it supersedes, which then stops counting
    # (the row itself is never changed), and how: "void" (this row counts nothing) or
    # "amend" (this row counts instead). NULL on every ordinary row. Unique: an event is
    # corrected at most once.
    supersedes_id: Mapped[int | None] = mapped_column(BigInteger)
    correction: Mapped[str | None] = mapped_column(String(8))


class LimitCounter(Base):
    """A limit counter of the SQL limit store (the Redis store keeps these in Redis)."""

    __tablename__ = "limit_counters"

    tag: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[int] = mapped_column(BigInteger)
    expires_ms: Mapped[int] = mapped_column(BigInteger)


class LimitLease(Base):
    """A reservation held against a tag's counters, or the remembered answer of a settle,
    release or commit (kept an hour so a repeat gets the same answer)."""

    __tablename__ = "limit_leases"
    __table_args__ = (Index("ix_limit_leases_tag_state_expires", "tag", "state", "expires_ms"),)

    tag: Mapped[str] = mapped_column(String(100), primary_key=True)
    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    expires_ms: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(Text)


class LimitRefusal(Base):
    """A call the limits refused: what the paywall acts on."""

    __tablename__ = "limit_refusals"
    __table_args__ = (Index("ix_limit_refusals_app_user_created", "app_id", "end_user_id",
                            "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    request_id: Mapped[str] = mapped_column(String(40))
    plan_id: Mapped[str] = mapped_column(String(64))
    limit_id: Mapped[str] = mapped_column(String(80))
    metric: Mapped[str] = mapped_column(String(80))  # "meter:<id>" for a meter's limit
    window: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))  # quota_exceeded | rate_limited
    used: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    resets_at: Mapped[datetime | None]
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class QuarantinedRecord(Base):
    """A usage record the database refused (or that broke the ledger's own rules): kept with
    the reason, never retried on its own, so it can neither block start-up nor stop the
    writer. `meterlane ledger quarantine list|retry|export` acts on these."""

    __tablename__ = "ledger_quarantine"
    __table_args__ = (Index("ix_ledger_quarantine_resolved", "resolved_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    created_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))  # writer | replay
    reason: Mapped[str] = mapped_column(String(500))
    request_id: Mapped[str | None] = mapped_column(String(40))
    # the record as JSON text (numbers past 64 bits as strings; escapes for odd characters)
    payload: Mapped[str] = mapped_column(Text)
    resolved_at: Mapped[datetime | None]
    resolution: Mapped[str | None] = mapped_column(String(32))  # written | duplicate


class MeterEvent(Base):
    """One event of a [[meters]] meter (a web search, an image, audio seconds): append-only,
    once per idempotency key of its app, priced when it was received."""

    __tablename__ = "meter_events"
    __table_args__ = (
        UniqueConstraint("app_id", "idempotency_key"),
        Index("ix_meter_events_app_user_meter_occurred", "app_id", "end_user_id", "meter_id",
              "occurred_at"),
        Index("ix_meter_events_received", "received_at"),  # finance reads a day at a time
        Index("ix_meter_events_supersedes", "supersedes_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"))
    meter_id: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(300))
    # The event's value in micro-units of the meter (10**6 per unit): exact on every backend.
    value_micro: Mapped[int] = mapped_column(BigInteger)
    # unique_count meters: the value counted once per window
    unique_key: Mapped[str | None] = mapped_column(String(300))
    # Integer pico-USD at the meter's price when received; NULL when the meter has no price.
    cost_pico_usd: Mapped[int | None] = mapped_column(BigInteger)
    plan_id: Mapped[str | None] = mapped_column(String(64))  # the user's plan when received
    data: Mapped[str | None] = mapped_column(Text)  # the event's data as JSON text
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime]
    # a correction (metering.meter_corrections): the event it voids or amends, and how
    supersedes_id: Mapped[int | None] = mapped_column(BigInteger)
    correction: Mapped[str | None] = mapped_column(String(8))
