"""A plan's commercial terms in the config: price, trial, tiers, allowance, overage, credit
multipliers, rollover, versions; errors that name the line at fault; the content hash."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from core.config import ConfigError, load_toml
from plans.catalog import Catalog, parse_plans
from plans.terms import Overage, Price, format_minor
from plans.versions import content_hash

MODELS = """
[[upstreams]]
name = "local"
base_url = "http://127.0.0.1:8000/v1"

[[models]]
name = "small-model"
upstream = "local"
tier = "small"

[[models]]
name = "big-model"
upstream = "local"
tier = "frontier"
"""

CATALOG = """
[[plans]]
id = "free"
default = true
tiers = ["small"]
allowance = 20000

[[plans]]
id = "pro"
name = "Pro"
price = { amount = 2000, currency = "USD", interval = "month" }
trial_days = 14
allowance = 1000000
overage = { price_per_1m_tokens = 200, spend_cap = 5000 }
credit_multipliers = { frontier = 5 }
rollover_cap = 200000
upgrade_carries_usage = false
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 60

[[plans]]
id = "pro"
version = 2
name = "Pro"
price = { amount = 2500, currency = "usd", interval = "month" }
allowance = 1500000

[[plans]]
id = "team"
price = { amount = 19200, currency = "usd", interval = "year" }
allowance = 5000000
retired = true
"""


def catalog(tmp_path: Path, plans: str) -> Catalog:
    path = tmp_path / "meterlane.toml"
    path.write_text(MODELS + plans)
    settings = load_toml(path, {})
    models = settings["models"]
    return parse_plans(settings["plans_raw"], settings["config_text"],
                       frozenset(m.name for m in models), frozenset(m.tier for m in models))


def error_of(tmp_path: Path, plans: str) -> str:
    with pytest.raises(ConfigError) as caught:
        catalog(tmp_path, plans)
    return str(caught.value)


def line_of(text: str, needle: str, nth: int = 0) -> int:
    lines = [i for i, line in enumerate((MODELS + text).splitlines(), 1) if needle in line]
    return lines[nth]


def test_terms_are_read_in_minor_units_and_versions_are_kept_apart(tmp_path: Path) -> None:
    cat = catalog(tmp_path, CATALOG)
    pro1, pro2 = cat.get("pro", 1), cat.get("pro", 2)
    assert pro1 is not None and pro2 is not None
    assert cat.get("pro") is pro2  # the current version: the highest
    assert pro1.terms.price == Price(2000, "usd", "month")
    assert pro1.terms.trial_days == 14
    assert pro1.terms.overage == Overage(200, 5000)
    assert pro1.terms.overage.headroom_credits == 25_000_000  # 50.00 buys 25M at 2.00/1M
    assert pro1.terms.credits_per_token("frontier") == 5
    assert pro1.terms.credits_per_token("small") == 1
    assert pro1.terms.rollover_cap == 200_000 and not pro1.terms.upgrade_carries_usage
    assert [x.id for x in pro1.limits] == ["requests-minute", "allowance"]
    allowance = pro1.limits[-1]
    assert (allowance.metric, allowance.window.kind, allowance.amount) == (
        "credits", "cycle", 1_000_000)
    free = cat.default
    assert free is not None and free.id == "free"
    assert free.terms.allows_tier("small") and not free.terms.allows_tier("frontier")
    assert free.terms.price is None and free.terms.overage is None
    team = cat.get("team")
    assert team is not None and team.terms.retired and team.terms.price.interval == "year"
    assert sorted(p.ref for p in cat.current) == ["free@1", "pro@2", "team@1"]


@pytest.mark.parametrize(("text", "needle", "expected"), [
    ('price = { amount = 20.5, currency = "usd" }', "price =", "whole minor units"),
    ('price = { amount = 2000, currency = "dollars" }', "price =", "ISO 4217"),
    ('price = { amount = 2000, interval = "week" }', "price =", "month, year"),
    ("trial_days = 7", "trial_days", "a trial needs a price"),
    ('tiers = ["gold"]', "tiers", "no model has tier 'gold'"),
    ("allowance = 0", "allowance", "allowance must be a whole number"),
    ("overage = { price_per_1m_tokens = 200, spend_cap = 100 }", "overage",
     "overage needs a price and an allowance"),
    ("credit_multipliers = { frontier = 0 }", "frontier = 0", "from 1"),
    ("credit_multipliers = { gold = 2 }", "credit_multipliers", "no model has tier 'gold'"),
    ("rollover_cap = 10", "rollover_cap", "needs an allowance"),
    ("retired = 1", "retired", "true or false"),
    ("version = 0", "version", "version must be a whole number"),
])
def test_bad_terms_are_refused_naming_the_line(tmp_path: Path, text: str, needle: str,
                                               expected: str) -> None:
    plans = f'[[plans]]\nid = "other"\ndefault = true\n\n[[plans]]\nid = "p"\n{text}\n'
    message = error_of(tmp_path, plans)
    assert expected in message
    assert message.startswith(f"line {line_of(plans, needle)}:")


def test_an_error_in_a_later_version_names_that_versions_line(tmp_path: Path) -> None:
    plans = ('[[plans]]\nid = "p"\ndefault = true\ntrial_days = 0\n\n'
             '[[plans]]\nid = "p"\nversion = 2\ntrial_days = 3\n')
    message = error_of(tmp_path, plans)
    assert message.startswith(f"line {line_of(plans, 'trial_days', nth=1)}:")


def test_overage_without_a_cap_is_not_offered(tmp_path: Path) -> None:
    plans = ('[[plans]]\nid = "p"\ndefault = true\nallowance = 10\n'
             'price = { amount = 100 }\noverage = { price_per_1m_tokens = 200 }\n')
    assert "spend_cap must be whole minor units above 0" in error_of(tmp_path, plans)


def test_allowance_id_is_reserved(tmp_path: Path) -> None:
    plans = ('[[plans]]\nid = "p"\ndefault = true\nallowance = 10\n[[plans.limits]]\n'
             'id = "allowance"\nmetric = "tokens"\nwindow = "day"\namount = 5\n')
    assert "is the plan's allowance" in error_of(tmp_path, plans)


def test_the_content_hash_changes_with_what_subscribers_buy_only(tmp_path: Path) -> None:
    pro = catalog(tmp_path, CATALOG).get("pro", 1)
    assert pro is not None
    same = content_hash(pro)
    assert content_hash(replace(pro, name="Pro (renamed)", default=True)) == same
    assert content_hash(replace(pro, terms=replace(pro.terms, retired=True))) == same
    assert content_hash(replace(pro, terms=replace(pro.terms, trial_days=7))) != same
    assert content_hash(replace(pro, terms=replace(
        pro.terms, price=Price(2001, "usd", "month")))) != same
    assert content_hash(replace(pro, limits=pro.limits[:1])) != same


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (2000, "usd", "20.00 USD"), (5, "eur", "0.05 EUR"), (123456789, "usd", "1,234,567.89 USD"),
    (500, "jpy", "500 JPY"), (-250, "usd", "-2.50 USD"),
])
def test_minor_units_are_shown_exactly(amount: int, currency: str, shown: str) -> None:
    assert format_minor(amount, currency) == shown
