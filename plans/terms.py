"""A plan's commercial terms: price, trial, model tiers, the billing allowance, overage or a
hard stop, credit multipliers and rollover; and the content hash that makes a published plan
version immutable.

Money is integer minor units of the plan's currency (2000 = 20.00 USD), never a float."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.config import ConfigError
from core.meters import METER_SCALE, MeterConfig, parse_unit_price, parse_value

INTERVALS = ("month", "year")
MAX_MINOR = 10**12          # a price or cap above 10 billion in major units is a typo
MAX_CREDITS = 10**15        # as the limits engine's token amounts
MAX_MULTIPLIER = 10**6
MAX_TRIAL_DAYS = 730
TERM_KEYS = {"version", "price", "trial_days", "tiers", "allowance", "overage",
             "credit_multipliers", "rollover_cap", "upgrade_carries_usage", "retired",
             "meters"}
MAX_METER_INCLUDED = 9 * 10**9 * METER_SCALE  # micro-units, as a meter limit's amount
MAX_METERED_PRICES = 8  # + the plan's price and its token overage: Stripe's 10 lookup keys

Fail = Callable[[str, Any, str], ConfigError]


@dataclass(frozen=True)
class Price:
    amount: int        # minor units per interval
    currency: str      # ISO 4217, lowercase as Stripe writes it
    interval: str      # month | year


@dataclass(frozen=True)
class Overage:
    """Usage past the allowance (and past any credits) billed per million credits, up to a
    spend cap per billing cycle; past the cap, calls stop as on a plan without overage."""

    price_per_1m: int  # minor units per 1,000,000 credits
    spend_cap: int     # minor units per billing cycle

    @property
    def headroom_credits(self) -> int:
        """Credits the spend cap buys."""
        return self.spend_cap * 1_000_000 // self.price_per_1m if self.price_per_1m else 0


@dataclass(frozen=True)
class MeterAllowance:
    """What a plan includes of a [[meters]] meter per billing cycle, and what it charges past
    that: `overage_price` minor units of the plan's currency per unit of the meter, or None
    (a hard stop at the allowance)."""

    meter: str
    included: int                     # micro-units of the meter per billing cycle
    overage_price: Decimal | None     # minor units per unit (exact; "0.5" = half a cent)

    def charge(self, units_micro: int) -> Decimal:
        """Minor units for `units_micro` of overage, exact (never rounded here)."""
        assert self.overage_price is not None
        return self.overage_price * units_micro / METER_SCALE


@dataclass(frozen=True)
class Terms:
    version: int = 1
    price: Price | None = None            # None: a free plan
    trial_days: int = 0
    tiers: tuple[str, ...] | None = None  # model tiers it may call; None: every tier
    allowance: int | None = None          # credits per billing cycle (monthly from the anchor)
    overage: Overage | None = None        # None: a hard stop at the allowance (and credits)
    credit_multipliers: dict[str, int] = field(default_factory=dict)
    rollover_cap: int = 0                 # unused allowance carried over as credits, at most
    upgrade_carries_usage: bool = True    # on an upgrade, usage so far counts on the new plan
    retired: bool = False                 # sold no more; its subscribers keep it
    meters: tuple[MeterAllowance, ...] = ()  # allowances of [[meters]] meters per cycle

    def meter(self, meter_id: str) -> MeterAllowance | None:
        return next((m for m in self.meters if m.meter == meter_id), None)

    def metered_price_keys(self, ref: str) -> list[str]:
        """Lookup keys of the metered Stripe prices a subscription to this version carries:
        token overage, then each meter's overage."""
        return ([f"{ref}:overage"] if self.overage else []) + [
            meter_price_key(ref, m.meter) for m in self.meters if m.overage_price is not None]

    def credits_per_token(self, tier: str) -> int:
        return self.credit_multipliers.get(tier, 1)

    def allows_tier(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers


def meter_price_key(ref: str, meter_id: str) -> str:
    """The lookup key of a plan version's metered price of a meter's overage: "pro@2:meter:x"."""
    return f"{ref}:meter:{meter_id}"


def parse_terms(table: dict[str, Any], fail: Fail, tiers_known: frozenset[str] | None,
                meters_known: dict[str, MeterConfig] | None = None) -> Terms:
    version = table.get("version", 1)
    if not _is_int(version) or not 1 <= version <= 10**6:
        raise fail("version", version, "version must be a whole number from 1")
    price = _price(table.get("price"), fail) if "price" in table else None
    trial = table.get("trial_days", 0)
    if not _is_int(trial) or not 0 <= trial <= MAX_TRIAL_DAYS:
        raise fail("trial_days", trial, f"trial_days must be 0 to {MAX_TRIAL_DAYS}")
    if trial and price is None:
        raise fail("trial_days", trial, "a trial needs a price: a free plan has nothing to try")
    tiers = _tiers(table.get("tiers"), fail, tiers_known) if "tiers" in table else None
    allowance = table.get("allowance")
    if allowance is not None and (not _is_int(allowance) or not 1 <= allowance <= MAX_CREDITS):
        raise fail("allowance", allowance, f"allowance must be a whole number of credits from "
                   f"1 to {MAX_CREDITS:,}")
    overage = _overage(table.get("overage"), fail) if "overage" in table else None
    if overage is not None and (price is None or allowance is None):
        raise fail("overage", table.get("overage"), "overage needs a price and an allowance "
                   "to go past")
    multipliers = _multipliers(table.get("credit_multipliers", {}), fail, tiers_known)
    rollover = table.get("rollover_cap", 0)
    if not _is_int(rollover) or not 0 <= rollover <= MAX_CREDITS:
        raise fail("rollover_cap", rollover, "rollover_cap must be a whole number of credits")
    if rollover and allowance is None:
        raise fail("rollover_cap", rollover, "rollover_cap needs an allowance to roll over")
    flags: dict[str, bool] = {}
    for key, default in (("upgrade_carries_usage", True), ("retired", False)):
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise fail(key, value, f"{key} must be true or false")
        flags[key] = value
    meters = _meter_allowances(table.get("meters", {}), fail, meters_known or {}, price)
    return Terms(version=version, price=price, trial_days=trial, tiers=tiers,
                 allowance=allowance, overage=overage, credit_multipliers=multipliers,
                 rollover_cap=rollover, meters=meters, **flags)


def _meter_allowances(value: Any, fail: Fail, known: dict[str, MeterConfig],
                      price: Price | None) -> tuple[MeterAllowance, ...]:
    """[plans.meters.<id>] tables: included = <units>, overage_price = "<minor units>"."""
    shape = '[plans.meters.web_search_calls] with included = 100, overage_price = "1"'
    if not isinstance(value, dict):
        raise fail("meters", value, f"meters must be tables like {shape}")
    out = []
    for meter_id, entry in value.items():
        meter = known.get(meter_id)
        if meter is None:
            raise fail("meters", meter_id, f"meters.{meter_id}: no such meter in [[meters]] "
                       f"(known: {', '.join(sorted(known)) or 'none'})")
        if meter.aggregation not in ("sum", "count"):
            raise fail("meters", meter_id, f"meters.{meter_id}: meter {meter_id!r} aggregates "
                       f"by {meter.aggregation}; only sum and count meters have an allowance")
        if not isinstance(entry, dict) or set(entry) - {"included", "overage_price"}:
            raise fail(meter_id, entry, f"meters.{meter_id} must be a table like {shape}")
        included = parse_value(entry.get("included"))
        if included is None or not 0 <= included <= MAX_METER_INCLUDED:
            raise fail("included", entry.get("included"), f"meters.{meter_id}.included must "
                       f"be a number of {meter.unit} from 0 to "
                       f"{MAX_METER_INCLUDED // METER_SCALE:,} (at most 6 decimals, as a "
                       "string if not whole)")
        overage = _minor_price(entry["overage_price"], meter_id, fail) \
            if "overage_price" in entry else None
        if overage is not None and price is None:
            raise fail("overage_price", entry["overage_price"], f"meters.{meter_id}: overage "
                       "needs a price (the plan's currency and its Stripe subscription)")
        if overage is None and included == 0:
            raise fail("included", 0, f"meters.{meter_id}: included = 0 without an "
                       "overage_price allows none of it; set a limit with amount instead")
        out.append(MeterAllowance(meter_id, included, overage))
    if sum(1 for m in out if m.overage_price is not None) > MAX_METERED_PRICES:
        raise fail("meters", value, f"at most {MAX_METERED_PRICES} meters of a plan may have "
                   "an overage_price (Stripe finds at most 10 prices of a subscription at once)")
    return tuple(out)


def _minor_price(value: Any, meter_id: str, fail: Fail) -> Decimal:
    """Minor units per unit: read as a meter's price per unit is (exact, at most 6 decimals,
    at most 10,000), and above 0."""
    try:
        minor = parse_unit_price(value)
    except ValueError:
        minor = Decimal(0)
    if not minor > 0:
        raise fail("overage_price", value, f"meters.{meter_id}.overage_price must be minor "
                   "units of the plan's currency per unit, above 0 and at most 10,000, as a "
                   f"decimal string with at most 6 decimals (\"1\" = 1 cent, \"0.5\" = half a "
                   f"cent); got {value!r}")
    return minor


@dataclass(frozen=True)
class CreditPack:
    """Credits sold once through Checkout ([[credit_packs]] in the config)."""

    id: str
    name: str
    credits: int
    price: Price  # interval unused: a one-time price

    @property
    def ref(self) -> str:
        return f"pack:{self.id}"


def parse_pack(table: dict[str, Any], index: int, where: Any) -> CreditPack:
    pack_id = table.get("id")
    start = where.table_start("credit_packs", index)

    def fail(key: str, value: Any, message: str) -> ConfigError:
        return ConfigError(where.at(key, value, f"credit pack {pack_id!r}: {message}",
                                    max(start - 1, 0)))

    if not isinstance(pack_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", pack_id):
        raise fail("id", pack_id, "id must be 1-64 letters, digits, '_', '-' or '.'")
    unknown = sorted(set(table) - {"id", "name", "credits", "price"})
    if unknown:
        raise fail(unknown[0], table[unknown[0]], f"unknown settings {unknown}")
    credits: Any = table.get("credits")
    if not _is_int(credits) or not 1 <= credits <= MAX_CREDITS:
        raise fail("credits", credits, "credits must be a whole number from 1")
    if "price" not in table:
        raise fail("id", pack_id, "a credit pack needs a price")
    price = _price({"interval": "month", **table["price"]} if isinstance(table["price"], dict)
                   else table["price"], fail)
    if price.amount < 1:
        raise fail("amount", price.amount, "a credit pack's price must be above 0")
    name = table.get("name", pack_id)
    if not isinstance(name, str):
        raise fail("name", name, "name must be a string")
    return CreditPack(pack_id, name, credits, price)


def _price(value: Any, fail: Fail) -> Price:
    shape = 'price = { amount = 2000, currency = "usd", interval = "month" } (minor units)'
    if not isinstance(value, dict) or set(value) - {"amount", "currency", "interval"}:
        raise fail("price", value, f"price must be a table like {shape}")
    amount: Any = value.get("amount")
    currency: Any = value.get("currency", "usd")
    interval: Any = value.get("interval", "month")
    if not _is_int(amount) or not 0 <= amount <= MAX_MINOR:
        raise fail("amount", amount, f"price.amount must be whole minor units (cents), e.g. "
                   f"2000 for 20.00; got {amount!r}")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise fail("currency", currency, "price.currency must be an ISO 4217 code like \"usd\"")
    if interval not in INTERVALS:
        raise fail("interval", interval, f"price.interval must be one of {', '.join(INTERVALS)}")
    return Price(amount, currency.lower(), interval)


def _overage(value: Any, fail: Fail) -> Overage:
    shape = "overage = { price_per_1m_tokens = 200, spend_cap = 5000 } (minor units)"
    if not isinstance(value, dict) or set(value) - {"price_per_1m_tokens", "spend_cap"}:
        raise fail("overage", value, f"overage must be a table like {shape}")
    per_1m: Any = value.get("price_per_1m_tokens")
    cap: Any = value.get("spend_cap")
    if not _is_int(per_1m) or not 1 <= per_1m <= MAX_MINOR:
        raise fail("price_per_1m_tokens", per_1m, "overage.price_per_1m_tokens must be whole "
                   "minor units above 0")
    if not _is_int(cap) or not 1 <= cap <= MAX_MINOR:
        raise fail("spend_cap", cap, "overage.spend_cap must be whole minor units above 0: "
                   "overage without a cap is not offered")
    return Overage(per_1m, cap)


def _tiers(value: Any, fail: Fail, known: frozenset[str] | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise fail("tiers", value, "tiers must be a non-empty list of model tiers")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise fail("tiers", value, f"no model has tier {unknown[0]!r} (tiers in [[models]]: "
                   f"{', '.join(sorted(known or ())) or 'none'})")
    return tuple(dict.fromkeys(value))


def _multipliers(value: Any, fail: Fail, known: frozenset[str] | None) -> dict[str, int]:
    if not isinstance(value, dict):
        raise fail("credit_multipliers", value, "credit_multipliers must be a table like "
                   "{ standard = 1, frontier = 5 }")
    out: dict[str, int] = {}
    for tier, mult in value.items():
        if known is not None and tier not in known:
            raise fail("credit_multipliers", value, f"no model has tier {tier!r}")
        if not _is_int(mult) or not 1 <= mult <= MAX_MULTIPLIER:
            raise fail(tier, mult, f"credit_multipliers.{tier} must be a whole number of "
                       "credits per token, from 1")
        out[tier] = int(mult)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- immutability ---------------------------------------------------------------------------

# Currencies whose minor unit is the major one (Stripe's zero-decimal currencies).
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
                          "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})


# ... and those whose minor unit is a thousandth.
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def minor_exponent(currency: str) -> int:
    """Decimal places of a currency's minor unit: 2, or 0 (JPY...) or 3 (KWD...)."""
    code = currency.lower()
    return 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2


def format_minor(amount: int, currency: str) -> str:
    """2000, "usd" -> "20.00 USD"; 500, "jpy" -> "500 JPY". Exact: integer arithmetic."""
    from core.i18n import money

    return money(amount, currency, minor_exponent(currency), "en")
