"""create_app(config) -> Flask: builds every client once; blueprints and error handlers."""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Response, g
from marshmallow import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, OperationalError
from werkzeug.exceptions import HTTPException

from meterlane.core.auth import AuthService
from meterlane.core.config import Config, ConfigError
from meterlane.core.db import make_engine
from meterlane.core.errors import DATABASE_UNAVAILABLE, DomainError, InvalidRequestError, problem
from meterlane.core.events import EventService
from meterlane.core.keys import KeyService
from meterlane.core.metrics import Metrics
from meterlane.core.tenancy import TenancyService
from meterlane.finance.prices import PriceBook
from meterlane.finance.service import FinanceService
from meterlane.gateway.router import Router
from meterlane.gateway.service import GatewayService
from meterlane.gateway.upstream import UpstreamClient
from meterlane.metering.accrual import AccrualService
from meterlane.metering.ledger import LedgerWriter
from meterlane.metering.limits import LimitsService
from meterlane.metering.limitstore import LimitStore, SqlLimitStore
from meterlane.metering.service import MeteringService
from meterlane.metering.tokens import TokenizerRegistry
from meterlane.paywall.acknowledge import Acknowledger
from meterlane.paywall.cancel_flow import CancelFlow
from meterlane.paywall.evidence import EvidenceService
from meterlane.paywall.notices import NoticeService
from meterlane.paywall.service import PaywallService
from meterlane.paywall.withdrawals import WithdrawalService
from meterlane.plans.billing import BillingService
from meterlane.plans.catalog import Catalog
from meterlane.plans.checkout import CheckoutService
from meterlane.plans.credits import CreditsService
from meterlane.plans.overage import OverageReporter
from meterlane.plans.service import PlanService
from meterlane.plans.stripe_sync import stripe_client
from meterlane.plans.subscriptions import SubscriptionService

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Wiring:
    """Every long-lived client of one app instance; built once in create_app."""

    config: Config
    engine: Engine
    auth: AuthService
    keys: KeyService
    tenancy: TenancyService
    ledger: LedgerWriter
    metering: MeteringService
    limits: LimitsService
    plans: PlanService
    gateway: GatewayService
    metrics: Metrics
    redis: Any | None
    credits: CreditsService
    accrual: AccrualService
    billing: BillingService
    checkout: CheckoutService
    overage: OverageReporter
    subscriptions: SubscriptionService
    events: EventService
    paywall: PaywallService
    acknowledger: Acknowledger
    notices: NoticeService
    withdrawals: WithdrawalService
    cancel_flow: CancelFlow
    evidence: EvidenceService
    finance: FinanceService

    @staticmethod
    def json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None,
             mimetype: str = "application/json") -> Response:
        return Response(orjson.dumps(body), status=status, headers=headers, mimetype=mimetype)


@functools.cache
def _tokenizers() -> TokenizerRegistry:
    # The vocabularies are immutable and take a second to load: share them across apps.
    return TokenizerRegistry.load()


def _check_cooperative_driver() -> None:
    """Under gevent, psycopg must have been imported after patching, or every query blocks
    the whole worker (psycopg picks its wait function at import)."""
    monkey = sys.modules.get("gevent.monkey")
    waiting = sys.modules.get("psycopg.waiting")
    if monkey is None or waiting is None or not monkey.is_module_patched("select"):
        return
    if waiting.wait is getattr(waiting, "wait_c", None):
        raise RuntimeError("psycopg was imported before gevent patched the standard library; "
                           "its queries would block every request of this worker")


def build_wiring(config: Config, *, check_schema: bool = True) -> Wiring:
    from meterlane.migrations import ensure_schema_current

    engine = make_engine(config.database_url)
    if check_schema:
        ensure_schema_current(engine)
    _check_cooperative_driver()
    redis_client: Any = None
    if config.redis_url:
        import redis

        if config.redis_cluster:
            from redis.cluster import RedisCluster

            redis_client = RedisCluster.from_url(config.redis_url, socket_timeout=2,
                                                 socket_connect_timeout=2)
        else:
            redis_client = redis.Redis.from_url(config.redis_url, socket_timeout=2,
                                                socket_connect_timeout=2)
    auth = AuthService(engine, cache_seconds=config.key_cache_seconds)
    tenancy = TenancyService(engine)
    ledger = LedgerWriter(engine, Path(config.data_dir) / "spool")
    metering = MeteringService(engine, ledger, _tokenizers())
    # re-read at most once a second (tests run with no key cache: still no read per call)
    prices = PriceBook(engine, config.models, refresh_seconds=max(1.0, config.key_cache_seconds))
    metering.prices = prices
    metrics = Metrics()
    catalog = Catalog.from_config(config)
    if check_schema and catalog.plans:
        from meterlane.plans.versions import PlanChangedError, ensure_unchanged

        try:
            ensure_unchanged(engine, catalog)
        except PlanChangedError as exc:
            raise ConfigError(str(exc)) from exc
    plans = PlanService(engine, catalog, cache_seconds=config.key_cache_seconds)
    metering.plan_of = functools.partial(_plan_id, plans)
    credits = CreditsService(engine, cache_seconds=config.key_cache_seconds)
    accrual = AccrualService(engine, credits, plans, config.models)
    limits = LimitsService(catalog, limit_store(config, engine, redis_client), plans, engine,
                           config.models, lease_seconds=config.lease_seconds,
                           extra_allowance=accrual.extra_allowance)
    billing = BillingService(engine, catalog, plans, credits,
                             webhook_secret=config.stripe_webhook_secret,
                             allowance_used=limits.allowance_used)
    checkout = CheckoutService(engine, catalog, functools.partial(stripe_client, config),
                               collect_terms_consent=config.stripe_collect_terms_consent)
    overage = OverageReporter(engine, functools.partial(stripe_client, config))
    subscriptions = SubscriptionService(engine, catalog,
                                        functools.partial(stripe_client, config))
    events = EventService(engine, allow_private=config.webhooks_allow_private)
    paywall = PaywallService(engine, events, catalog, config.models)
    limits.on_limit_event = paywall.on_limit_event
    limits.price_of = metering.price_of
    acknowledger = Acknowledger(engine, events, catalog)
    billing.after_event = acknowledger.on_stripe_event
    notices = NoticeService(engine, events, catalog)
    withdrawals = WithdrawalService(engine, events, catalog, subscriptions)
    cancel_flow = CancelFlow(engine, events, catalog, subscriptions, paywall,
                             redis=redis_client, redis_prefix=config.redis_prefix)
    evidence = EvidenceService(engine, subscriptions, paywall, notices, withdrawals,
                               cancel_flow)
    finance = FinanceService(engine, config, prices,
                             lambda end_user_id: _plan_id(plans, end_user_id) or "none")
    limits.thresholds = config.paywall_thresholds
    upstreams = {u.name: UpstreamClient(u) for u in config.upstreams}
    router = Router(config, frozenset(a for plan in catalog.plans for a, _ in plan.aliases))
    gateway = GatewayService(config, tenancy, metering, upstreams, metrics, limits, plans, router)
    return Wiring(config=config, engine=engine, auth=auth, keys=KeyService(auth, tenancy),
                  tenancy=tenancy, ledger=ledger, metering=metering, limits=limits,
                  plans=plans, gateway=gateway, metrics=metrics, redis=redis_client,
                  credits=credits, accrual=accrual, billing=billing, checkout=checkout,
                  overage=overage, subscriptions=subscriptions, events=events,
                  paywall=paywall, acknowledger=acknowledger, notices=notices,
                  withdrawals=withdrawals, cancel_flow=cancel_flow, evidence=evidence,
                  finance=finance)


def _plan_id(plans: PlanService, end_user_id: int) -> str | None:
    """The plan an end user is on now (None: no plans are configured)."""
    try:
        return plans.plan_of(end_user_id).plan.id
    except DomainError:
        return None


def limit_store(config: Config, engine: Engine, redis_client: Any | None) -> LimitStore:
    """Redis when configured (several instances share it), else the database."""
    store = config.limits_store
    if store == "redis" and redis_client is None:
        raise ConfigError("[limits] store = \"redis\" needs MLANE_REDIS_URL")
    if redis_client is not None and store in ("auto", "redis"):
        from meterlane.metering.redislimits import RedisLimitStore

        return RedisLimitStore(redis_client, config.redis_prefix)
    return SqlLimitStore(engine)


def create_app(config: Config | None = None) -> Flask:
    config = config or Config.from_env()
    app = Flask("meterlane")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    if config.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app,  # type: ignore[method-assign]
                                x_for=config.trusted_proxies, x_proto=1)
    app.extensions["wiring"] = wiring = build_wiring(config)
    spooled = wiring.ledger.replay()
    if spooled:
        log.warning("replayed %d spooled usage records into the ledger", spooled)

    from meterlane.core.api import bp as keys_bp
    from meterlane.finance.api import bp as finance_bp
    from meterlane.finance.api import page_bp as finance_page_bp
    from meterlane.gateway.api import anthropic_bp
    from meterlane.gateway.api import bp as gateway_bp
    from meterlane.metering.api import bp as metering_bp
    from meterlane.metering.credits_api import bp as credits_bp
    from meterlane.metering.limits_api import bp as limits_bp
    from meterlane.ops import bp as ops_bp
    from meterlane.paywall.api import bp as paywall_bp
    from meterlane.paywall.api import widget_bp
    from meterlane.paywall.lifecycle_api import bp as lifecycle_bp
    from meterlane.paywall.lifecycle_api import kuendigen_bp
    from meterlane.plans.api import bp as plans_bp

    for bp in (gateway_bp, anthropic_bp, keys_bp, metering_bp, limits_bp, credits_bp, plans_bp,
               paywall_bp, widget_bp, lifecycle_bp, kuendigen_bp, finance_bp, finance_page_bp,
               ops_bp):
        app.register_blueprint(bp)
    _register_hooks(app)
    return app


def _string_keys(value: Any) -> Any:
    """marshmallow names a list item by its index (an int): JSON keys are strings."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> None:
        g.request_id = f"req_{uuid.uuid4().hex}"

    @app.after_request
    def tag_response(response: Response) -> Response:
        response.headers["X-Meterlane-Request-Id"] = g.get("request_id", "")
        return response

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError) -> Response:
        return _problem(exc.status, exc.title, exc.detail, slug=exc.slug,
                        extra=exc.extra, headers=exc.headers)

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError) -> Response:
        log.error("database unavailable in request %s: %s", g.get("request_id"), exc)
        return domain_error(DATABASE_UNAVAILABLE)

    @app.errorhandler(DataError)
    def unstorable(exc: DataError) -> Response:
        # the database refused a value (a NUL character, text too long): the input's fault
        log.info("request %s: the database refused a value: %s", g.get("request_id"), exc.orig)
        return domain_error(InvalidRequestError(
            "The request holds a value that cannot be stored (a NUL character, or text too "
            "long)."))

    @app.errorhandler(ValidationError)
    def validation_error(exc: ValidationError) -> Response:
        return _problem(422, "Invalid request", "The request did not validate.",
                        slug="validation", extra={"errors": _string_keys(exc.messages)})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _problem(exc.code or 500, exc.name, exc.description or exc.name, slug=None)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error in request %s", g.get("request_id"))
        return _problem(500, "Internal error",
                        "Something went wrong on our side; the request id identifies it.",
                        slug="internal")


def _problem(status: int, title: str, detail: str, *, slug: str | None,
             extra: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> Response:
    doc = problem(status, title, detail, slug=slug,
                  instance=f"urn:uuid:{g.get('request_id', 'req_')[4:]}", extra=extra)
    return Wiring.json(doc, status=status, headers=headers, mimetype=PROBLEM_JSON)
