"""`[[meters]]`: what an app meters besides tokens (images, tool calls, audio seconds, ...).

A meter reads one field of its events (or counts them), aggregates them one way, and has a
price per unit in USD. Values are exact: at most 6 decimal places, kept as integer
micro-units (METER_SCALE per unit) wherever they are counted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from core.costs import ConfigError

AGGREGATIONS = ("sum", "count", "max", "unique_count")
METER_SCALE = 10**6  # micro-units: a meter's values have at most 6 decimal places
PICO_PER_USD = 10**12
MAX_METER_PRICE_USD = Decimal(10_000)  # per unit
MAX_METER_VALUE = Decimal(10**9)       # one event's value, in units
_KEYS = {"id", "unit", "aggregation", "field", "price", "name"}
_ID = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class MeterConfig:
    id: str
    unit: str
    aggregation: str = "sum"
    field: str | None = None   # the key of an event's data read (none for count)
    price_usd: Decimal | None = None  # USD per unit; None: unpriced
    name: str | None = None

    @property
    def counts_events(self) -> bool:
        return self.aggregation in ("count", "unique_count")


def parse_meters(tables: list[dict[str, Any]], text: str) -> tuple[MeterConfig, ...]:
    """Every [[meters]] table, checked; errors name the config line of the field at fault."""
    meters = tuple(_meter(table, i, text) for i, table in enumerate(tables))
    seen: set[str] = set()
    for meter in meters:
        if meter.id in seen:
            raise ConfigError(_at(text, "id", meter.id, f"two [[meters]] have the id "
                                  f"{meter.id!r}: meter ids must be unique"))
        seen.add(meter.id)
    return meters


def _meter(table: dict[str, Any], index: int, text: str) -> MeterConfig:
    start = _table_start(text, index)

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(_at(text, key, table.get(key), message, start))

    meter_id = table.get("id")
    if not isinstance(meter_id, str) or not _ID.fullmatch(meter_id):
        raise fail("id", f"[[meters]] {index + 1}: id must be 1-64 lowercase letters, digits "
                   f"or '_', starting with a letter (e.g. \"web_search_calls\"); got {meter_id!r}")
    where = f"meter {meter_id!r}"
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"{where}: unknown settings {unknown}; expected "
                   + ", ".join(sorted(_KEYS)))
    unit = table.get("unit")
    if not isinstance(unit, str) or not 0 < len(unit) <= 32 or not unit.isprintable():
        raise fail("unit", f"{where}: unit must be a short text (1-32 characters), e.g. "
                   "\"searches\" or \"seconds\"")
    aggregation = table.get("aggregation", "sum")
    if aggregation not in AGGREGATIONS:
        raise fail("aggregation", f"{where}: aggregation must be one of "
                   f"{', '.join(AGGREGATIONS)}; got {aggregation!r}")
    field = table.get("field")
    if aggregation == "count":
        if field is not None:
            raise fail("field", f"{where}: a count meter counts events and reads no field")
    elif not isinstance(field, str) or not _FIELD.fullmatch(field):
        raise fail("field", f"{where}: field must name the key of the event's data that "
                   f"{aggregation} reads (e.g. \"seconds\"); got {field!r}")
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 80):
        raise fail("name", f"{where}: name must be a text of 1-80 characters")
    price = _price(table.get("price"), lambda m: fail("price", f"{where}: {m}")) \
        if "price" in table else None
    return MeterConfig(id=meter_id, unit=unit, aggregation=aggregation, field=field,
                       price_usd=price, name=name)


def _price(value: Any, fail: Any) -> Decimal:
    try:
        usd = Decimal(str(value)) if isinstance(value, (str, int, Decimal)) \
            and not isinstance(value, bool) else None
    except InvalidOperation:
        usd = None
    if usd is None or not usd.is_finite() or usd < 0:
        raise fail(f"price must be USD per unit as a decimal string, e.g. \"0.01\"; got {value!r}")
    if usd > MAX_METER_PRICE_USD:
        raise fail(f"price is more than {MAX_METER_PRICE_USD:,} USD per unit")
    if usd != usd.quantize(Decimal("0.000001")):
        raise fail("price has more than 6 decimal places")
    return usd


def parse_unit_price(value: Any) -> Decimal:
    """A price per unit in USD (a decimal string, at most 6 places, at most 10,000); raises
    ValueError saying what is wrong."""
    def fail(message: str) -> ValueError:
        return ValueError(message)
    return _price(value, fail)


def parse_value(value: Any) -> int | None:
    """A meter value (an integer, or a decimal string with at most 6 places) in micro-units;
    None when it is not one. A JSON number with decimals is read as written (its shortest
    repr), never as the binary double nearest it."""
    if isinstance(value, float):
        value = repr(value)
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal)):
        return None
    try:
        exact = Decimal(value) if not isinstance(value, str) else Decimal(value.strip())
    except InvalidOperation:
        return None
    if not exact.is_finite() or abs(exact) > MAX_METER_VALUE \
            or exact != exact.quantize(Decimal("0.000001")):
        return None
    return int(exact * METER_SCALE)


def format_units(micro: int) -> str:
    """Micro-units as a plain decimal string ("3", "12.5")."""
    text = f"{Decimal(micro) / METER_SCALE:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def cost_pico(meter: MeterConfig, micro: int, price_usd: Decimal | None = None) -> int | None:
    """What `micro` micro-units cost at the price (the meter's own unless given), exact in
    pico-USD (6 + 6 decimal places fit in 12); None when unpriced."""
    price = meter.price_usd if price_usd is None else price_usd
    if price is None:
        return None
    return int(price * PICO_PER_USD) * micro // METER_SCALE


def _table_start(text: str, index: int) -> int:
    header = re.compile(r"^\s*\[\[\s*meters\s*\]\]")
    seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if header.match(line):
            seen += 1
            if seen == index:
                return number
    return 0


def _at(text: str, key: str, value: Any, message: str, after: int = 0) -> str:
    """`message`, led by the config line that sets `key` (in the table from line `after`)."""
    pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
    lines = text.splitlines()
    for number, line in enumerate(lines[max(after - 1, 0):], start=max(after, 1)):
        if number > after and after and re.match(r"^\s*\[", line):
            break  # the next table: the key is not written in this one
        if pattern.search(line.split("#", 1)[0]):
            return f"line {number}: {message}"
    return f"line {after}: {message}" if after else message
