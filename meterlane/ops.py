"""Operations routes: liveness, readiness, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from marshmallow import Schema, fields
from sqlalchemy import text

from meterlane.core.errors import ServiceUnavailableError
from meterlane.core.openapi import build_spec, documented
from meterlane.core.web import wiring

bp = Blueprint("ops", __name__)


class StatusSchema(Schema):
    status = fields.String()
    checks = fields.Dict(keys=fields.String(), values=fields.String())


@bp.get("/healthz")
@documented(summary="The process answers", response=StatusSchema, tag="ops")
def healthz() -> Response:
    return wiring().json({"status": "ok"})


@bp.get("/readyz")
@documented(summary="The database (and Redis, when configured) are reachable",
            response=StatusSchema, tag="ops")
def readyz() -> Response:
    checks: dict[str, str] = {}
    w = wiring()
    try:
        with w.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["database"] = f"error: {exc.__class__.__name__}"
    if w.redis is not None:
        try:
            w.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["redis"] = f"error: {exc.__class__.__name__}"
    if any(v != "ok" for v in checks.values()):
        raise ServiceUnavailableError("Not ready: " + ", ".join(
            f"{k} {v}" for k, v in checks.items()), checks=checks)
    return wiring().json(StatusSchema().dump({"status": "ok", "checks": checks}))


@bp.get("/metrics")
@documented(summary="Prometheus metrics", tag="ops", content_type="text/plain")
def metrics() -> Response:
    return Response(wiring().metrics.render(), mimetype="text/plain; version=0.0.4")


@bp.get("/openapi.json")
@documented(summary="This document", tag="ops")
def openapi() -> Response:
    return wiring().json(build_spec(current_app))
