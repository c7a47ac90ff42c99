"""The usage ledger: one append-only row per model call."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from meterlane.core.db import Base, BigIntPK


class UsageEvent(Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("app_id", "idempotency_key"),
        Index("ix_usage_events_app_created", "app_id", "created_at"),
        Index("ix_usage_events_app_user_created", "app_id", "end_user_id", "created_at"),
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
