"""A call refused because the database could not serve it still gets its ledger row (one row
per call, refused or not): written by the ledger, which spools it while the database is
away."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from core.auth import Principal, Role, validate_user_id
from core.config import Config
from core.errors import DATABASE_UNAVAILABLE, DomainError
from core.tenancy import TenancyService
from metering.records import CallRecord
from metering.service import MeteringService

log = logging.getLogger(__name__)


def record_database_refusal(metering: MeteringService, tenancy: TenancyService, config: Config,
                            *, principal: Principal, request_id: str,
                            user_header: str | None, endpoint: str, body: dict[str, Any],
                            started: float, at: datetime, exc: Exception) -> None:
    """The row of a call refused because the database could not serve it (one row per
    call, refused or not): written by the ledger, which spools it while the database is
    away. An end user this process has not seen yet has no id to write: the row is
    spooled with their name, and the replay creates the user as the call would have. A
    call whose key could not be checked names no app: it has no row (the log has it)."""
    app_id = principal.app_id
    log.error("database unavailable before request %s was forwarded: %s",
              request_id, exc)
    if app_id is None:
        return
    external: str | None = None
    end_user_id = principal.end_user_id if principal.role == Role.USER else None
    if end_user_id is None:
        named = user_header if user_header is not None else body.get("user")
        try:
            external = validate_user_id(named)
        except DomainError:
            return  # no end user: the call was a 400 had the database answered
        end_user_id = tenancy.known_end_user(app_id, external)
    name = body.get("model")
    model = config.model(name) if isinstance(name, str) else None
    price = metering.price_of(model, at) if model is not None else None
    record = CallRecord(
        app_id=app_id, end_user_id=end_user_id or 0, request_id=request_id,
        idempotency_key=request_id, endpoint=endpoint,
        requested_model=name if isinstance(name, str) and name else "(none)",
        upstream=model.upstream if model else None,
        upstream_model=model.upstream_model if model else None,
        stream=body.get("stream") is True, input_tokens=0, cached_input_tokens=0,
        output_tokens=0, reasoning_tokens=0, usage_source="none",
        cost_pico_usd=0 if price is not None else None, priced=price is not None,
        status="database_unavailable", http_status=503,
        error=DATABASE_UNAVAILABLE.detail,
        latency_ms=int((time.perf_counter() - started) * 1000), ttft_ms=None, created_at=at)
    try:
        if end_user_id is not None:
            metering.ledger.record(record)
        else:
            metering.ledger.spool_for_user(record.row(), external or "")
    except Exception:  # noqa: BLE001 - the answer is a 503 either way
        log.exception("recording refused request %s failed", request_id)
