"""The exact arithmetic of finance: pricing to the pico-dollar with cached reads, cache writes,
reasoning and a per-request fee; a GPU hour split over calls without losing a pico; revenue
spread over days; a GPU's hourly cost. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from core.config import ModelPrice
from core.costs import GpuCost
from finance.reports import parse_period, usd
from finance.rollup import allocate, spread
from metering.pricing import TokenUsage, cost_pico_usd

PRICE = ModelPrice(input=Decimal("3.00"), cached_input=Decimal("0.30"),
                   cache_write=Decimal("3.75"), output=Decimal("15.00"),
                   reasoning=Decimal("12.50"), request_fee=Decimal("0.0004"))


def test_a_call_is_priced_to_the_pico_dollar_with_every_kind_of_token() -> None:
    usage = TokenUsage(input_tokens=10_000, cached_input_tokens=6_000, cache_write_tokens=1_500,
                       output_tokens=2_000, reasoning_tokens=700)
    # by hand, in USD: 2,500 plain input at $3/1M, 6,000 cached at $0.30, 1,500 written at
    # $3.75, 1,300 output at $15, 700 reasoning at $12.50, and $0.0004 for the request
    expected = (Decimal(2_500) * Decimal("3.00") + Decimal(6_000) * Decimal("0.30")
                + Decimal(1_500) * Decimal("3.75") + Decimal(1_300) * Decimal("15.00")
                + Decimal(700) * Decimal("12.50")) / 10**6 + Decimal("0.0004")
    assert Decimal(cost_pico_usd(usage, PRICE)) / 10**12 == expected == Decimal("0.043575")
    # a cache write never makes input count twice, whatever a client reports
    odd = TokenUsage(input_tokens=100, cached_input_tokens=80, cache_write_tokens=500)
    assert cost_pico_usd(odd, PRICE) == (80 * 300_000 + 20 * 3_750_000 + 400_000_000)


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**9), min_size=1, max_size=60))
def test_an_hour_is_split_over_its_calls_without_losing_a_pico(total: int,
                                                               weights: list[int]) -> None:
    parts = allocate(total, weights)
    assert sum(parts) == total and all(p >= 0 for p in parts)
    whole = sum(weights)
    if whole:
        for part, w in zip(parts, weights, strict=True):  # each within one pico of its share
            assert abs(part * whole - total * w) < whole


@given(st.integers(-10**9, 10**9), st.integers(0, 86_400 * 400), st.integers(1, 86_400 * 400))
def test_revenue_spreads_over_its_days_exactly(amount: int, offset: int, length: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset)
    days = spread(amount, start, start + timedelta(seconds=length), start)
    assert sum(a for _, a in days) == amount
    assert [d for d, _ in days] == sorted({d for d, _ in days})


def test_a_gpu_hour_costs_hardware_power_and_hosting() -> None:
    cost = GpuCost(hardware_per_hour=Decimal("1.20"), power_watts=Decimal(700),
                   kwh_price=Decimal("0.15"), hosting_per_hour=Decimal("0.10"))
    assert cost.hourly_pico == 1_405_000_000_000  # 1.20 + 0.7 kWh x 0.15 + 0.10
    bought = GpuCost(hardware_per_hour=Decimal(30_000) / (36 * 730))
    assert bought.hourly_pico == 1_141_552_511_416  # 30,000 / (36 x 730 h), half up


def test_periods_and_amounts_are_read_and_shown_exactly() -> None:
    assert (parse_period("2026-02").days, parse_period("2028-02").days) == (28, 29)
    assert parse_period("2026-11-03..2026-11-09").days == 7
    assert usd(1_405_000_000_000) == "1.405" and usd(0) == "0.00" and usd(-5 * 10**10) == \
        "-0.05"


def test_a_csv_key_never_becomes_a_spreadsheet_formula() -> None:
    from finance.api import margins_csv

    body = {"rows": [{"key": "=HYPERLINK(\"http://x\")", "cost_usd": "1.00", "calls": 1,
                      "tokens": 2}, {"key": "pro", "cost_usd": "2.00", "calls": 1, "tokens": 2}],
            "totals": {"cost_usd": "3.00", "calls": 2, "tokens": 4}}
    lines = margins_csv(body).splitlines()
    assert lines[1].startswith("\"'=HYPERLINK") and lines[2].startswith("pro,")


def test_a_cost_limit_charges_at_the_price_it_is_given() -> None:
    from core.config import ModelConfig
    from metering.leases import charges
    from plans.catalog import parse_plans

    [plan] = parse_plans(({"id": "p", "default": True, "limits": [
        {"metric": "cost_usd", "window": "day", "amount": "5.00"}]},), "",
        frozenset({"m"}), frozenset({"standard"})).plans
    unpriced = ModelConfig("m", "up", "m")  # priced only in the finance catalog
    assert charges(plan.limits[0], unpriced, 1000, 1) == (None, 0)  # no price: not limited
    assert charges(plan.limits[0], unpriced, 1000, 1, 1, PRICE) == (
        1000 * 3_000_000, 15_000_000)  # input at $3/1M, each output token at most $15/1M


def test_minor_units_follow_the_currency() -> None:
    from finance.reports import Reports
    from plans.terms import format_minor

    assert (format_minor(12345, "kwd"), format_minor(500, "jpy"), format_minor(-5, "eur")) == (
        "12.345 KWD", "500 JPY", "-0.05 EUR")
    reports = Reports.__new__(Reports)
    reports.rates = {"kwd": Decimal("3.25"), "jpy": Decimal("0.0067"), "usd": Decimal(1)}
    assert reports.to_pico(12345, "kwd") == 40_121_250_000_000  # 12.345 x 3.25 USD
    assert reports.to_pico(500, "JPY") == 3_350_000_000_000     # 500 x 0.0067 USD
    assert reports.to_pico(1, "eur") is None                    # no rate: not converted
