"""Configuration: MLANE_* environment variables plus an optional TOML file (MLANE_CONFIG)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

# ConfigError lives with the cost parsers, which raise it too; it is imported from here.
from core.costs import ConfigError as ConfigError
from core.costs import GpuCost, parse_finance, parse_gpu_cost
from core.meters import MeterConfig, parse_meters

LIMIT_STORES = ("auto", "redis", "sql")
STRIPE_API_VERSION = "2026-10-28.endive"  # the version the pinned stripe library speaks

DEFAULT_DATA_DIR = "var"
PRICE_FIELDS = ("input", "cached_input", "output", "reasoning", "cache_write", "request_fee")


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens, exact. Missing cached_input/reasoning fall back to input/output."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None
    cache_write: Decimal | None = None   # USD per 1M tokens written to a prompt cache
    request_fee: Decimal | None = None   # USD per call


UPSTREAM_APIS = ("chat", "responses")


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    api_key: str | None = None
    api_key_env: str | None = None  # the variable the key is read from, when the file names one
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    # The router's view of the upstream: calls in flight (per gateway process) at which it is
    # saturated and routed calls overflow to the next candidate (None: no cap); failures in a
    # row (connection, timeout, 429, 5xx) that open its circuit, and for how long.
    max_concurrency: int | None = None
    breaker_failures: int = 3
    breaker_cooldown_s: float = 10.0
    # A local GPU server's cost per hour (fully loaded), allocated to the calls it serves.
    cost: GpuCost | None = None
    # The API it speaks for /v1/responses calls: "responses" (OpenAI's Responses API: such
    # calls are forwarded as they are) or "chat" (they are translated to chat completions).
    api: str = "chat"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    upstream: str
    upstream_model: str
    price: ModelPrice | None = None
    tokenizer: str | None = None
    # The field that caps output when the gateway must clip a chat call the client did not
    # cap itself (OpenAI's reasoning models take only max_completion_tokens).
    max_tokens_param: str = "max_tokens"
    # Which plans may call it (a plan lists the tiers it may use) and how many credits each of
    # its tokens costs on a plan with credit multipliers.
    tier: str = "standard"
    # What the router may send it: 1 simple tasks, 2 moderate (tools, code, long prompts),
    # 3 hard (high reasoning effort, very long prompts).
    level: int = 2


@dataclass(frozen=True)
class AliasConfig:
    """A model name the router resolves: `models` are its candidates."""

    name: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    database_url: str = ""
    redis_url: str | None = None
    redis_cluster: bool = False  # MLANE_REDIS_CLUSTER=1: the URL names a Redis Cluster node
    redis_prefix: str = "ml:"  # every Redis key starts with it (share a Redis between deployments)
    data_dir: str = DEFAULT_DATA_DIR
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    aliases: tuple[AliasConfig, ...] = ()
    meters: tuple[MeterConfig, ...] = ()  # [[meters]]: what apps meter besides tokens
    max_body_bytes: int = 8 * 1024 * 1024
    # Connections each process may hold (Postgres); serve sets these so that its workers fit
    # the server's max_connections.
    db_pool_size: int = 10
    db_max_overflow: int = 20
    # Seconds a request waits for a free connection before it is answered 503 (Retry-After).
    db_pool_timeout: float = 10.0
    auto_migrate: bool | None = None
    key_cache_seconds: float = 2.0
    user_key_ttl_seconds: int = 3600
    user_key_max_ttl_seconds: int = 7 * 24 * 3600
    # [[plans]] tables as read; plans.catalog parses and checks them at start.
    plans_raw: tuple[dict[str, Any], ...] = ()
    packs_raw: tuple[dict[str, Any], ...] = ()  # [[credit_packs]], parsed with the plans
    config_text: str = ""
    # [limits]: where counters live ("auto": Redis when MLANE_REDIS_URL is set, else the
    # database) and how long a lease holds its reservation if it is never settled.
    limits_store: str = "auto"
    lease_seconds: int = 600
    # [metering] max_event_age: how far in the past a reported event's time may lie (Stripe
    # takes meter events up to 35 days old).
    max_event_age_seconds: int = 35 * 86400
    # Stripe: secrets from the environment (MLANE_STRIPE_API_KEY, MLANE_STRIPE_WEBHOOK_SECRET),
    # the rest from [stripe]. The API version is pinned: Stripe's objects change shape with it.
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_version: str = STRIPE_API_VERSION
    stripe_api_base: str | None = None  # a Stripe-compatible server (tests: a fake on loopback)
    stripe_collect_terms_consent: bool = True  # Checkout's own terms-of-service consent
    # MLANE_TRUSTED_PROXIES=N: the service sits behind N proxies; the client address is read
    # from their X-Forwarded-For (consent records keep it).
    trusted_proxies: int = 0
    # MLANE_TOKENIZER_SOCKET: serve's tokenizer process, which counts for its workers
    # (metering/tokenserver.py; serve sets it).
    tokenizer_socket: str | None = None
    # [paywall]: the percents of a quota at which a threshold event goes to the app.
    paywall_thresholds: tuple[int, ...] = (50, 80, 100)
    # [finance] usd_per: USD per unit of each revenue currency (exact decimals).
    finance_usd_per: tuple[tuple[str, Decimal], ...] = (("usd", Decimal(1)),)
    # MLANE_WEBHOOKS_ALLOW_PRIVATE=1: webhooks may go to private and loopback addresses.
    webhooks_allow_private: bool = False
    # MLANE_JOB_INTERVALS="overage=300,notices=900": seconds between runs of scheduled jobs
    # (`meterlane worker`), for the jobs named; the others keep their defaults.
    job_intervals: tuple[tuple[str, int], ...] = ()
    # Operations. MLANE_LOG_FORMAT: "text" (read by a person at a terminal) or "json" (one
    # object a line, for a log collector). MLANE_METRICS_KEY: /metrics asks for it as a
    # Bearer key. Traces: on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set (spans go there
    # over OTLP/HTTP); `tracing` without an endpoint uses the process's own tracer provider.
    log_format: str = "text"
    metrics_key: str | None = None
    otel_endpoint: str | None = None
    tracing: bool = False

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.models)

    @property
    def embedded(self) -> bool:
        """True when running on the embedded SQLite default."""
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.embedded if self.auto_migrate is None else self.auto_migrate

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def meter(self, meter_id: str) -> MeterConfig | None:
        return next((m for m in self.meters if m.id == meter_id), None)

    def alias(self, name: str) -> AliasConfig | None:
        for alias in self.aliases:
            if alias.name == name:
                return alias
        return None

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise ConfigError(f"unknown upstream {name!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the config from MLANE_* variables and the TOML file MLANE_CONFIG names."""
        env = os.environ if environ is None else environ
        data_dir = env.get("MLANE_DATA_DIR", DEFAULT_DATA_DIR)
        database_url = env.get("MLANE_DATABASE_URL") or default_sqlite_url(data_dir)
        file_settings: dict[str, Any] = {}
        config_path = env.get("MLANE_CONFIG")
        if config_path:
            file_settings = load_toml(Path(config_path), env)
        return cls(
            database_url=database_url,
            redis_url=env.get("MLANE_REDIS_URL") or None,
            redis_prefix=env.get("MLANE_REDIS_PREFIX") or "ml:",
            redis_cluster=bool(_bool_or_none(env.get("MLANE_REDIS_CLUSTER"))),
            data_dir=data_dir,
            max_body_bytes=_int(env, "MLANE_MAX_BODY_BYTES", cls.max_body_bytes),
            db_pool_size=max(1, _int(env, "MLANE_DB_POOL_SIZE", cls.db_pool_size)),
            db_max_overflow=max(0, _int(env, "MLANE_DB_MAX_OVERFLOW", cls.db_max_overflow)),
            db_pool_timeout=max(0.01, float(env.get("MLANE_DB_POOL_TIMEOUT",
                                                    cls.db_pool_timeout))),
            auto_migrate=_bool_or_none(env.get("MLANE_AUTO_MIGRATE")),
            key_cache_seconds=float(env.get("MLANE_KEY_CACHE_SECONDS", cls.key_cache_seconds)),
            webhooks_allow_private=bool(_bool_or_none(env.get("MLANE_WEBHOOKS_ALLOW_PRIVATE"))),
            trusted_proxies=_proxies(env),
            job_intervals=_job_intervals(env.get("MLANE_JOB_INTERVALS", "")),
            stripe_api_key=env.get("MLANE_STRIPE_API_KEY") or None,
            stripe_webhook_secret=env.get("MLANE_STRIPE_WEBHOOK_SECRET") or None,
            log_format=log_format(env),
            metrics_key=env.get("MLANE_METRICS_KEY") or None,
            tokenizer_socket=env.get("MLANE_TOKENIZER_SOCKET") or None,
            otel_endpoint=(endpoint := otel_traces_endpoint(env)),
            tracing=endpoint is not None,
            **file_settings,
        )


def _job_intervals(value: str) -> tuple[tuple[str, int], ...]:
    found = []
    for item in filter(None, (p.strip() for p in value.split(","))):
        name, _, seconds = item.partition("=")
        if not re.fullmatch(r"[a-z_]{1,64}", name.strip()) or not seconds.strip().isdigit() \
                or not 1 <= int(seconds) <= 7 * 86400:
            raise ConfigError("MLANE_JOB_INTERVALS must be like 'overage=300,notices=900': "
                              "a job's name and whole seconds from 1 to 604800")
        found.append((name.strip(), int(seconds)))
    return tuple(found)
LOG_FORMATS = ("text", "json")


def log_format(env: Mapping[str, str]) -> str:
    value = (env.get("MLANE_LOG_FORMAT") or "text").strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"MLANE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                          f"not {value!r}")
    return value


def otel_traces_endpoint(env: Mapping[str, str]) -> str | None:
    """Where spans go (OpenTelemetry's own variables): the traces endpoint as given, else the
    base endpoint's /v1/traces; None (tracing off) when neither is set, or the SDK is
    disabled (OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none)."""
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true" \
            or (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower() == "none":
        return None
    traces = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
    if traces:
        return traces
    base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    return base.rstrip("/") + "/v1/traces" if base else None


def _proxies(env: Mapping[str, str]) -> int:
    hops = _int(env, "MLANE_TRUSTED_PROXIES", 0)
    if not 0 <= hops <= 10:
        raise ConfigError("MLANE_TRUSTED_PROXIES must be a whole number from 0 to 10")
    return hops


SECTIONS = {"upstreams": "[[upstreams]]", "models": "[[models]]", "aliases": "[[aliases]]",
            "limits": "[limits]", "plans": "[[plans]]", "credit_packs": "[[credit_packs]]",
            "stripe": "[stripe]", "paywall": "[paywall]", "finance": "[finance]",
            "metering": "[metering]", "meters": "[[meters]]"}


def _unique(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"two {kind} are named {name!r}: names must be unique")
        seen.add(name)


def default_sqlite_url(data_dir: str) -> str:
    return f"sqlite:///{Path(data_dir).absolute() / 'meterlane.db'}"


def load_toml(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Parse the TOML config; floats become Decimal so prices stay exact."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text, parse_float=Decimal)
    except FileNotFoundError as exc:
        raise ConfigError(f"MLANE_CONFIG names {path}, which does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return settings_from(raw, text, env, str(path))


def settings_from(raw: dict[str, Any], text: str, env: Mapping[str, str],
                  path: str = "the config") -> dict[str, Any]:
    """The Config fields a parsed TOML file sets (`text` is its source, for line numbers)."""
    upstreams = tuple(_upstream(u, env) for u in _tables(raw, "upstreams"))
    _unique("upstreams", [u.name for u in upstreams])
    names = {u.name for u in upstreams}
    models = tuple(_model(m, names) for m in _tables(raw, "models"))
    _unique("models", [m.name for m in models])
    aliases = tuple(_alias(a, {m.name for m in models}) for a in _tables(raw, "aliases"))
    _unique("aliases", [a.name for a in aliases])
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:  # a typo such as [[model]] must not silently drop the models
        raise ConfigError(f"{path}: unknown settings {unknown}; expected "
                          + ", ".join(SECTIONS.values()))
    return {"upstreams": upstreams, "models": models, "aliases": aliases,
            "meters": parse_meters(_tables(raw, "meters"), text),
            "plans_raw": tuple(_tables(raw, "plans")), "config_text": text,
            "packs_raw": tuple(_tables(raw, "credit_packs")),
            **_limits(raw.get("limits", {})), **_stripe(raw.get("stripe", {})),
            **_paywall(raw.get("paywall", {})), **parse_finance(raw.get("finance", {})),
            **_metering(raw.get("metering", {}))}


def _paywall(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("[paywall] must be a table")
    unknown = sorted(set(table) - {"thresholds"})
    if unknown:
        raise ConfigError(f"[paywall]: unknown settings {unknown}; expected thresholds")
    thresholds = table.get("thresholds", [50, 80, 100])
    if not isinstance(thresholds, list) or not all(_whole(t, 1, 100) for t in thresholds):
        raise ConfigError("[paywall]: thresholds must be a list of percents from 1 to 100")
    return {"paywall_thresholds": tuple(sorted(set(thresholds)))}


def _stripe(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("[stripe] must be a table")
    unknown = sorted(set(table) - {"api_version", "api_base", "collect_terms_consent"})
    if unknown:
        raise ConfigError(f"[stripe]: unknown settings {unknown}; expected api_version, "
                          "api_base (the keys come from MLANE_STRIPE_API_KEY and "
                          "MLANE_STRIPE_WEBHOOK_SECRET)")
    version = table.get("api_version", STRIPE_API_VERSION)
    if not isinstance(version, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}(\.\w+)?", version):
        raise ConfigError("[stripe]: api_version must be a Stripe API version like "
                          f"{STRIPE_API_VERSION!r}")
    base = table.get("api_base")
    if base is not None and (not isinstance(base, str) or not base.startswith("http")):
        raise ConfigError("[stripe]: api_base must be an http(s) URL")
    collect = table.get("collect_terms_consent", True)
    if not isinstance(collect, bool):
        raise ConfigError("[stripe]: collect_terms_consent must be true or false")
    return {"stripe_api_version": version, "stripe_api_base": base,
            "stripe_collect_terms_consent": collect}


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _metering(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("[metering] must be a table")
    unknown = sorted(set(table) - {"max_event_age"})
    if unknown:
        raise ConfigError(f"[metering]: unknown settings {unknown}; expected max_event_age")
    age = table.get("max_event_age", "35d")
    found = re.fullmatch(r"(\d{1,7})([smhd])", age) if isinstance(age, str) else None
    seconds = int(found[1]) * _AGE_UNITS[found[2]] if found else age
    if not _whole(seconds, 60, 400 * 86400):
        raise ConfigError("[metering]: max_event_age must be a duration from 60s to 400d, "
                          "like \"35d\", \"12h\" or a whole number of seconds")
    return {"max_event_age_seconds": seconds}


def _limits(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("[limits] must be a table")
    unknown = sorted(set(table) - {"store", "lease_seconds"})
    if unknown:
        raise ConfigError(f"[limits]: unknown settings {unknown}; expected store, lease_seconds")
    store = table.get("store", "auto")
    if store not in LIMIT_STORES:
        raise ConfigError(f"[limits]: store must be one of {', '.join(LIMIT_STORES)}")
    lease = table.get("lease_seconds", 600)
    if not isinstance(lease, int) or isinstance(lease, bool) or not 5 <= lease <= 86400:
        raise ConfigError("[limits]: lease_seconds must be a whole number from 5 to 86400")
    return {"limits_store": store, "lease_seconds": lease}


def _tables(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"[[{key}]] must be an array of tables")
    return value


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _upstream(table: dict[str, Any], env: Mapping[str, str]) -> UpstreamConfig:
    name = _str(table, "name", "[[upstreams]]")
    where = f"upstream {name!r}"
    base_url = _str(table, "base_url", where).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url must start with http:// or https://")
    api_key = table.get("api_key")
    key_env = table.get("api_key_env")
    if key_env is not None:
        key_env = _str(table, "api_key_env", where)
        api_key = env.get(key_env) or None
    cap = table.get("max_concurrency")
    if cap is not None and not _whole(cap, 1, 100_000):
        raise ConfigError(f"{where}: max_concurrency must be a whole number from 1 to 100000")
    failures = table.get("breaker_failures", 3)
    if not _whole(failures, 1, 1000):
        raise ConfigError(f"{where}: breaker_failures must be a whole number from 1 to 1000")
    cooldown = table.get("breaker_cooldown", 10)
    if isinstance(cooldown, bool) or not isinstance(cooldown, (int, Decimal)) \
            or not 0 < cooldown <= 3600:
        raise ConfigError(f"{where}: breaker_cooldown must be seconds, more than 0, at most 3600")
    api = table.get("api", "chat")
    if api not in UPSTREAM_APIS:
        raise ConfigError(f"{where}: api must be \"chat\" or \"responses\", got {api!r}")
    return UpstreamConfig(
        name=name, base_url=base_url, api_key=api_key, api_key_env=key_env, api=api,
        connect_timeout_s=_seconds(table, "connect_timeout", 5, 600, where),
        read_timeout_s=_seconds(table, "timeout", 600, 86_400, where),
        max_concurrency=cap, breaker_failures=failures, breaker_cooldown_s=float(cooldown),
        cost=parse_gpu_cost(table["cost"], where) if "cost" in table else None,
    )


def _seconds(table: dict[str, Any], key: str, default: float, high: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)) \
            or not 0 < value <= high:
        raise ConfigError(f"{where}: {key} must be seconds, more than 0, at most {high:,g}")
    return float(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def parse_alias_models(value: Any, where: str, models: set[str]) -> tuple[str, ...]:
    """An alias's candidate models: a non-empty list of configured model names."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: models must be a non-empty list of model names")
    unknown = [v for v in value if v not in models]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not a model in [[models]]")
    return tuple(dict.fromkeys(value))


def _alias(table: dict[str, Any], models: set[str]) -> AliasConfig:
    name = _str(table, "name", "[[aliases]]")
    where = f"alias {name!r}"
    if len(name) > 100:
        raise ConfigError(f"{where}: an alias name is at most 100 characters")
    if name in models:
        raise ConfigError(f"{where}: a model has this name; an alias needs its own")
    unknown = sorted(set(table) - {"name", "models"})
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; expected name, models")
    return AliasConfig(name=name, models=parse_alias_models(table.get("models"), where, models))


def _model(table: dict[str, Any], upstreams: set[str]) -> ModelConfig:
    name = _str(table, "name", "[[models]]")
    where = f"model {name!r}"
    upstream = _str(table, "upstream", where)
    if upstream not in upstreams:
        raise ConfigError(f"{where}: upstream {upstream!r} is not defined in [[upstreams]]")
    price = _price(table["price"], where) if "price" in table else None
    tokenizer = table.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ConfigError(f"{where}: tokenizer must be an encoding name such as 'o200k_base'")
    param = table.get("max_tokens_param", "max_tokens")
    if param not in ("max_tokens", "max_completion_tokens"):
        raise ConfigError(f"{where}: max_tokens_param must be max_tokens or max_completion_tokens")
    tier = table.get("tier", "standard")
    if not isinstance(tier, str) or not re.fullmatch(r"[a-z0-9_-]{1,32}", tier):
        raise ConfigError(f"{where}: tier must be 1-32 lowercase letters, digits, '_' or '-', "
                          f"got {tier!r}")
    level = table.get("level", 2)
    if not _whole(level, 1, 3):
        raise ConfigError(f"{where}: level must be 1 (simple tasks), 2 (moderate) or 3 (hard)")
    return ModelConfig(
        name=name, upstream=upstream,
        upstream_model=_str(table, "upstream_model", where, default=name),
        price=price, tokenizer=tokenizer, max_tokens_param=param, tier=tier, level=level,
    )


MAX_PRICE_USD = Decimal(20_000)  # per 1M tokens, or per call for request_fee


def _price(table: Any, where: str) -> ModelPrice:
    if not isinstance(table, dict):
        raise ConfigError(
            f"{where}: price must be a table like {{ input = \"0.15\", output = \"0.60\" }}")
    unknown = set(table) - set(PRICE_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown price fields {sorted(unknown)}")
    values: dict[str, Decimal] = {}
    for key, value in table.items():
        try:
            amount = Decimal(str(value)) if isinstance(value, (str, int, Decimal)) else None
        except ArithmeticError:
            amount = None
        if amount is None or not amount.is_finite() or amount < 0:
            raise ConfigError(f"{where}: price.{key} must be a non-negative decimal, got {value!r}")
        if amount > MAX_PRICE_USD:  # as the price API: a call's cost stays inside 64 bits
            raise ConfigError(f"{where}: price.{key} is more than {MAX_PRICE_USD:,} USD")
        if amount.as_tuple().exponent < -6:  # type: ignore[operator]
            raise ConfigError(f"{where}: price.{key} has more than 6 decimal places")
        values[key] = amount
    for required in ("input", "output"):
        if required not in values:
            raise ConfigError(f"{where}: price.{required} is required")
    return ModelPrice(**values)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env.get(key, default))
    except ValueError as exc:
        raise ConfigError(f"{key} must be an integer") from exc


def _bool_or_none(value: str | None) -> bool | None:
    if value is None or value == "":
        return None
    return value.strip().lower() in {"1", "true", "yes", "on"}
