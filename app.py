"""Meterlane's composition root: create_app(config) -> Flask builds every part once and mounts
every blueprint; `main` is the `meterlane` command, each package adding its own commands.

The service's modules are imported inside the functions that build it: `meterlane serve`
imports this module in gunicorn's master, which must not load the database driver or the HTTP
clients before each worker's gevent has patched the standard library.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from core.cli import CommandContext, LoggedGroup, child_error
from core.config import Config, ConfigError

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.engine import Engine

    from core.audit import AuditService
    from core.auth import AuthService
    from core.events import EventService
    from core.idempotency import IdempotencyService
    from core.jobs import Job, JobBoard
    from core.keys import KeyService
    from core.metrics import Metrics
    from core.parts import Parts
    from core.tenancy import TenancyService
    from core.tracing import Tracing
    from finance.service import FinanceService
    from gateway.service import GatewayService
    from metering.accrual import AccrualService
    from metering.ledger import LedgerWriter
    from metering.limits import LimitsService
    from metering.limitstore import LimitStore
    from metering.meters import MeterService
    from metering.service import MeteringService
    from metering.tokens import TokenizerRegistry
    from paywall.acknowledge import Acknowledger
    from paywall.cancel_flow import CancelFlow
    from paywall.evidence import EvidenceService
    from paywall.notices import NoticeService
    from paywall.service import PaywallService
    from paywall.withdrawals import WithdrawalService
    from plans.billing import BillingService
    from plans.checkout import CheckoutService
    from plans.credits import CreditsService
    from plans.meter_stripe import MeterOverageReporter
    from plans.overage import OverageReporter
    from plans.service import PlanService
    from plans.subscriptions import SubscriptionService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    """Every long-lived part of one app instance; built once in build_wiring."""

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
    tracing: Tracing
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
    audit: AuditService
    jobs: JobBoard
    idempotency: IdempotencyService
    meters: MeterService
    meter_overage: MeterOverageReporter

    def parts(self) -> Parts:
        """Each part found by its class (how blueprints and commands reach them)."""
        from core.parts import Parts, Readiness

        ready = Readiness()
        ready.add("database", functools.partial(_database_ready, self.engine))
        if self.redis is not None:
            ready.add("redis", functools.partial(_redis_ready, self.redis))
        ledger = self.ledger
        ready.add("ledger_writer", lambda: None if ledger.writer_alive() else "stopped")
        ready.add_gauge("ledger_quarantined", "Usage records the database refused, kept in "
                        "quarantine for an operator", ledger.quarantine.count)
        ready.add("jobs", self.jobs.overdue, fails=False)  # reported, never unready
        ready.add_exporter(self.jobs.prometheus)
        ready.add_gauge("ledger_spooled", "Usage records spooled to disk while the database "
                        "was away, waiting for the next replay", ledger.spooled)
        relayed = self.metering.relayed
        if relayed is not None:
            ready.add_gauge("meter_events_spooled", "Meter events of relayed calls (web "
                            "searches) spooled while the database was away", relayed.spooled)
        return Parts([*(getattr(self, f.name) for f in fields(self) if f.name != "redis"),
                      ready])


def _database_ready(engine: Engine) -> None:
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _redis_ready(client: Any) -> str | None:
    return None if client.ping() else "no answer to PING"


@functools.cache
def _tokenizers(socket: str | None) -> TokenizerRegistry:
    from metering.tokens import TokenizerRegistry

    # Checked here, each built on its first use (a worker holds only the ones its calls
    # need), or none when serve's tokenizer process counts; immutable once built, so apps of
    # one process share them.
    registry = TokenizerRegistry.load()
    if socket:
        from metering.tokenserver import count_in_process

        count_in_process(registry, socket)
    return registry


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
    from core.audit import AuditService
    from core.auth import AuthService
    from core.db import make_engine
    from core.events import EventService
    from core.idempotency import IdempotencyService, lapse_for
    from core.jobs import JobBoard
    from core.keys import KeyService
    from core.metrics import Metrics
    from core.tenancy import TenancyService
    from core.tracing import Tracing
    from finance.prices import PriceBook
    from finance.service import FinanceService
    from gateway.router import Router
    from gateway.service import GatewayService
    from gateway.upstream import UpstreamClient
    from metering.accrual import AccrualService
    from metering.ledger import LedgerWriter
    from metering.limits import LimitsService
    from metering.meters import MeterService
    from metering.relayed import RelayedEvents
    from metering.service import MeteringService
    from metering.spool import Spool
    from migrations.schema import ensure_schema_current
    from paywall.acknowledge import Acknowledger
    from paywall.cancel_flow import CancelFlow
    from paywall.evidence import EvidenceService
    from paywall.notices import NoticeService
    from paywall.service import PaywallService
    from paywall.withdrawals import WithdrawalService
    from plans.billing import BillingService
    from plans.catalog import Catalog
    from plans.checkout import CheckoutService
    from plans.credits import CreditsService
    from plans.meter_stripe import MeterOverageReporter
    from plans.overage import OverageReporter
    from plans.service import PlanService
    from plans.stripe_sync import stripe_client
    from plans.subscriptions import SubscriptionService

    if config.embedded:
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.database_url, pool_size=config.db_pool_size,
                         max_overflow=config.db_max_overflow, pool_timeout=config.db_pool_timeout)
    if check_schema:  # the embedded default makes (or brings up to date) its own database
        ensure_schema_current(engine, auto_migrate=config.should_auto_migrate)
    _check_cooperative_driver()
    redis_client = _redis(config)
    auth = AuthService(engine, cache_seconds=config.key_cache_seconds)
    tenancy = TenancyService(engine)
    ledger = LedgerWriter(engine, Path(config.data_dir) / "spool")
    metering = MeteringService(engine, ledger, _tokenizers(config.tokenizer_socket))
    # re-read at most once a second (tests run with no key cache: still no read per call)
    prices = PriceBook(engine, config.models, refresh_seconds=max(1.0, config.key_cache_seconds))
    metering.prices = prices
    metrics = Metrics()
    metrics.watch_ledger(ledger)
    catalog = Catalog.from_config(config)
    if check_schema and catalog.plans:
        from plans.versions import PlanChangedError, ensure_unchanged

        try:
            ensure_unchanged(engine, catalog)
        except PlanChangedError as exc:
            raise ConfigError(str(exc)) from exc
    plans = PlanService(engine, catalog, cache_seconds=config.key_cache_seconds)
    metering.plan_of = functools.partial(_plan_id, plans)
    metering.accounted = catalog.has_allowance
    credits = CreditsService(engine, cache_seconds=config.key_cache_seconds)
    accrual = AccrualService(engine, credits, plans, config.models)
    limits = LimitsService(catalog, limit_store(config, engine, redis_client), plans, engine,
                           config.models, lease_seconds=config.lease_seconds,
                           extra_allowance=accrual.extra_allowance)
    billing = BillingService(engine, catalog, plans, credits,
                             webhook_secret=config.stripe_webhook_secret,
                             allowance_used=limits.allowance_used,
                             client=functools.partial(stripe_client, config))
    checkout = CheckoutService(engine, catalog, functools.partial(stripe_client, config),
                               collect_terms_consent=config.stripe_collect_terms_consent)
    overage = OverageReporter(engine, functools.partial(stripe_client, config))
    meter_overage = MeterOverageReporter(engine, functools.partial(stripe_client, config))
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
    router = Router(config, frozenset(a for plan in catalog.plans for a, _ in plan.aliases),
                    metrics=metrics)
    gateway = GatewayService(config, tenancy, metering, upstreams, metrics, limits, plans, router)
    if hasattr(limits.store, "hold_first"):  # Redis: a lone call's reserve holds the worker
        limits.store.hold_first = router.alone
    idempotency = IdempotencyService(engine, lapse=lapse_for(config))
    meters = MeterService(engine, config, tenancy, limits)
    meters.price_at = finance.meter_prices.price_at
    # what a relayed call did upstream that a meter counts (web searches), spooled apart
    metering.relayed = RelayedEvents(meters, Spool(ledger.spool_dir / "meters", "meters"),
                                     lambda kind: metrics.errors.labels(kind=kind).inc())
    jobs = JobBoard(engine, scheduled_jobs(
        config, events=events, notices=notices, accrual=accrual,
        overage=(overage, meter_overage), finance=finance, limits=limits, ledger=ledger,
        idempotency=idempotency))
    keys = KeyService(auth, tenancy, user_key_ttl_seconds=config.user_key_ttl_seconds,
                      user_key_max_ttl_seconds=config.user_key_max_ttl_seconds)
    return Wiring(config=config, engine=engine, auth=auth, keys=keys,
                  tenancy=tenancy, ledger=ledger, metering=metering, limits=limits,
                  plans=plans, gateway=gateway, metrics=metrics,
                  tracing=Tracing.from_config(config), redis=redis_client,
                  credits=credits, accrual=accrual, billing=billing, checkout=checkout,
                  overage=overage, subscriptions=subscriptions, events=events,
                  paywall=paywall, acknowledger=acknowledger, notices=notices,
                  withdrawals=withdrawals, cancel_flow=cancel_flow, evidence=evidence,
                  finance=finance, audit=AuditService(engine), jobs=jobs,
                  idempotency=idempotency, meters=meters, meter_overage=meter_overage)


# seconds between runs of each scheduled job (MLANE_JOB_INTERVALS changes them)
JOB_INTERVALS = {"webhooks": 10, "notices": 900, "overage": 300, "credits": 60,
                 "rollup": 300, "limits": 30, "quarantine": 300, "idempotency": 600}


def scheduled_jobs(config: Config, *, events: EventService, notices: NoticeService,
                   accrual: AccrualService,
                   overage: tuple[OverageReporter, MeterOverageReporter],
                   finance: FinanceService,
                   limits: LimitsService, ledger: LedgerWriter,
                   idempotency: IdempotencyService) -> list[Job]:
    """Every scheduled job of the product (`meterlane worker` runs them), each one call of
    the service that does the work (the one-off commands call the same)."""
    from core.db import utcnow
    from core.jobs import Job, JobContext

    intervals = {**JOB_INTERVALS, **dict(config.job_intervals)}
    unknown = sorted(set(intervals) - set(JOB_INTERVALS))
    if unknown:
        raise ConfigError(f"MLANE_JOB_INTERVALS names no job {unknown}; the jobs are "
                          + ", ".join(JOB_INTERVALS))

    def webhooks(_: JobContext) -> str:  # for 30 s at most; the rest at the next run
        return f"attempted {events.deliver_for()} webhook deliveries"

    def overage_report(_: JobContext) -> str:
        from metering.overage_run import report_overage

        if not config.stripe_api_key:
            return "Stripe is not configured (MLANE_STRIPE_API_KEY): nothing to report"
        sent = report_overage(accrual, *overage, now=utcnow())
        return (f"reported {sent.tokens} overage meter events to Stripe (and {sent.meters} "
                "of [[meters]])")

    def rollup(_: JobContext) -> str:
        done = finance.refresh(wait=False)
        return "another process is rolling up" if done is None else "roll-ups up to date"

    def catch_up(_: JobContext) -> str:
        if not limits.enabled:
            return "no plan has limits"
        return f"counted {limits.catch_up()} calls the limit store had missed"

    def quarantine(context: JobContext) -> str:
        new = ledger.quarantine.count_since(context.last_success_at)
        if not new:
            return "nothing new in the ledger's quarantine"
        message = (f"{new} usage records went to the ledger's quarantine since the last "
                   "check: see `meterlane ledger quarantine list`")
        log.error(message)
        return message

    work: dict[str, tuple[Callable[[JobContext], str], str]] = {
        "webhooks": (webhooks, "send the signed webhooks that are due (retries included)"),
        "notices": (lambda _: f"sent {len(notices.run())} notices",
                    "reminders to subscribers that are due"),
        "overage": (overage_report, "account recent usage, send its overage to Stripe"),
        "credits": (lambda _: f"accounted {accrual.accrue_all(utcnow())} usage events",
                    "account usage against allowances, credits and overage"),
        "rollup": (rollup, "bring the finance roll-ups up to date"),
        "limits": (catch_up, "count the calls let through while the limit store was down"),
        "quarantine": (quarantine, "alert when usage records go to the ledger's quarantine"),
        "idempotency": (lambda _: f"deleted {idempotency.purge()} expired Idempotency-Key "
                        "records", "delete the answers kept for Idempotency-Key retries once "
                        "they expire (24 h)"),
    }
    return [Job(name, intervals[name], run, about) for name, (run, about) in work.items()]


def _redis(config: Config) -> Any | None:
    if not config.redis_url:
        return None
    if config.redis_cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(config.redis_url, socket_timeout=2,
                                     socket_connect_timeout=2)
    import redis

    return redis.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)


def _plan_id(plans: PlanService, end_user_id: int) -> str | None:
    """The plan an end user is on now (None: no plans are configured)."""
    from core.errors import DomainError

    try:
        return plans.plan_of(end_user_id).plan.id
    except DomainError:
        return None


def limit_store(config: Config, engine: Engine, redis_client: Any | None) -> LimitStore:
    """Redis when configured (several instances share it), else the database."""
    from metering.limitstore import SqlLimitStore

    store = config.limits_store
    if store == "redis" and redis_client is None:
        raise ConfigError("[limits] store = \"redis\" needs MLANE_REDIS_URL")
    if redis_client is not None and store in ("auto", "redis"):
        from metering.redislimits import RedisLimitStore

        return RedisLimitStore(redis_client, config.redis_prefix)
    return SqlLimitStore(engine)


def create_app(config: Config | None = None) -> Flask:
    """The Flask application (`flask --app app run`, gunicorn's `app:create_app()`)."""
    from core.api import bp as keys_bp
    from core.jobs_api import bp as jobs_bp
    from core.ops import bp as ops_bp
    from core.web import App, install_hooks
    from finance.api import bp as finance_bp
    from finance.api import page_bp as finance_page_bp
    from gateway.api import anthropic_bp
    from gateway.api import bp as gateway_bp
    from gateway.fastpath import install as install_fast_path
    from metering.api import bp as metering_bp
    from metering.cloudevents import bp as cloudevents_bp
    from metering.corrections_api import bp as corrections_bp
    from metering.credits_api import bp as credits_bp
    from metering.limits_api import bp as limits_bp
    from metering.meters_api import bp as meters_bp
    from paywall.api import bp as paywall_bp
    from paywall.api import widget_bp
    from paywall.lifecycle_api import bp as lifecycle_bp
    from paywall.lifecycle_api import kuendigen_bp
    from plans.api import bp as plans_bp

    config = config or Config.from_env()
    app = App("meterlane", root_path=str(Path(__file__).parent), static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["wiring"] = wiring = build_wiring(config)
    app.extensions["parts"] = wiring.parts()
    try:  # never stops the start: what the database refuses goes to the quarantine
        spooled = wiring.ledger.replay()
        if wiring.metering.relayed is not None:  # the meter events of relayed calls
            spooled += wiring.metering.relayed.replay()
        lost = wiring.metering.recover_lost()  # calls of workers that died mid-call
        if lost:
            log.warning("recorded %d calls whose worker died before recording them", lost)
            if wiring.limits.enabled:  # counted into the limits too, not only at the next
                wiring.limits.catch_up_soon()  # store failure or `meterlane worker` run
    except Exception:  # noqa: BLE001 - the spool stays; the next start replays it
        from core.logs import note

        note(log, logging.ERROR, "replaying the usage spool failed; it is tried again at the "
             "next start")
        spooled = 0
    if spooled:
        log.warning("replayed %d spooled usage records into the ledger", spooled)
    for bp in (gateway_bp, anthropic_bp, keys_bp, metering_bp, limits_bp, cloudevents_bp,
               corrections_bp,
               credits_bp, plans_bp, paywall_bp, widget_bp, lifecycle_bp, kuendigen_bp,
               finance_bp, finance_page_bp, ops_bp, jobs_bp, meters_bp):
        app.register_blueprint(bp)
    install_hooks(app)
    wiring.metering.unwritten.install(
        app, skip=("gateway", "anthropic", "ops.healthz", "ops.readyz"))
    install_fast_path(app)  # the gateway's OpenAI calls without Flask's request machinery
    if config.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app,  # type: ignore[method-assign]
                                x_for=config.trusted_proxies, x_proto=1)
    return app


def serving_app() -> Flask:
    """create_app() for a gunicorn worker: it also sends the webhooks that are due
    (deliveries are claimed: never twice)."""
    app = create_app()
    wiring = app.extensions["wiring"]
    wiring.events.start()
    if wiring.limits.enabled:
        # Every call counts its prompt for the reservation: the encodings of the configured
        # models are built now (here or in the tokenizer process), before the first call, not
        # during it (a build holds the worker 0.2-0.5 s).
        for model in wiring.config.models:
            wiring.metering.tokenizers.for_model(model.upstream_model, model.tokenizer).count("")
    # What start-up built lives as long as the worker: out of the garbage collector's sight,
    # a full collection no longer walks it (about 60 ms over it, a stall of every call the
    # worker is serving: bench/README, "Hot path").
    gc.collect()
    gc.freeze()
    return app


# -- the `meterlane` command ---------------------------------------------------------------

def _load_config() -> Config:
    from plans.catalog import Catalog

    try:
        config = Config.from_env()
        Catalog.from_config(config)  # a malformed plan stops every command, naming its line
        return config
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from exc


def _build_parts(config: Config) -> Parts:
    from migrations.schema import SchemaNotMigratedError

    try:
        return build_wiring(config).parts()
    except (SchemaNotMigratedError, ConfigError) as exc:  # a bad MLANE_JOB_INTERVALS, ...
        raise click.ClickException(str(exc)) from exc


def _migrate_embedded(config: Config) -> None:
    from core.db import make_engine
    from migrations.schema import ensure_schema_current

    if config.embedded:
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.database_url)
    try:
        ensure_schema_current(engine, auto_migrate=config.should_auto_migrate)
    finally:
        engine.dispose()


@click.group(cls=LoggedGroup)
@click.version_option(package_name="meterlane", prog_name="meterlane")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Meterlane: token metering, limits and billing in front of every model call."""
    ctx.obj = CommandContext(load_config=_load_config, build_parts=_build_parts,
                             migrate_embedded=_migrate_embedded)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--timeout", default=900, show_default=True, type=int,
              help="Seconds a worker may go silent before it is restarted.")
@click.option("--with-worker/--without-worker", "with_worker", default=None,
              help="Also run `meterlane worker` (the scheduled jobs) beside the service, "
                   "stopped with it. Default: with, on the embedded SQLite database; without, "
                   "on MLANE_DATABASE_URL (run `meterlane worker` on its own there).")
def serve(host: str, port: int, workers: int, timeout: int, with_worker: bool | None) -> None:
    """Run the service under gunicorn (gevent workers: many streams open at once)."""
    config = _load_config()
    # Check (or, on SQLite, apply) migrations in a child process: the gunicorn master must not
    # import the database driver, or psycopg picks its blocking wait before gevent patches.
    # (-P: the folder serve runs in is not on the child's path, so an app.py or core/ of the
    # user's own there is never imported in place of Meterlane's)
    check = subprocess.run([sys.executable, "-P", "-m", "app", "db", "ensure"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise click.ClickException(child_error(check.stderr))
    from core.server import run, say, size_pools, worker_beside

    size_pools(config, workers)
    # Each worker writes its metrics here; /metrics merges them. Must be set before any
    # worker imports prometheus_client.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="meterlane-metrics-")
    from core.startup import summary
    from plans.catalog import Catalog

    plans = sorted({p.id for p in Catalog.from_config(config).plans})
    for line in summary(config, plans, f"http://{host}:{port}", workers,
                        os.environ.get("MLANE_CONFIG")):
        say(config, line)
    from metering.tokenserver import tokenizer_beside

    with tokenizer_beside(), \
            worker_beside(config.embedded if with_worker is None else with_worker) as pid:
        say(config, "jobs      " + (
            f"a worker runs them beside the service (pid {pid}; --without-worker: none)"
            if pid else "run `meterlane worker` for the scheduled jobs (or serve "
            "--with-worker)"))
        run("app:serving_app", host=host, port=port, workers=workers, timeout=timeout,
            log_format=config.log_format)


def _add_package_commands() -> None:
    from core.cli import init, keys, webhooks, worker
    from finance.cli import demo_seed, finance, prices, report
    from gateway.cli import demo
    from metering.cli import billing, credits, ledger, limits
    from migrations.cli import db
    from paywall.cli import notices
    from plans.cli import plans

    for group in (db, keys, ledger, limits, plans, billing, webhooks, notices, credits,
                  report, finance, prices, demo, init, worker):
        main.add_command(group)
    demo.add_command(demo_seed)


_add_package_commands()

if __name__ == "__main__":  # pragma: no cover - `python -m app ...`
    sys.exit(main())
