"""Finance API: margin reports for finance and admin keys (read only), the price catalog
(admins change it), and the /finance dashboard page."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from flask import Blueprint, Response

from core.auth import Role, require_operator, require_role
from core.errors import InvalidRequestError, PermissionDeniedError
from core.meters import parse_unit_price
from core.openapi import documented
from core.pagination import page_of
from core.web import (
    app_in_scope,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    query_args,
    request_bytes,
)
from finance.prices import parse_price
from finance.reports import cents
from finance.schemas import (
    ImportQuerySchema,
    LeastProfitableQuerySchema,
    LocalSchema,
    MarginsQuerySchema,
    MarginsSchema,
    MeterPriceListSchema,
    MeterPriceRequestSchema,
    MeterPriceSchema,
    MeterPricesQuerySchema,
    PeriodQuerySchema,
    PriceListSchema,
    PriceRequestSchema,
    PriceSchema,
    PricesQuerySchema,
    SummarySchema,
)
from finance.service import FinanceService

bp = Blueprint("finance", __name__, url_prefix="/v1")
page_bp = Blueprint("finance_page", __name__)
DASHBOARD = Path(__file__).with_name("dashboard.html")
READERS = (Role.FINANCE, Role.ADMIN)


def _reader() -> int:
    principal = current_principal()
    require_role(principal, *READERS)
    return app_in_scope(principal)


@bp.get("/finance/summary")
@documented(summary="A period's revenue, inference cost (cloud, local), gross margin, active "
            "users and cost per active user", query=PeriodQuerySchema, response=SummarySchema,
            tag="finance")
def summary() -> Response:
    app_id = _reader()
    args = PeriodQuerySchema().load(query_args())
    at = part(FinanceService).fresh()
    body = part(FinanceService).reports.summary(app_id, args["period"])
    return json_response(SummarySchema().dump({**body, "from_": body["from"],
                                               "rolled_up_at": at}))


@bp.get("/finance/margins")
@documented(summary="Revenue, cost and margin grouped by plan, model, user or day (JSON or "
            "CSV); order=margin puts the least profitable first", query=MarginsQuerySchema,
            response=MarginsSchema, tag="finance")
def margins() -> Response:
    app_id = _reader()
    args = MarginsQuerySchema().load(query_args())
    at = part(FinanceService).fresh()
    body = part(FinanceService).reports.margins(app_id, args["period"], args["group_by"],
                                            order=args["order"], limit=args.get("limit"),
                                            starting_after=args.get("starting_after"))
    if args["format"] == "csv":
        return Response(margins_csv(body), mimetype="text/csv", headers={
            "Content-Disposition": f"attachment; filename=margins-{args['group_by']}-"
                                   f"{args['period']}.csv"})
    return json_response(MarginsSchema().dump({**body, "rolled_up_at": at}))


def _cents(row: dict[str, Any]) -> dict[str, Any]:
    """Money to the cent, as a spreadsheet shows it (the JSON report keeps exact values)."""
    return {k: cents(v) if k.endswith("_usd") and v is not None else v
            for k, v in row.items()}


def margins_csv(body: dict[str, object]) -> str:
    out = io.StringIO()
    columns = ["key", "revenue_usd", "cost_usd", "cloud_cost_usd", "local_cost_usd",
               "margin_usd", "margin_percent", "active_users", "calls", "tokens"]
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    rows = body["rows"]
    assert isinstance(rows, list)
    # a key is a name someone chose (a model, a user id): never a formula in a spreadsheet
    writer.writerows({**_cents(r), "key": "'" + r["key"]
                      if str(r["key"])[:1] in tuple("=+-@\t\r") else r["key"]} for r in rows)
    totals = body["totals"]
    assert isinstance(totals, dict)
    writer.writerow({"key": "TOTAL", **_cents(totals)})
    return out.getvalue()


@bp.get("/finance/users/least-profitable")
@documented(summary="The end users who lose the most money in a period",
            query=LeastProfitableQuerySchema, response=MarginsSchema, tag="finance")
def least_profitable() -> Response:
    app_id = _reader()
    args = LeastProfitableQuerySchema().load(query_args())
    at = part(FinanceService).fresh()
    body = part(FinanceService).reports.margins(app_id, args["period"], "user", order="margin",
                                            limit=args["limit"],
                                            starting_after=args.get("starting_after"))
    return json_response(MarginsSchema().dump({**body, "rolled_up_at": at}))


@bp.get("/finance/local")
@documented(summary="Local GPUs against cloud prices: each upstream's full cost (idle hours "
            "too), what its calls were allocated, and their cost at the shadow model's price",
            query=PeriodQuerySchema, response=LocalSchema, tag="finance")
def local() -> Response:
    principal = current_principal()
    require_role(principal, *READERS)
    if principal.app_id is not None:  # a GPU serves every app: its figures are the operator's
        raise PermissionDeniedError(
            "Local GPU figures cover every app: ask with an operator-wide key. An app's own "
            "local cost, shadow cost and savings are in /v1/finance/summary.")
    args = PeriodQuerySchema().load(query_args())
    at = part(FinanceService).fresh()
    body = part(FinanceService).reports.local_vs_cloud(args["period"])
    return json_response(LocalSchema().dump({**body, "rolled_up_at": at}))


@bp.get("/prices")
@documented(summary="The price catalog: every version of each model's price",
            query=PricesQuerySchema, response=PriceListSchema, tag="finance")
def list_prices() -> Response:
    require_role(current_principal(), Role.ADMIN, Role.FINANCE, Role.APP)
    args = PricesQuerySchema().load(query_args())
    versions, more = page_of(part(FinanceService).prices.versions(args.get("model")),
                             lambda v: v.id, args.get("starting_after"), args["limit"])
    return json_response(PriceListSchema().dump({"data": [v.as_dict() for v in versions],
                                                 "has_more": more}))


def _admin() -> None:
    principal = current_principal()
    if principal.role == Role.FINANCE:
        raise PermissionDeniedError("A finance key reads reports; it cannot change prices "
                                    "(use an admin key).")
    require_operator(principal)  # the catalog prices every app's calls


@bp.post("/prices")
@documented(summary="A new price version of a model, from effective_from (never in the past)",
            body=PriceRequestSchema, response=PriceSchema, status=201, tag="finance")
def add_price() -> Response:
    _admin()
    args = PriceRequestSchema().load(json_body())
    version = part(FinanceService).prices.add(args["model"], args.get("effective_from"),
                                          parse_price(args), "api", current_actor())
    return json_response(PriceSchema().dump(version.as_dict()), status=201)


@bp.get("/prices/meters")
@documented(summary="Every version of each meter's price per unit ([[meters]])",
            query=MeterPricesQuerySchema, response=MeterPriceListSchema, tag="finance")
def list_meter_prices() -> Response:
    require_role(current_principal(), Role.ADMIN, Role.FINANCE, Role.APP)
    args = MeterPricesQuerySchema().load(query_args())
    versions, more = page_of(part(FinanceService).meter_prices.versions(args.get("meter")),
                             lambda v: v.id, args.get("starting_after"), args["limit"])
    return json_response(MeterPriceListSchema().dump(
        {"data": [v.as_dict() for v in versions], "has_more": more}))


@bp.post("/prices/meters")
@documented(summary="A new price per unit of a meter, from effective_from (never in the "
            "past)", body=MeterPriceRequestSchema, response=MeterPriceSchema, status=201,
            tag="finance")
def add_meter_price() -> Response:
    _admin()
    args = MeterPriceRequestSchema().load(json_body())
    try:
        price = parse_unit_price(args["price"])
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="price") from exc
    version = part(FinanceService).meter_prices.add(
        args["meter"], args.get("effective_from"), price, current_actor())
    return json_response(MeterPriceSchema().dump(version.as_dict()), status=201)


@bp.post("/prices/import")
@documented(summary="Import a price sheet (JSON or CSV): all its rows or none",
            query=ImportQuerySchema, response=PriceListSchema, status=201, tag="finance")
def import_prices() -> Response:
    _admin()
    args = ImportQuerySchema().load(query_args())
    try:
        text = request_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("The price sheet is not UTF-8 text.") from exc
    versions = part(FinanceService).prices.import_sheet(text, args["format"], "import",
                                                        current_actor())
    return json_response(PriceListSchema().dump({"data": [v.as_dict() for v in versions],
                                                 "has_more": False}), status=201)


@page_bp.get("/finance")
@documented(summary="The finance dashboard (give it a finance key: /finance#key=...)",
            tag="finance", content_type="text/html")
def dashboard() -> Response:
    resp = Response(DASHBOARD.read_bytes(), mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = ("default-src 'none'; script-src 'unsafe-inline';"
                                               " style-src 'unsafe-inline'; connect-src 'self'")
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp
