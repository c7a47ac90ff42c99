"""Which plan an end user is on (no row: the app's default plan), and the plan versions that
were published (immutable from then on)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from meterlane.core.db import Base


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
