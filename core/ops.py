"""Operations routes: liveness, readiness, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

from flask import Blueprint, Response, current_app, render_template, request
from marshmallow import Schema, fields

from core.errors import AuthenticationError, ServiceUnavailableError
from core.metrics import Metrics, scrape_allowed
from core.openapi import build_spec, documented
from core.parts import Readiness
from core.web import config, json_response, part

bp = Blueprint("ops", __name__, template_folder="templates")

LINKS = [
    {"rel": "openapi", "href": "/openapi.json", "title": "API document",
     "about": "OpenAPI 3.1, every route"},
    {"rel": "finance", "href": "/finance", "title": "Finance dashboard",
     "about": "cost per active user and margins (a finance key)"},
    {"rel": "health", "href": "/healthz", "title": "Health", "about": "the process answers"},
    {"rel": "ready", "href": "/readyz", "title": "Readiness",
     "about": "the database and Redis answer"},
    {"rel": "metrics", "href": "/metrics", "title": "Metrics", "about": "Prometheus"},
]


def version() -> str:
    try:
        return installed_version("meterlane")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class StatusSchema(Schema):
    status = fields.String()
    checks = fields.Dict(keys=fields.String(), values=fields.String())
    gauges = fields.Dict(keys=fields.String(), values=fields.Integer(allow_none=True),
                         metadata={"description": "e.g. ledger_quarantined: usage records "
                                   "the database refused, kept for an operator"})


@bp.get("/")
@documented(summary="What this service is and where to go: a page for a browser, JSON "
            "otherwise", tag="ops")
def index() -> Response | str:
    wants = request.accept_mimetypes.best_match(["application/json", "text/html"])
    if wants == "text/html" and request.accept_mimetypes["text/html"] \
            > request.accept_mimetypes["application/json"]:
        return render_template("index.html", version=version(), links=LINKS,
                               base=request.host_url.rstrip("/"))
    return json_response({"service": "meterlane", "version": version(),
                          "links": {link["rel"]: link["href"] for link in LINKS}})


@bp.get("/healthz")
@documented(summary="The process answers", response=StatusSchema, tag="ops")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
@documented(summary="The database (and Redis, when configured) answer and the ledger "
            "writer runs (503 otherwise); check `jobs` reports scheduled jobs that are "
            "overdue without failing it; with gauges such as the ledger's quarantine",
            response=StatusSchema, tag="ops")
def readyz() -> Response:
    readiness = part(Readiness)
    checks, gauges = readiness.run(), readiness.gauge_values()
    failing = readiness.failing(checks)
    if failing:
        raise ServiceUnavailableError("Not ready: " + ", ".join(
            f"{k} {v}" for k, v in failing.items()), checks=checks, gauges=gauges)
    return json_response(StatusSchema().dump({"status": "ok", "checks": checks,
                                              "gauges": gauges}))


@bp.get("/metrics")
@documented(summary="Prometheus metrics (a Bearer key when MLANE_METRICS_KEY is set)",
            tag="ops", content_type="text/plain")
def metrics() -> Response:
    if not scrape_allowed(config().metrics_key, request.headers.get("Authorization")):
        raise AuthenticationError("/metrics takes the key set in MLANE_METRICS_KEY: "
                                  "Authorization: Bearer <key>.",
                                  headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    body = part(Metrics).render() + part(Readiness).prometheus()
    return Response(body, mimetype="text/plain; version=0.0.4")


@bp.get("/openapi.json")
@documented(summary="This document", tag="ops")
def openapi() -> Response:
    return json_response(build_spec(current_app))
