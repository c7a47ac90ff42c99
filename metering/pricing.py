"""Pricing: one exact function from token counts and a model price to integer pico-USD."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from core.config import ModelPrice

PICO_PER_USD = 10**12
# What the ledger and the reports hold: 64-bit pico-USD (about 9.2 million USD for one
# call). A cost past it is refused at the edge, or recorded as unpriced with a note: never
# wrapped, never cut.
MAX_PICO = 2**63 - 1
# A price is USD per 1M tokens, so pico-USD per token = price * 10**6 (exact: <= 6 decimals).
_PICO_PER_TOKEN = 10**6


@dataclass(frozen=True)
class TokenUsage:
    """Token counts as OpenAI reports them: cached are part of input, reasoning part of output."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # written to a prompt cache (Anthropic): part of input too

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def rate_of(price: Decimal) -> int:
    """pico-USD per token."""
    return _rate(price)


def output_rate(price: ModelPrice) -> int:
    """The most an output token can cost (reasoning tokens are output tokens)."""
    reasoning = price.reasoning if price.reasoning is not None else price.output
    return max(_rate(price.output), _rate(reasoning))


def _rate(price: Decimal) -> int:
    value = price * _PICO_PER_TOKEN
    if value != value.to_integral_value():
        raise ValueError(f"price {price} has more than 6 decimal places")
    return int(value)


def cost_pico_usd(usage: TokenUsage, price: ModelPrice) -> int:
    """Cost in pico-USD. Cached reads and cache writes are part of the input and billed at
    their own rates, never twice; reasoning tokens are billed at the reasoning rate when one
    is set, else as the output they are; a per-request fee is added once."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    cached_rate = _rate(price.cached_input if price.cached_input is not None else price.input)
    write_rate = _rate(price.cache_write if price.cache_write is not None else price.input)
    reasoning_rate = _rate(price.reasoning if price.reasoning is not None else price.output)
    fee = _fee(price.request_fee) if price.request_fee is not None else 0
    return ((usage.input_tokens - cached - written) * _rate(price.input)
            + cached * cached_rate + written * write_rate
            + (usage.output_tokens - reasoning) * _rate(price.output)
            + reasoning * reasoning_rate + fee)


def _fee(usd: Decimal) -> int:
    """A per-request fee in pico-USD (USD with at most 12 decimals)."""
    value = usd * PICO_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"request fee {usd} has more than 12 decimal places")
    return int(value)


def cost_or_none(usage: TokenUsage, price: ModelPrice | None) -> int | None:
    """The cost, or None for a model without a price (never $0)."""
    return cost_pico_usd(usage, price) if price is not None else None


def pico_to_usd(pico: int) -> Decimal:
    """Exact USD as a Decimal (12 decimal places)."""
    return Decimal(pico).scaleb(-12)


def format_usd(pico: int | None) -> str | None:
    if pico is None:
        return None
    return f"{pico_to_usd(pico):.12f}".rstrip("0").rstrip(".") if pico else "0"
