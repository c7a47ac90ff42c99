"""Operator API of the scheduled jobs: what each did last and does next."""

from __future__ import annotations

from flask import Blueprint, Response

from core.auth import require_operator
from core.jobs import JobBoard
from core.openapi import documented
from core.schemas import JobListSchema
from core.web import current_principal, json_response, part

bp = Blueprint("jobs", __name__, url_prefix="/v1/admin")


@bp.get("/jobs")
@documented(summary="Every scheduled job (`meterlane worker`): its last run, outcome and "
            "error, next run, the worker running it now, whether it is overdue, and its "
            "latest runs (an operator-wide admin key)", response=JobListSchema, tag="admin")
def jobs() -> Response:
    require_operator(current_principal())
    return json_response(JobListSchema().dump({"jobs": part(JobBoard).status()}))
