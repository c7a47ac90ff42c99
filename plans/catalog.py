"""The plan catalog: `[[plans]]` in the config, each with the limits the engine enforces.

Parsed once at start; a malformed plan stops the service with the config line at fault."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from core.config import Config, ConfigError, parse_alias_models
from core.meters import METER_SCALE, MeterConfig, parse_value
from plans.terms import TERM_KEYS, CreditPack, Terms, parse_pack, parse_terms
from plans.windows import Window, WindowError, parse_window

# credits: tokens times the credit multiplier of the model's tier (1 unless the plan says)
METRICS = ("tokens", "credits", "requests", "cost_usd", "concurrent")
METER_PREFIX = "meter:"  # metric = "meter:<id>": a limit on a [[meters]] meter, in its unit
SCOPES = ("user", "app")
ON_LIMIT = ("clip", "reject")
ON_STORE_FAILURE = ("closed", "open")
# Far beyond any real quota, and small enough that every counter stays exact in a double
# (Redis scripts compute in doubles): 2**53 pico-USD is about 9,007 USD.
MAX_AMOUNT = {"tokens": 10**15, "credits": 10**15, "requests": 10**12, "concurrent": 10**6}
MAX_COST_USD = Decimal(9000)
MAX_METER_AMOUNT = 9 * 10**9 * METER_SCALE  # micro-units: inside 2**53 as well
PICO_PER_USD = 10**12
DEFAULT_MAX_OUTPUT_TOKENS = 4096
_PLAN_KEYS = {"id", "name", "default", "on_limit", "on_store_failure", "timezone",
              "default_max_output_tokens", "limits", "aliases"} | TERM_KEYS
ALLOWANCE_ID = "allowance"  # the limit a plan's `allowance` becomes
_LIMIT_KEYS = {"id", "metric", "window", "amount", "model", "scope", "timezone", "name"}


@dataclass(frozen=True)
class LimitSpec:
    """One limit of a plan. `amount` is in the metric's unit: tokens, requests, concurrent
    requests, or pico-USD for cost_usd."""

    id: str
    metric: str
    window: Window
    amount: int
    scope: str = "user"
    model: str | None = None
    # What end users read for it, per language ("en", "de", ...): the plan's own words; none
    # given, a readable name is made from the metric and window. Not a term of the plan: a
    # published version may rename its limits.
    names: tuple[tuple[str, str], ...] = ()
    unit: str | None = None  # a meter limit: the meter's unit ("searches")

    def name_in(self, locale: str) -> str | None:
        found = dict(self.names)
        return found.get(locale) or found.get("en") or next(iter(found.values()), None)

    @property
    def is_rate(self) -> bool:
        """Rate limits refuse with 429 and Retry-After; quotas with 402 (the paywall's cue)."""
        return (self.metric == "concurrent" or self.window.kind == "bucket"
                or self.window.unit in ("minute", "hour") and self.window.kind == "calendar")

    def applies_to(self, model: str) -> bool:
        return self.model is None or self.model == model

    @property
    def meter(self) -> str | None:
        """The meter id of a limit on a meter (its amount is in micro-units), else None."""
        return self.metric.removeprefix(METER_PREFIX) if self.metric.startswith(
            METER_PREFIX) else None


@dataclass(frozen=True)
class Plan:
    id: str
    name: str
    default: bool = False
    on_limit: str = "clip"
    on_store_failure: str = "closed"
    timezone: str = "UTC"
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    limits: tuple[LimitSpec, ...] = field(default=())
    terms: Terms = field(default_factory=Terms)
    # Model aliases of its own (name -> candidate models), ahead of the global [[aliases]].
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def alias(self, name: str) -> tuple[str, ...] | None:
        for alias, models in self.aliases:
            if alias == name:
                return models
        return None

    @property
    def version(self) -> int:
        return self.terms.version

    @property
    def ref(self) -> str:
        """The plan version as one string: "pro@2"."""
        return f"{self.id}@{self.terms.version}"

    def limits_for(self, model: str) -> tuple[LimitSpec, ...]:
        return tuple(limit for limit in self.limits if limit.applies_to(model))


@dataclass(frozen=True)
class Catalog:
    """Every version of every plan. A plan id's current version is its highest: what new
    subscribers get; older versions stay for the subscribers who bought them."""

    plans: tuple[Plan, ...] = ()
    packs: tuple[CreditPack, ...] = ()

    def pack(self, pack_id: str) -> CreditPack | None:
        return next((p for p in self.packs if p.id == pack_id), None)

    @property
    def enabled(self) -> bool:
        """The limits engine is on when any plan has a limit (an allowance is one) or
        restricts the model tiers it may call."""
        return any(plan.limits or plan.terms.tiers is not None for plan in self.plans)

    @property
    def current(self) -> tuple[Plan, ...]:
        latest: dict[str, Plan] = {}
        for plan in self.plans:
            if plan.id not in latest or plan.version > latest[plan.id].version:
                latest[plan.id] = plan
        return tuple(latest.values())

    @property
    def default(self) -> Plan | None:
        for plan in self.current:
            if any(p.default for p in self.plans if p.id == plan.id):
                return plan
        return None

    def has_allowance(self, plan_id: str | None) -> bool:
        """Whether usage on this plan (any of its versions) is accounted against an allowance
        (and so against credits and overage)."""
        return plan_id is not None and any(
            p.terms.allowance is not None for p in self.plans if p.id == plan_id)

    def get(self, plan_id: str, version: int | None = None) -> Plan | None:
        """That version of the plan, or with no version its current one."""
        found = [p for p in self.plans if p.id == plan_id
                 and (version is None or p.version == version)]
        return max(found, key=lambda p: p.version) if found else None

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        tiers = frozenset(m.tier for m in config.models)
        catalog = parse_plans(config.plans_raw, config.config_text, config.model_names, tiers,
                              meters=config.meters)
        where = _Where(config.config_text)
        packs = tuple(parse_pack(t, i, where) for i, t in enumerate(config.packs_raw))
        ids = [p.id for p in packs]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ConfigError(f"two [[credit_packs]] have the id {twice[0]!r}: "
                              "[[credit_packs]] ids must be unique")
        return replace(catalog, packs=packs)


def parse_plans(tables: tuple[dict[str, Any], ...], text: str = "",
                models: frozenset[str] | None = None,
                tiers: frozenset[str] | None = None,
                meters: tuple[MeterConfig, ...] = ()) -> Catalog:
    where = _Where(text)
    known = {m.id: m for m in meters}
    plans = tuple(_plan(table, where, models, tiers, i, known) for i, table in enumerate(tables))
    refs = [p.ref for p in plans]
    dupes = sorted({r for r in refs if refs.count(r) > 1})
    if dupes:
        plan_id = dupes[0].split("@")[0]
        raise ConfigError(where.at("id", plan_id, f"plan {plan_id!r} has version "
                                   f"{dupes[0].split('@')[1]} twice: give each version its "
                                   "own number"))
    defaults = sorted({p.id for p in plans if p.default})
    if len(defaults) > 1:
        raise ConfigError(f"only one plan may be the default; {defaults} all say default = true")
    if plans and not defaults:
        raise ConfigError("one plan must say default = true: end users with no other plan "
                          "are on it")
    return Catalog(plans)


class _Where:
    """Finds the config line that holds a value, so an error can name it."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def at(self, key: str, value: Any, message: str, after: int = 0) -> str:
        line = self.line_of(key, value, after)
        return f"line {line}: {message}" if line else message

    def table_start(self, name: str, index: int) -> int:
        """The line of the index-th [[name]] header (0: not found)."""
        header = re.compile(rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]")
        seen = -1
        for number, line in enumerate(self.lines, start=1):
            if header.match(line):
                seen += 1
                if seen == index:
                    return number
        return 0

    def line_of(self, key: str, value: Any, after: int = 0) -> int:
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=\s*{re.escape(shown)}")
        key_only = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
        for candidate in (pattern, key_only):  # a number may be written another way (1e30)
            for number, line in enumerate(self.lines[after:], start=after + 1):
                if candidate.search(line.split("#", 1)[0] if "#" not in shown else line):
                    return number
        return 0


def _plan(table: dict[str, Any], where: _Where, models: frozenset[str] | None,
          tiers: frozenset[str] | None = None, index: int = 0,
          meters: dict[str, MeterConfig] | None = None) -> Plan:
    plan_id = table.get("id")
    if not isinstance(plan_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", plan_id):
        raise ConfigError(where.at("id", plan_id, f"[[plans]] id must be 1-64 letters, digits, "
                                   f"'_', '-' or '.', got {plan_id!r}"))
    start = where.table_start("plans", index) or where.line_of("id", plan_id)
    ctx = f"plan {plan_id!r}"

    def fail(key: str, value: Any, message: str) -> ConfigError:
        return ConfigError(where.at(key, value, f"{ctx}: {message}", max(start - 1, 0)))

    unknown = sorted(set(table) - _PLAN_KEYS)
    if unknown:
        raise fail(unknown[0], table[unknown[0]], f"unknown settings {unknown}")
    on_limit = _choice(table, "on_limit", ON_LIMIT, "clip", fail)
    on_failure = _choice(table, "on_store_failure", ON_STORE_FAILURE, "closed", fail)
    tz = table.get("timezone", "UTC")
    default_out = table.get("default_max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS)
    if not _is_int(default_out) or not 1 <= default_out <= 10**7:
        raise fail("default_max_output_tokens", default_out,
                   "default_max_output_tokens must be an integer from 1 to 10,000,000")
    default = table.get("default", False)
    if not isinstance(default, bool):
        raise fail("default", default, "default must be true or false")
    raw_limits = table.get("limits", [])
    if not isinstance(raw_limits, list) or not all(isinstance(x, dict) for x in raw_limits):
        raise fail("limits", raw_limits, "[[plans.limits]] must be an array of tables")
    limits = tuple(_limit(raw, i, tz, fail, models, meters or {})
                   for i, raw in enumerate(raw_limits))
    ids = [limit.id for limit in limits]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise fail("id", dupes[0], f"limit ids must be unique within a plan: {dupes[0]!r}")
    name = table.get("name", plan_id)
    if not isinstance(name, str):
        raise fail("name", name, "name must be a string")
    terms = parse_terms(table, fail, tiers, meters or {})
    for allowance in terms.meters:
        if allowance.overage_price is None:  # no overage: the allowance is a hard stop
            if f"{ALLOWANCE_ID}-{allowance.meter}" in ids:
                raise fail("id", f"{ALLOWANCE_ID}-{allowance.meter}", "that limit id is the "
                           f"plan's allowance of meter {allowance.meter!r}: name it otherwise")
            meter = (meters or {})[allowance.meter]
            limits += (LimitSpec(id=f"{ALLOWANCE_ID}-{allowance.meter}",
                                 metric=f"{METER_PREFIX}{allowance.meter}",
                                 window=parse_window("cycle", tz), amount=allowance.included,
                                 unit=meter.unit),)
    if terms.allowance is not None:
        if ALLOWANCE_ID in ids:
            raise fail("id", ALLOWANCE_ID, f"limit id {ALLOWANCE_ID!r} is the plan's "
                       "allowance: name the limit otherwise")
        # Monthly from the billing anchor, on annual plans too (they grant it monthly).
        limits += (LimitSpec(id=ALLOWANCE_ID, metric="credits",
                             window=parse_window("cycle", tz), amount=terms.allowance),)
    raw_aliases = table.get("aliases", {})
    if not isinstance(raw_aliases, dict):
        raise fail("aliases", raw_aliases, 'aliases must be a table like { smart = ["m1", "m2"] }')
    aliases = []
    for alias, value in raw_aliases.items():
        if models is not None and alias in models:
            raise fail("aliases", alias, f"alias {alias!r} is a model's name")
        if len(alias) > 100:
            raise fail("aliases", alias, "an alias name is at most 100 characters")
        try:
            names = parse_alias_models(value, f"{ctx}: alias {alias!r}",
                                       set(models) if models is not None else set(value or []))
        except ConfigError as exc:
            raise fail("aliases", value, str(exc).removeprefix(f"{ctx}: ")) from exc
        aliases.append((alias, names))
    return Plan(id=plan_id, name=name, default=default, on_limit=on_limit,
                on_store_failure=on_failure, timezone=tz, default_max_output_tokens=default_out,
                limits=limits, terms=terms, aliases=tuple(aliases))


def _limit(raw: dict[str, Any], index: int, plan_tz: Any, fail: Any,
           models: frozenset[str] | None, meters: dict[str, MeterConfig]) -> LimitSpec:
    unknown = sorted(set(raw) - _LIMIT_KEYS)
    if unknown:
        raise fail(unknown[0], raw[unknown[0]], f"limit {index + 1}: unknown settings {unknown}")
    metric = raw.get("metric")
    if isinstance(metric, str) and metric.startswith(METER_PREFIX):
        _meter_metric(metric, raw, index, fail, meters)
    elif metric not in METRICS:
        raise fail("metric", metric, f"limit {index + 1}: metric must be one of "
                   f"{', '.join(METRICS)} or meter:<id of a [[meters]]>; got {metric!r}")
    spec = raw.get("window", "none" if metric == "concurrent" else None)
    if not isinstance(spec, str):
        raise fail("window", spec, f"limit {index + 1}: window is required, e.g. \"day\", "
                   "\"month\", \"rolling:5h\" or \"bucket:1000/1m\"")
    tz = raw.get("timezone", plan_tz)
    if not isinstance(tz, str):
        raise fail("timezone", tz, f"limit {index + 1}: timezone must be an IANA zone name")
    try:
        window = parse_window(spec, tz)
    except WindowError as exc:
        key, value = ("timezone", tz) if tz in str(exc) and spec not in str(exc) else (
            "window", spec)
        raise fail(key, value, f"limit {index + 1}: {exc}") from exc
    if (metric == "concurrent") != (window.kind == "none"):
        raise fail("window", spec, f"limit {index + 1}: concurrent limits take no window "
                   "(window = \"none\"); every other metric needs one")
    amount = _amount(metric, raw.get("amount"), index, fail)
    if window.kind == "bucket" and amount * window.seconds * 1000 > 2**53:
        raise fail("amount", raw.get("amount"), f"limit {index + 1}: a bucket of {amount:,} "
                   f"refilled over {window.seconds} s is too large to count exactly; use a "
                   "shorter interval or a smaller amount")
    scope = _choice(raw, "scope", SCOPES, "user", fail)
    model = raw.get("model")
    if model is not None and (not isinstance(model, str)
                              or (models is not None and model not in models)):
        raise fail("model", model, f"limit {index + 1}: model {model!r} is not in [[models]]")
    limit_id = raw.get("id") or "-".join(
        x for x in (metric.replace(":", "-"), None if window.kind == "none" else
                    spec.replace(":", "-").replace("/", "per"), model, scope
                    if scope != "user" else None) if x)
    if not isinstance(limit_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", limit_id):
        raise fail("id", limit_id, f"limit {index + 1}: id must be 1-80 letters, digits, "
                   "'_', '-' or '.'")
    names = raw.get("name")
    if isinstance(names, str):
        names = {"en": names}
    if names is not None and (not isinstance(names, dict) or not names or not all(
            isinstance(k, str) and re.fullmatch(r"[a-z]{2}", k) and isinstance(v, str)
            and 0 < len(v) <= 80 and v.isprintable() for k, v in names.items())):
        raise fail("name", names, f"limit {index + 1}: name must be text (1-80 characters) "
                   "or a table of languages, e.g. { en = \"Daily tokens\", de = \"Tokens am "
                   "Tag\" }")
    meter = meters.get(metric.removeprefix(METER_PREFIX)) if metric.startswith(
        METER_PREFIX) else None
    return LimitSpec(id=limit_id, metric=metric, window=window, amount=amount, scope=scope,
                     model=model, names=tuple(sorted((names or {}).items())),
                     unit=meter.unit if meter else None)


def _meter_metric(metric: str, raw: dict[str, Any], index: int, fail: Any,
                  meters: dict[str, MeterConfig]) -> None:
    meter = meters.get(metric.removeprefix(METER_PREFIX))
    if meter is None:
        raise fail("metric", metric, f"limit {index + 1}: {metric!r} names no meter in "
                   f"[[meters]] (known: {', '.join(sorted(meters)) or 'none'})")
    if meter.aggregation not in ("sum", "count"):
        # a max is no running total, and a unique count needs the window's keys: neither
        # can be reserved as a counter
        raise fail("metric", metric, f"limit {index + 1}: meter {meter.id!r} aggregates by "
                   f"{meter.aggregation}; only sum and count meters can be limited")
    if "model" in raw:
        raise fail("model", raw["model"], f"limit {index + 1}: a meter limit applies to no model")


def _amount(metric: str, value: Any, index: int, fail: Any) -> int:
    if metric.startswith(METER_PREFIX):
        micro = parse_value(value)
        if micro is None or not 0 < micro <= MAX_METER_AMOUNT:
            raise fail("amount", value, f"limit {index + 1}: a meter amount is a number of its "
                       f"units above 0 and at most {MAX_METER_AMOUNT // METER_SCALE:,} (at most "
                       f"6 decimals, as a string if not whole); got {value!r}")
        return micro
    if metric == "cost_usd":
        try:
            usd = Decimal(str(value)) if isinstance(value, (str, int, Decimal)) else None
        except InvalidOperation:
            usd = None
        if (usd is None or not usd.is_finite() or usd <= 0 or usd > MAX_COST_USD
                or usd != usd.quantize(Decimal("0.000001"))):
            raise fail("amount", value, f"limit {index + 1}: a cost_usd amount is USD with at "
                       f"most 6 decimals, above 0 and at most {MAX_COST_USD}; got {value!r}")
        return int(usd * PICO_PER_USD)
    if not _is_int(value) or not 1 <= value <= MAX_AMOUNT[metric]:
        raise fail("amount", value, f"limit {index + 1}: amount must be a whole number from 1 "
                   f"to {MAX_AMOUNT[metric]:,} {metric}; got {value!r}")
    return int(value)


def _choice(table: dict[str, Any], key: str, allowed: tuple[str, ...], default: str,
            fail: Any) -> str:
    value = table.get(key, default)
    if value not in allowed:
        raise fail(key, value, f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
