"""What running a model costs beyond a cloud price list: a local GPU upstream's hourly cost
model, and the exchange rates finance reports convert revenue with. Exact decimals only."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any


class ConfigError(Exception):
    """The configuration is invalid; the message says which setting and why."""

PICO = Decimal(10**12)
HOURS_PER_MONTH = Decimal(730)  # 8,760 hours a year / 12: how a purchase is amortized
GPU_FIELDS = ("hardware_per_hour", "purchase_price", "amortization_months", "power_watts",
              "kwh_price", "hosting_per_hour", "shadow_model")


@dataclass(frozen=True)
class GpuCost:
    """A local upstream's cost per hour, whether it serves calls or idles (fully loaded):
    hardware (rented per hour, or a purchase amortized over months), power (watts x price per
    kWh) and hosting. `shadow_model`: the cloud model whose price the same tokens are compared
    with (the savings)."""

    hardware_per_hour: Decimal = Decimal(0)
    power_watts: Decimal = Decimal(0)
    kwh_price: Decimal = Decimal(0)
    hosting_per_hour: Decimal = Decimal(0)
    shadow_model: str | None = None

    @property
    def hourly_pico(self) -> int:
        """pico-USD per hour, rounded half up once (the hour is the unit allocated)."""
        usd = (self.hardware_per_hour + self.power_watts / 1000 * self.kwh_price
               + self.hosting_per_hour)
        return int((usd * PICO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# The most each part of a GPU's cost may be: an hour's cost stays far inside 64-bit pico-USD.
CEILINGS = {"hardware_per_hour": Decimal(100_000), "hosting_per_hour": Decimal(100_000),
            "power_watts": Decimal(10_000_000), "kwh_price": Decimal(10),
            "purchase_price": Decimal(1_000_000_000)}


def _decimal(table: dict[str, Any], key: str, where: str) -> Decimal:
    value = table.get(key, 0)
    try:
        amount = Decimal(str(value)) if isinstance(value, (str, int, Decimal)) \
            and not isinstance(value, bool) else None
    except ArithmeticError:
        amount = None
    ceiling = CEILINGS.get(key, Decimal(1_000_000_000))
    if amount is None or not amount.is_finite() or not 0 <= amount <= ceiling:
        raise ConfigError(f"{where}: cost.{key} must be a decimal from 0 to {ceiling:,}, "
                          f"got {value!r}")
    return amount


def parse_gpu_cost(table: Any, where: str) -> GpuCost:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: cost must be a table like {{ hardware_per_hour = \"1.20\", "
                          "power_watts = 700, kwh_price = \"0.15\" }")
    unknown = sorted(set(table) - set(GPU_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown cost fields {unknown}; expected "
                          f"{', '.join(GPU_FIELDS)}")
    hardware = _decimal(table, "hardware_per_hour", where)
    if "purchase_price" in table:
        if "hardware_per_hour" in table:
            raise ConfigError(f"{where}: give hardware_per_hour or purchase_price, not both")
        months = table.get("amortization_months")
        if not isinstance(months, int) or isinstance(months, bool) or not 1 <= months <= 240:
            raise ConfigError(f"{where}: purchase_price needs amortization_months (1-240)")
        hardware = _decimal(table, "purchase_price", where) / (months * HOURS_PER_MONTH)
    shadow = table.get("shadow_model")
    if shadow is not None and (not isinstance(shadow, str) or not shadow):
        raise ConfigError(f"{where}: cost.shadow_model must be a model name")
    return GpuCost(hardware_per_hour=hardware, power_watts=_decimal(table, "power_watts", where),
                   kwh_price=_decimal(table, "kwh_price", where),
                   hosting_per_hour=_decimal(table, "hosting_per_hour", where),
                   shadow_model=shadow)


def parse_finance(table: Any) -> dict[str, Any]:
    """[finance] usd_per = { eur = "1.08" }: what one unit of a currency is worth in USD, to
    convert revenue (costs are USD). A currency without a rate is reported, not converted."""
    if not isinstance(table, dict):
        raise ConfigError("[finance] must be a table")
    unknown = sorted(set(table) - {"usd_per"})
    if unknown:
        raise ConfigError(f"[finance]: unknown settings {unknown}; expected usd_per")
    rates = table.get("usd_per", {})
    if not isinstance(rates, dict):
        raise ConfigError("[finance]: usd_per must be a table like { eur = \"1.08\" }")
    out = {"usd": Decimal(1)}
    for currency, value in rates.items():
        if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
            raise ConfigError(f"[finance]: {currency!r} is not a currency code")
        rate = _decimal({"r": value}, "r", f"[finance] usd_per.{currency}")
        if rate <= 0:
            raise ConfigError(f"[finance]: usd_per.{currency} must be more than 0")
        out[currency.lower()] = rate
    return {"finance_usd_per": tuple(sorted(out.items()))}
