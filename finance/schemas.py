"""Finance API shapes (HTTP edge only)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from core.pagination import has_more_field, limit_field, starting_after_field
from core.schemas import RequestSchema, Timestamp
from finance.reports import GROUPS


class PeriodQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    period = fields.String(required=True, validate=validate.Length(max=40), metadata={
        "description": "2026-11 (a month), 2026-11-03 (a day) or 2026-11-03..2026-11-09"})
    app = fields.String(metadata={"description": "App name (operator-wide keys only)"})


class MarginsQuerySchema(PeriodQuerySchema):
    group_by = fields.String(required=True, validate=validate.OneOf(GROUPS))
    format = fields.String(load_default="json", validate=validate.OneOf(["json", "csv"]))
    order = fields.String(load_default="key", validate=validate.OneOf(["key", "margin"]),
                          metadata={"description": "margin: least profitable first"})
    limit = fields.Integer(validate=validate.Range(min=1, max=100_000), metadata={
        "description": "Rows on this page (default: every row); `has_more` says whether "
                       "another follows"})
    starting_after = starting_after_field()


class LeastProfitableQuerySchema(PeriodQuerySchema):
    limit = limit_field(default=10, maximum=1000)
    starting_after = starting_after_field()


class SummarySchema(Schema):
    period = fields.String()
    from_ = fields.String(data_key="from")
    to = fields.String(metadata={"description": "The day after the period's last"})
    is_partial = fields.Boolean(  # (Schema has its own `partial`)
        attribute="partial", data_key="partial",
        metadata={"description": "The period runs past today: revenue (earned day by day) "
                  "and cost are counted to today"})
    through = fields.String(metadata={"description": "The last day counted"})
    revenue_usd = fields.String(allow_none=True, metadata={
        "description": "Invoices paid (spread over the days they pay for) and meter overage "
                       "billed"})
    meter_revenue_usd = fields.String(allow_none=True, metadata={
        "description": "Of revenue_usd: overage billed for [[meters]] meters past the "
                       "plans' allowances, at each plan version's price"})
    meter_revenues = fields.List(fields.Dict(), metadata={
        "description": "Per meter with overage in the period: revenue_usd"})
    inference_cost_usd = fields.String(allow_none=True, metadata={
        "description": "Model calls' cost (cloud and local)"})
    meter_cost_usd = fields.String(allow_none=True, metadata={
        "description": "Custom meters' cost ([[meters]] prices)"})
    total_cost_usd = fields.String(allow_none=True, metadata={
        "description": "Inference and meters: what the gross margin is net of"})
    meter_costs = fields.List(fields.Dict(), metadata={
        "description": "Per meter with events in the period: events and cost"})
    cloud_cost_usd = fields.String(allow_none=True)
    local_cost_usd = fields.String(allow_none=True)
    local_shadow_cost_usd = fields.String(allow_none=True)
    local_savings_usd = fields.String(allow_none=True)
    gross_margin_usd = fields.String(allow_none=True)
    gross_margin_percent = fields.String(allow_none=True)
    inference_cost_percent_of_revenue = fields.String(allow_none=True)
    active_users_monthly = fields.Integer()
    active_users_daily_average = fields.String()
    cost_per_active_user_usd = fields.String(allow_none=True)
    revenue_per_active_user_usd = fields.String(allow_none=True)
    calls = fields.Integer()
    tokens = fields.Integer()
    revenue_unconverted = fields.List(fields.Dict())
    rolled_up_at = fields.String(allow_none=True)


class MarginRowSchema(Schema):
    key = fields.String()
    revenue_usd = fields.String(allow_none=True)
    cost_usd = fields.String(allow_none=True)
    cloud_cost_usd = fields.String(allow_none=True)
    local_cost_usd = fields.String(allow_none=True)
    meter_cost_usd = fields.String(allow_none=True, metadata={
        "description": "Custom meters' cost (in cost_usd); by model, a meter is a row "
                       "\"meter:<id>\""})
    meter_revenue_usd = fields.String(allow_none=True, metadata={
        "description": "Meter overage billed (in revenue_usd); null by model"})
    margin_usd = fields.String(allow_none=True)
    margin_percent = fields.String(allow_none=True)
    active_users = fields.Integer()
    calls = fields.Integer()
    tokens = fields.Integer()


class MarginsSchema(Schema):
    period = fields.String()
    group_by = fields.String()
    order = fields.String()
    rows = fields.List(fields.Nested(MarginRowSchema))
    has_more = has_more_field()
    totals = fields.Dict(metadata={"description": "The sums of this page's rows"})
    revenue_unconverted = fields.List(fields.Dict())
    note = fields.String(allow_none=True)
    rolled_up_at = fields.String(allow_none=True)


class LocalSchema(Schema):
    period = fields.String()
    upstreams = fields.List(fields.Dict())
    shadow_cost_usd = fields.String(allow_none=True)
    local_cost_usd = fields.String(allow_none=True)
    savings_usd = fields.String(allow_none=True)
    savings_allocated_usd = fields.String(allow_none=True)
    rolled_up_at = fields.String(allow_none=True)


class PriceRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    model = fields.String(required=True, validate=validate.Length(min=1, max=200))
    effective_from = Timestamp(metadata={"description": "Default: now"})
    input = fields.String(required=True, metadata={"description": "USD per 1M tokens"})
    output = fields.String(required=True)
    cached_input = fields.String()
    cache_write = fields.String()
    reasoning = fields.String()
    request_fee = fields.String(metadata={"description": "USD per call"})


class PriceSchema(Schema):
    id = fields.String(metadata={"description": "model@YYYYMMDDTHHMMSSZ: a list's cursor"})
    model = fields.String()
    effective_from = Timestamp()
    source = fields.String()
    input = fields.String(allow_none=True)
    cached_input = fields.String(allow_none=True)
    cache_write = fields.String(allow_none=True)
    output = fields.String(allow_none=True)
    reasoning = fields.String(allow_none=True)
    request_fee = fields.String(allow_none=True)


class PriceListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(PriceSchema))
    has_more = has_more_field()


class PricesQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    model = fields.String(validate=validate.Length(max=200))
    limit = limit_field()
    starting_after = starting_after_field()


class ImportQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    format = fields.String(load_default="json", validate=validate.OneOf(["json", "csv"]))


class MeterPriceRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    meter = fields.String(required=True, validate=validate.Length(min=1, max=64))
    effective_from = Timestamp(metadata={"description": "Default: as soon as every worker "
                                         "knows it; never in the past"})
    price = fields.String(required=True, metadata={"description": "USD per unit, a decimal "
                                                   "string (at most 6 decimals)"})


class MeterPriceSchema(Schema):
    id = fields.String()
    object = fields.Constant("meter_price")
    meter = fields.String()
    effective_from = Timestamp()
    price = fields.String(metadata={"description": "USD per unit"})
    source = fields.String(metadata={"description": "config or api"})


class MeterPriceListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(MeterPriceSchema))
    has_more = has_more_field()


class MeterPricesQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    meter = fields.String(validate=validate.Length(max=64))
    limit = limit_field()
    starting_after = starting_after_field()
