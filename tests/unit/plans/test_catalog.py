"""The plan catalog: what the config may say, and errors that name the line at fault."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from core.config import ConfigError, load_toml
from plans.catalog import Catalog, parse_plans

MODELS = """
[[upstreams]]
name = "local"
base_url = "http://127.0.0.1:8000/v1"

[[models]]
name = "small"
upstream = "local"
"""


def catalog(tmp_path: Path, plans: str) -> Catalog:
    path = tmp_path / "meterlane.toml"
    path.write_text(MODELS + plans)
    settings = load_toml(path, {})
    return parse_plans(settings["plans_raw"], settings["config_text"],
                       frozenset(m.name for m in settings["models"]))


def error_of(tmp_path: Path, plans: str) -> str:
    with pytest.raises(ConfigError) as caught:
        catalog(tmp_path, plans)
    return str(caught.value)


def line_of(text: str, needle: str) -> int:
    full = MODELS + text
    return next(i for i, line in enumerate(full.splitlines(), 1) if needle in line)


GOOD = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 20000
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 60

[[plans]]
id = "pro"
on_limit = "reject"
on_store_failure = "open"
timezone = "Europe/Berlin"
[[plans.limits]]
metric = "cost_usd"
window = "cycle"
amount = "12.50"
[[plans.limits]]
metric = "tokens"
window = "rolling:5h"
amount = 100000
model = "small"
[[plans.limits]]
metric = "concurrent"
amount = 4
"""


def test_a_good_catalog_parses_with_ids_units_and_kinds(tmp_path: Path) -> None:
    cat = catalog(tmp_path, GOOD)
    assert cat.enabled and cat.default is not None and cat.default.id == "free"
    pro = cat.get("pro")
    assert pro is not None and pro.on_limit == "reject" and pro.on_store_failure == "open"
    ids = [limit.id for limit in pro.limits]
    assert ids == ["cost_usd-cycle", "tokens-rolling-5h-small", "concurrent"]
    cost = pro.limits[0]
    assert cost.amount == int(Decimal("12.50") * 10**12)  # pico-USD, exact
    assert not cost.is_rate and pro.limits[2].is_rate
    assert cat.plans[0].limits[1].is_rate  # requests per minute: a rate limit (429)
    assert pro.limits_for("other") == (pro.limits[0], pro.limits[2])
    assert pro.limits[1].window.tz == "Europe/Berlin"


@pytest.mark.parametrize(("bad", "needle", "says"), [
    ('window = "rolling:5x"', 'window = "rolling:5x"', "rolling:5x"),
    ('window = "fortnight"', 'window = "fortnight"', "fortnight"),
    ('window = "day"\namount = -5', "amount = -5", "whole number"),
    ('window = "day"\namount = 1e30', "amount = 1e30", "whole number"),
    ('window = "day"\namount = 10\nmodel = "nope"', 'model = "nope"', "not in [[models]]"),
    ('window = "day"\namount = 10\nscope = "planet"', 'scope = "planet"', "scope"),
])
def test_a_malformed_limit_is_refused_with_the_line_at_fault(
        tmp_path: Path, bad: str, needle: str, says: str) -> None:
    text = f"""
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
{bad}
"""
    message = error_of(tmp_path, text)
    assert message.startswith(f"line {line_of(text, needle)}:"), message
    assert says in message and "plan 'free'" in message


def test_the_line_named_is_in_the_right_plan(tmp_path: Path) -> None:
    text = GOOD.replace('window = "rolling:5h"', 'window = "rolling:0h"')
    message = error_of(tmp_path, text)
    assert message.startswith(f"line {line_of(text, 'rolling:0h')}:") and "'pro'" in message


@pytest.mark.parametrize(("text", "says"), [
    ('[[plans]]\nid = "a"\n', "default = true"),
    ('[[plans]]\nid = "a"\ndefault = true\n[[plans]]\nid = "b"\ndefault = true\n',
     "only one plan"),
    ('[[plans]]\nid = "a"\ndefault = true\n[[plans]]\nid = "a"\n', "version 1 twice"),
    ('[[plans]]\nid = "a"\ndefault = true\non_limit = "maybe"\n', "on_limit"),
    ('[[plans]]\nid = "a"\ndefault = true\ntimezone = "Mars/Olympus"\n[[plans.limits]]\n'
     'metric = "tokens"\nwindow = "day"\namount = 5\n', "Mars/Olympus"),
    ('[[plans]]\nid = "a"\ndefault = true\n[[plans.limits]]\nmetric = "concurrent"\n'
     'window = "day"\namount = 5\n', "concurrent limits take no window"),
    ('[[plans]]\nid = "a"\ndefault = true\n[[plans.limits]]\nmetric = "cost_usd"\n'
     'window = "day"\namount = "0.0000001"\n', "6 decimals"),
    ('[[plans]]\nid = "a"\ndefault = true\n[[plans.limits]]\nmetric = "tokens"\n'
     'window = "bucket:1000/1d"\namount = 1000000000000\n', "too large"),
    ('[[plans]]\nid = "a"\ndefault = true\nlimitz = []\n', "unknown settings"),
])
def test_plan_level_mistakes_are_refused(tmp_path: Path, text: str, says: str) -> None:
    assert says in error_of(tmp_path, text)


def test_limits_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[limits]\nstore = "memcached"\n')
    with pytest.raises(ConfigError, match="store must be one of"):
        load_toml(path, {})
    path.write_text("[limits]\nlease_seconds = 1\n")
    with pytest.raises(ConfigError, match="lease_seconds"):
        load_toml(path, {})
