"""Pricing is exact: integer pico-USD, cached and reasoning tokens never billed twice."""

from decimal import Decimal

import pytest

from core.config import ModelPrice
from metering.pricing import TokenUsage, cost_pico_usd, format_usd, pico_to_usd

MINI = ModelPrice(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60"))


def test_cost_of_plain_call_is_exact() -> None:
    usage = TokenUsage(input_tokens=1000, output_tokens=500)
    # 1000 * 0.15/1e6 + 500 * 0.60/1e6 = 0.00015 + 0.0003 = 0.00045 USD
    assert pico_to_usd(cost_pico_usd(usage, MINI)) == Decimal("0.00045")


def test_cached_tokens_are_part_of_input_billed_once_at_cached_rate() -> None:
    usage = TokenUsage(input_tokens=1000, cached_input_tokens=400, output_tokens=0)
    expected = Decimal(600) * Decimal("0.15") / 10**6 + Decimal(400) * Decimal("0.075") / 10**6
    assert pico_to_usd(cost_pico_usd(usage, MINI)) == expected


def test_reasoning_tokens_are_part_of_output() -> None:
    price = ModelPrice(input=Decimal("1.10"), output=Decimal("4.40"), reasoning=Decimal("8.80"))
    usage = TokenUsage(input_tokens=10, output_tokens=100, reasoning_tokens=60)
    expected = (Decimal(10) * Decimal("1.10") + Decimal(40) * Decimal("4.40")
                + Decimal(60) * Decimal("8.80")) / 10**6
    assert pico_to_usd(cost_pico_usd(usage, price)) == expected


def test_missing_cached_rate_falls_back_to_input_rate() -> None:
    price = ModelPrice(input=Decimal("2"), output=Decimal("8"))
    with_cache = TokenUsage(input_tokens=100, cached_input_tokens=100)
    assert cost_pico_usd(with_cache, price) == cost_pico_usd(TokenUsage(input_tokens=100), price)


def test_one_token_at_the_smallest_price_is_not_rounded_away() -> None:
    price = ModelPrice(input=Decimal("0.000001"), output=Decimal("0"))
    assert cost_pico_usd(TokenUsage(input_tokens=1), price) == 1


def test_price_with_too_many_decimals_is_refused() -> None:
    price = ModelPrice(input=Decimal("0.0000001"), output=Decimal("0"))
    with pytest.raises(ValueError, match="6 decimal places"):
        cost_pico_usd(TokenUsage(input_tokens=1), price)


@pytest.mark.parametrize(("pico", "text"), [(0, "0"), (450_000_000, "0.00045"),
                                            (10**12, "1"), (None, None), (1, "0.000000000001")])
def test_format_usd(pico: int | None, text: str | None) -> None:
    assert format_usd(pico) == text
