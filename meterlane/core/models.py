"""Tenancy models: apps (tenants), their end users, and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from meterlane.core.db import Base, BigIntPK, utcnow


class App(Base):
    __tablename__ = "apps"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EndUser(Base):
    __tablename__ = "end_users"
    __table_args__ = (UniqueConstraint("app_id", "external_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    external_id: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    app_id: Mapped[int | None] = mapped_column(ForeignKey("apps.id"), index=True)
    end_user_id: Mapped[int | None] = mapped_column(ForeignKey("end_users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
