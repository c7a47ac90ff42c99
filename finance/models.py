"""Finance: the price catalog (effective-dated model prices), and the roll-ups reports read:
usage and cost per (app, end user, plan, model, day), revenue per day, each local GPU hour."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base


class ModelPriceVersion(Base):
    """A model's price from a moment on (until the next version). Rates are pico-USD per
    token (USD per 1M tokens x 10^6: exact for 6 decimals); the fee is pico-USD per call.
    Versions are never changed: a new price is a new row."""

    __tablename__ = "model_prices"
    __table_args__ = (UniqueConstraint("model", "effective_from"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    effective_from: Mapped[datetime]
    input: Mapped[int] = mapped_column(BigInteger)
    cached_input: Mapped[int | None] = mapped_column(BigInteger)
    cache_write: Mapped[int | None] = mapped_column(BigInteger)
    output: Mapped[int] = mapped_column(BigInteger)
    reasoning: Mapped[int | None] = mapped_column(BigInteger)
    request_fee: Mapped[int | None] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(200))  # api | import:<file> | seed
    created_at: Mapped[datetime]


class UsageDaily(Base):
    """Usage and cost of one end user on one plan and model in one UTC day."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_app_day", "app_id", "day"),)

    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), primary_key=True)
    end_user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    cloud_cost_pico: Mapped[int] = mapped_column(BigInteger)   # priced calls, list price
    local_cost_pico: Mapped[int] = mapped_column(BigInteger)   # allocated GPU hours
    shadow_cost_pico: Mapped[int] = mapped_column(BigInteger)  # local calls at cloud price
    unpriced_calls: Mapped[int] = mapped_column(BigInteger)    # neither priced nor local


class RevenueDaily(Base):
    """Revenue recognized on one day: an invoice spread over the days it pays for, in the
    currency's minor units (largest remainder: the days sum to the invoice)."""

    __tablename__ = "revenue_daily"
    __table_args__ = (Index("ix_revenue_daily_app_day", "app_id", "day"),)

    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), primary_key=True)
    end_user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class GpuHour(Base):
    """One hour of a local upstream: what it cost, and what was allocated to calls (idle
    hours with no call keep their cost unallocated: shown as idle)."""

    __tablename__ = "gpu_hours"

    upstream: Mapped[str] = mapped_column(String(100), primary_key=True)
    hour: Mapped[datetime] = mapped_column(primary_key=True)
    cost_pico: Mapped[int] = mapped_column(BigInteger)
    allocated_pico: Mapped[int] = mapped_column(BigInteger)
    calls: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)


class RollupState(Base):
    """How far the roll-ups have read the ledger (by usage event id) and the revenue."""

    __tablename__ = "rollup_state"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


class MeterPriceVersion(Base):
    """A version of a [[meters]] meter's price per unit, in force from effective_from (the
    config's price holds before the first)."""

    __tablename__ = "meter_price_versions"
    __table_args__ = (UniqueConstraint("meter_id", "effective_from"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    meter_id: Mapped[str] = mapped_column(String(64))
    effective_from: Mapped[datetime]
    price_pico_per_unit: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
