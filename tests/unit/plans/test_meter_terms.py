"""A plan's allowance of a [[meters]] meter ([plans.meters.<id>]): read exactly, a hard stop
without an overage price, the metered Stripe prices a subscription carries, the content hash
of versions without meters unchanged, and clear errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from core.config import ConfigError, load_toml
from core.meters import METER_SCALE
from plans.catalog import Catalog, parse_plans
from plans.terms import MeterAllowance

METERS = """
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"

[[meters]]
id = "audio_seconds"
unit = "seconds"
field = "seconds"

[[meters]]
id = "peak_gpus"
unit = "GPUs"
aggregation = "max"
field = "gpus"

[[plans]]
id = "free"
default = true
"""


def catalog(tmp_path: Path, plans: str) -> Catalog:
    path = tmp_path / "meterlane.toml"
    path.write_text(METERS + plans)
    settings = load_toml(path, {})
    return parse_plans(settings["plans_raw"], settings["config_text"],
                       meters=settings["meters"])


def test_an_allowance_with_overage_is_read_exactly_and_adds_no_limit(tmp_path: Path) -> None:
    cat = catalog(tmp_path, """
[[plans]]
id = "pro"
price = { amount = 2000, currency = "usd", interval = "month" }
allowance = 1000
overage = { price_per_1m_tokens = 200, spend_cap = 5000 }
[plans.meters.web_search_calls]
included = 100
overage_price = "0.5"
[plans.meters.audio_seconds]
included = "60.5"
""")
    pro = cat.get("pro")
    assert pro is not None
    searches = pro.terms.meter("web_search_calls")
    assert searches == MeterAllowance("web_search_calls", 100 * METER_SCALE, Decimal("0.5"))
    assert searches.charge(3 * METER_SCALE) == Decimal("1.5")  # cents, exact
    # the audio allowance has no overage price: a hard stop at 60.5 seconds a cycle
    [stop] = [x for x in pro.limits if x.meter == "audio_seconds"]
    assert (stop.id, stop.window.kind, stop.amount, stop.unit) == (
        "allowance-audio_seconds", "cycle", 60_500_000, "seconds")
    assert not [x for x in pro.limits if x.meter == "web_search_calls"]
    assert pro.terms.metered_price_keys(pro.ref) == [
        "pro@1:overage", "pro@1:meter:web_search_calls"]


def test_plans_without_meters_keep_their_content_hash(tmp_path: Path) -> None:
    from plans.versions import content_of

    plain = catalog(tmp_path, '[[plans]]\nid = "p"\nallowance = 10\n').get("p")
    assert plain is not None and "meters" not in content_of(plain)
    metered = catalog(tmp_path, '[[plans]]\nid = "p"\n[plans.meters.web_search_calls]\n'
                                'included = 5\n').get("p")
    assert metered is not None
    assert content_of(metered)["meters"] == [
        {"meter": "web_search_calls", "included": 5 * METER_SCALE, "overage_price": None}]


PRICED = '[[plans]]\nid = "p"\nprice = { amount = 100 }\n'


@pytest.mark.parametrize(("text", "expected"), [
    ('[plans.meters.nope]\nincluded = 1\n', "meters.nope: no such meter in [[meters]]"),
    ('[plans.meters.peak_gpus]\nincluded = 1\n', "only sum and count meters"),
    ('[plans.meters.web_search_calls]\nincluded = -1\n', "included must be a number"),
    ('[plans.meters.web_search_calls]\nincluded = "ten"\n', "included must be a number"),
    ('[plans.meters.web_search_calls]\nincluded = 1\noverage_price = true\n',
     "overage_price must be minor units"),
    ('[plans.meters.web_search_calls]\nincluded = 1\noverage_price = "0"\n',
     "overage_price must be minor units"),
    ('[plans.meters.web_search_calls]\nincluded = 1\noverage_price = "0.0000001"\n',
     "at most 6 decimals"),
    ('[plans.meters.web_search_calls]\nincluded = 0\n', "allows none of it"),
    ('[plans.meters.web_search_calls]\nincluded = 1\nprice = "1"\n',
     "must be a table like"),
    ('meters = ["web_search_calls"]\n', "meters must be tables like"),
])
def test_bad_meter_allowances_are_refused_clearly(tmp_path: Path, text: str,
                                                  expected: str) -> None:
    with pytest.raises(ConfigError, match="plan 'p'") as caught:
        catalog(tmp_path, PRICED + text)
    assert expected in str(caught.value)


def test_at_most_eight_meters_of_a_plan_have_an_overage_price(tmp_path: Path) -> None:
    meters = "".join(f'[[meters]]\nid = "m{n}"\nunit = "calls"\naggregation = "count"\n'
                     for n in range(9))
    allowances = "".join(f'[plans.meters.m{n}]\nincluded = 1\noverage_price = "1"\n'
                         for n in range(9))
    with pytest.raises(ConfigError, match="at most 8 meters of a plan"):
        catalog(tmp_path, meters + PRICED + allowances)


def test_meter_overage_needs_a_priced_plan_and_names_its_line(tmp_path: Path) -> None:
    plans = ('[[plans]]\nid = "p"\n[plans.meters.web_search_calls]\nincluded = 1\n'
             'overage_price = "2"\n')
    with pytest.raises(ConfigError) as caught:
        catalog(tmp_path, plans)
    line = (METERS + plans).splitlines().index('overage_price = "2"') + 1
    assert str(caught.value).startswith(f"line {line}: plan 'p': meters.web_search_calls: "
                                        "overage needs a price")
