"""Which plan an end user is on (no row: the app's default plan)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from meterlane.core.db import Base


class EndUserPlan(Base):
    __tablename__ = "end_user_plans"

    end_user_id: Mapped[int] = mapped_column(ForeignKey("end_users.id"), primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), index=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    # The start of the billing cycle: "cycle" windows run monthly from here.
    anchored_at: Mapped[datetime]
    updated_at: Mapped[datetime]
