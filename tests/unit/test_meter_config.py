"""[[meters]] in the config: parsed exactly, refused with the line at fault; meter limits in
plans."""

from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest

from core.config import Config, ConfigError, settings_from
from core.meters import cost_pico, format_units, parse_value
from plans.catalog import Catalog

METERS = """\
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"
price = "0.01"

[[meters]]
id = "audio_seconds"
unit = "seconds"
aggregation = "sum"
field = "seconds"
price = "0.0001"
"""


def load(text: str) -> Config:
    raw = tomllib.loads(text, parse_float=Decimal)
    config = Config(**settings_from(raw, text, {}))
    Catalog.from_config(config)
    return config


def test_meters_are_parsed_with_exact_prices() -> None:
    config = load(METERS)
    search, audio = config.meters
    assert (search.id, search.unit, search.aggregation, search.field) == (
        "web_search_calls", "searches", "count", None)
    assert search.price_usd == Decimal("0.01") and audio.price_usd == Decimal("0.0001")
    assert config.meter("audio_seconds") is audio and config.meter("nope") is None


@pytest.mark.parametrize(("table", "line", "words"), [
    ('id = "Web Search"\nunit = "x"', 3, "id must be"),
    ('id = "a"\nunit = ""', 4, "unit must be"),
    ('id = "a"\nunit = "x"\naggregation = "avg"', 5, "aggregation must be one of"),
    ('id = "a"\nunit = "x"\naggregation = "sum"', 2, "field must name"),  # the table's line
    ('id = "a"\nunit = "x"\naggregation = "count"\nfield = "n"', 6, "reads no field"),
    ('id = "a"\nunit = "x"\naggregation = "count"\nprice = true', 6, "decimal string"),
    ('id = "a"\nunit = "x"\naggregation = "count"\nprice = "0.0000001"', 6, "6 decimal"),
    ('id = "a"\nunit = "x"\naggregation = "count"\nprice = "-1"', 6, "price must be"),
    ('id = "a"\nunit = "x"\naggregation = "count"\nrate = "1"', 6, "unknown settings"),
])
def test_a_bad_meter_names_its_line_and_field(table: str, line: int, words: str) -> None:
    text = f"# meters\n[[meters]]\n{table}\n"
    with pytest.raises(ConfigError, match=words) as caught:
        load(text)
    assert str(caught.value).startswith(f"line {line}:"), caught.value


def test_two_meters_with_one_id_are_refused() -> None:
    with pytest.raises(ConfigError, match="ids must be unique"):
        load(METERS + '[[meters]]\nid = "audio_seconds"\nunit = "s"\naggregation = "count"\n')


PLAN = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "{metric}"
window = "day"
amount = {amount}
"""


def test_a_plan_limits_a_meter_in_its_units() -> None:
    config = load(METERS + PLAN.format(metric="meter:audio_seconds", amount='"90.5"'))
    [plan] = Catalog.from_config(config).plans
    [limit] = plan.limits
    assert limit.meter == "audio_seconds" and limit.unit == "seconds"
    assert limit.amount == 90_500_000 and limit.id == "meter-audio_seconds-day"


@pytest.mark.parametrize(("metric", "amount", "words"), [
    ("meter:nope", "3", "names no meter"),
    ("meter:audio_seconds", "0", "a meter amount"),
    ("meter:audio_seconds", '"1.0000001"', "a meter amount"),
])
def test_a_bad_meter_limit_is_refused(metric: str, amount: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load(METERS + PLAN.format(metric=metric, amount=amount))


def test_max_and_unique_count_meters_cannot_be_limited() -> None:
    text = '[[meters]]\nid = "peak"\nunit = "gpus"\naggregation = "max"\nfield = "gpus"\n'
    with pytest.raises(ConfigError, match="only sum and count meters"):
        load(text + PLAN.format(metric="meter:peak", amount="3"))


def test_values_and_costs_are_exact() -> None:
    assert parse_value("12.5") == 12_500_000 and parse_value(3) == 3_000_000
    assert parse_value(0.1) == 100_000  # a JSON number read as written, not as a double
    assert parse_value("1e-7") is None and parse_value(True) is None and parse_value("x") is None
    assert format_units(12_500_000) == "12.5" and format_units(3_000_000) == "3"
    search = load(METERS).meters[1]  # 0.0001 USD a second
    assert cost_pico(search, parse_value("0.000001") or 0) == 100  # 1e-10 USD, exact
    assert cost_pico(search, 3_000_000) == 300_000_000
