"""Tenancy models: apps (tenants), their end users, and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, BigIntPK, utcnow


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
    description: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # written at most once a minute per key and worker, off the request (core.auth)
    last_used_at: Mapped[datetime | None]
    rotated_from: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))


class AuditEvent(Base):
    """One change made with an admin or app key (or the CLI): append-only, refused by a
    database trigger on UPDATE and DELETE (migration 0021). The actor is a key's public id,
    never its secret; before and after are small JSON objects of the changed fields."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_app_id_id", "app_id", "id"),
                      Index("ix_audit_events_action_id", "action", "id"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    at: Mapped[datetime]
    actor_key_id: Mapped[str | None] = mapped_column(String(32))
    actor_role: Mapped[str] = mapped_column(String(16))
    actor_name: Mapped[str | None] = mapped_column(String(100))
    app_id: Mapped[int | None]
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(300))
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(64))


# -- the outbox and webhooks (core.events) ------------------------------------------


class WebhookEndpoint(Base):
    """Where an app receives its events. The secret signs them, so it is kept as is (an
    HMAC key cannot be stored hashed); it is shown to the app only when created or rotated."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), unique=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]


class OutboxEvent(Base):
    """An event for the app, written in the transaction of the change it reports."""

    __tablename__ = "outbox_events"
    __table_args__ = (Index("ix_outbox_events_app_created", "app_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # the JSON the webhook sends, byte for byte
    created_at: Mapped[datetime]


class WebhookDelivery(Base):
    """One event to one endpoint: pending (due at next_attempt_at), delivered or failed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
                      Index("ix_webhook_deliveries_app", "app_id", "id"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("outbox_events.event_id"))
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int]
    next_attempt_at: Mapped[datetime]
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class WebhookAttempt(Base):
    """The delivery log: every attempt, its answer and how long it took."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempt: Mapped[int]
    at: Mapped[datetime]
    status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int]


# -- scheduled jobs (core.jobs) ----------------------------------------------------------


class JobState(Base):
    """One scheduled job: when it runs next, how its last run ended, which worker runs it now
    (running_on, refreshed by heartbeat_at) and how many runs ended each way."""

    __tablename__ = "job_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    interval_seconds: Mapped[int]
    next_run_at: Mapped[datetime]
    last_started_at: Mapped[datetime | None]
    last_finished_at: Mapped[datetime | None]
    last_outcome: Mapped[str | None] = mapped_column(String(16))  # ok | error | lost
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_success_at: Mapped[datetime | None]
    last_duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    runs_ok: Mapped[int] = mapped_column(BigInteger)
    runs_error: Mapped[int] = mapped_column(BigInteger)
    runs_lost: Mapped[int] = mapped_column(BigInteger)
    running_on: Mapped[str | None] = mapped_column(String(200))  # worker "host:pid"
    heartbeat_at: Mapped[datetime | None]
    # the last run came from a long-running worker (not `worker --once`): only then is the
    # job expected at its next run, and late when it does not come
    scheduled: Mapped[bool]


class JobRun(Base):
    """One run of a job (the latest few per job are kept): running, ok, error, or lost (its
    worker stopped mid-run and another took the job over)."""

    __tablename__ = "job_runs"
    __table_args__ = (Index("ix_job_runs_job", "job", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    job: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(String(500))


# -- idempotent retries (core.idempotency) -------------------------------------------------


class IdempotencyRecord(Base):
    """One Idempotency-Key of one caller (its scope: app, role, end user): which request holds
    it (in_progress, until lapses_at), then the answer a retry gets (done; body None when it
    was not kept: a stream, a secret, too large). Deleted once expires_at is past."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("scope", "key"),
                      Index("ix_idempotency_records_expires_at", "expires_at"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    scope: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of method, path, query, body
    request_id: Mapped[str] = mapped_column(String(40))  # the request that holds (held) it
    state: Mapped[str] = mapped_column(String(16))  # in_progress | done
    status: Mapped[int | None]
    headers: Mapped[str | None] = mapped_column(Text)  # JSON object of the headers replayed
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    lapses_at: Mapped[datetime]  # an in_progress record older than this: its request died
    expires_at: Mapped[datetime]
