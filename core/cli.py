"""What every package's commands share (the configuration, the app's parts built on demand),
and the kernel's own commands: `meterlane keys` and `meterlane webhooks`. Changes made here are
audited with the actor "cli" and the OS user who ran them.

app.py's command group puts a CommandContext in click's context; a package's command asks it
for the parts it uses by their class, importing only those classes (lazily: `meterlane serve`
must not load the database driver before gevent patches the standard library)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from core.config import Config

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from core.parts import Parts

T = TypeVar("T")


@dataclass
class CommandContext:
    """The configuration and the app's parts, each built once per command, when first asked."""

    load_config: Callable[[], Config]
    build_parts: Callable[[Config], Parts]
    migrate_embedded: Callable[[Config], None]
    _config: Config | None = field(default=None, init=False)
    _parts: Parts | None = field(default=None, init=False)
    _engine: Engine | None = field(default=None, init=False)

    def config(self) -> Config:
        if self._config is None:
            self._config = self.load_config()
        return self._config

    def engine(self) -> Engine:
        """The database alone, without building the app (its data folder made first)."""
        if self._engine is None:
            from core.db import make_engine

            config = self.config()
            if config.embedded:
                Path(config.data_dir).mkdir(parents=True, exist_ok=True)
            self._engine = make_engine(config.database_url)
        return self._engine

    def ensure_embedded_schema(self) -> None:
        """On the embedded default, migrate the schema first (as `meterlane serve` does), so a
        new user's first command works; elsewhere the schema is checked when parts are built."""
        self.migrate_embedded(self.config())

    def part(self, kind: type[T]) -> T:
        if self._parts is None:
            self._parts = self.build_parts(self.config())
        return self._parts.get(kind)


class LoggedGroup(click.Group):
    """`meterlane`'s command group: every command's log lines in MLANE_LOG_FORMAT, set up
    once here (a job run by hand logs as the worker does), and with json a command's error
    as one JSON line too, not click's plain `Error: ...`."""

    def invoke(self, ctx: click.Context) -> object:
        import os

        from core import logs
        from core.config import ConfigError, log_format

        try:
            fmt = log_format(os.environ)
        except ConfigError:  # the configuration's own check names it, in text
            fmt = "text"
        logs.configure(fmt)
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if fmt != "json":
                raise
            click.echo(logs.json_line("meterlane.cli", exc.format_message(), "error",
                                      event="error"), err=True)
            raise click.exceptions.Exit(exc.exit_code) from exc


def child_error(stderr: str) -> str:
    """What a `meterlane` child process said when it failed: its error line's message (a JSON
    line's `msg`), the exception that ended a traceback, else its text without click's
    `Error: `."""
    import orjson

    lines = stderr.strip().splitlines()
    for line in reversed(lines):
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        if isinstance(doc, dict) and doc.get("level") == "error" and "msg" in doc:
            return str(doc["msg"])
    if "Traceback (most recent call last):" in stderr:
        frames = [n for n, line in enumerate(lines) if line.startswith("  ")]
        return "\n".join(lines[frames[-1] + 1:] if frames else lines[-1:])
    return stderr.strip().removeprefix("Error: ")


def context() -> CommandContext:
    found = click.get_current_context().find_object(CommandContext)
    if found is None:  # a command run outside `meterlane` (a test invoking it alone)
        raise click.ClickException("run this command through `meterlane`")
    return found


@click.group()
def keys() -> None:
    """API keys (shown once, stored hashed)."""


@keys.command("create")
@click.option("--role", required=True, type=click.Choice(["admin", "app", "user", "finance"]))
@click.option("--app", "app_name", help="The app (tenant); created if new.")
@click.option("--user", help="The end user (user keys only).")
@click.option("--name", help="A label for the key.")
@click.option("--description", help="What the key is for (shown when keys are listed).")
@click.option("--ttl-seconds", type=int, help="Expire the key after this many seconds (a "
              "user key: 1 hour by default, at most 7 days).")
def keys_create(role: str, app_name: str | None, user: str | None, name: str | None,
                description: str | None, ttl_seconds: int | None) -> None:
    """Create a key and print it as the last line (it is not shown again)."""
    from datetime import timedelta

    from core.audit import Actor
    from core.auth import Role
    from core.errors import DomainError
    from core.keys import KeyService

    ctx = context()
    if ctx.config().embedded:
        ctx.ensure_embedded_schema()
    try:
        issued = ctx.part(KeyService).create_key(
            Role(role), app_name, user=user, name=name, description=description,
            ttl=timedelta(seconds=ttl_seconds) if ttl_seconds else None, actor=Actor.cli())
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    scope = f"app {issued.app_name}" if issued.app_name else "every app"
    click.echo(f"created {role} key for {scope}" + (f", user {user}" if user else "")
               + " (store it now: it is shown only once)", err=True)
    click.echo(issued.key)


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke a key (the full key, its prefix mlk_<id>, or its id: the hex after 'mlk_')."""
    from core.audit import Actor
    from core.errors import DomainError
    from core.keys import KeyService

    try:
        view = context().part(KeyService).revoke(Actor.cli(), key)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"revoked {view['id']}")


@keys.command("list")
@click.option("--app", "app_name", help="Only this app's keys.")
@click.option("--role", type=click.Choice(["admin", "app", "user", "finance"]))
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100))
def keys_list(app_name: str | None, role: str | None, include_revoked: bool,
              limit: int) -> None:
    """The keys, newest first: prefix, role, app, state, created, last used, expiry (never
    a secret)."""
    from core.audit import Actor
    from core.auth import Role
    from core.errors import DomainError
    from core.keys import KeyFilter, KeyService

    try:
        rows, more = context().part(KeyService).list_keys(Actor.cli(), KeyFilter(
            app=app_name, role=Role(role) if role else None,
            include_revoked=include_revoked, limit=limit))
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    for row in rows:
        click.echo("\t".join(_cell(row[f]) for f in (
            "prefix", "role", "app", "user", "state", "created_at", "last_used_at",
            "expires_at", "description")))
    if more:
        click.echo(f"(more than {limit}: narrow with --app or --role)", err=True)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return str(value.isoformat(timespec="seconds"))
    return str(value)


@keys.command("rotate")
@click.argument("key")
@click.option("--overlap-seconds", default=3600, show_default=True,
              type=click.IntRange(0, 7 * 24 * 3600),
              help="How long the old key keeps working (at most 7 days).")
def keys_rotate(key: str, overlap_seconds: int) -> None:
    """A successor of the key (same role, app and description), printed as the last line;
    the old key is refused after the overlap."""
    from core.audit import Actor
    from core.errors import DomainError
    from core.keys import KeyService

    try:
        issued, old = context().part(KeyService).rotate(Actor.cli(), key,
                                                        overlap_seconds=overlap_seconds)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"rotated {old['prefix']}: it is refused from {_cell(old['expires_at'])} "
               "(store the new key now: it is shown only once)", err=True)
    click.echo(issued.key)


@click.group()
def webhooks() -> None:
    """Signed webhooks to the app (each serve worker sends them too)."""


@webhooks.command("deliver")
@click.option("--loop", "forever", is_flag=True, help="Keep sending, once a second.")
def webhooks_deliver(forever: bool) -> None:
    """Send the webhook deliveries that are due (retries included)."""
    import time

    from core.events import EventService

    events = context().part(EventService)
    total = 0
    while True:
        sent = events.deliver_due()
        total += sent
        if not sent and not forever:
            break
        if not sent:
            time.sleep(1)
    click.echo(f"attempted {total} webhook deliveries")


EXAMPLES = Path(__file__).parent / "examples"
EXAMPLE_FILES = ("meterlane.toml", "offer.json", "prices.csv")


@click.command("init")
@click.option("--dir", "where", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True, help="The folder to write into.")
@click.option("--force", is_flag=True, help="Replace files that are there already.")
def init(where: Path, force: bool) -> None:
    """Write the example configuration (every section, commented), an offer and a price
    sheet, to start from."""
    targets = [where / name for name in EXAMPLE_FILES]
    there = [str(t) for t in targets if t.exists()]
    if there and not force:
        raise click.ClickException(f"already there: {', '.join(there)} (--force replaces "
                                   "them)")
    where.mkdir(parents=True, exist_ok=True)
    for name, target in zip(EXAMPLE_FILES, targets, strict=True):
        target.write_bytes((EXAMPLES / name).read_bytes())
        click.echo(f"wrote {target}")
    config = (where / "meterlane.toml").resolve()
    click.echo(f"next: export MLANE_CONFIG={config} && meterlane serve")


@click.command("worker")
@click.option("--once", is_flag=True, help="Run each job once now (unless another worker is "
              "running it) and stop.")
@click.option("--jobs", "names", metavar="A,B", help="Only these jobs (default: every job).")
@click.option("--exit-with", "parent", type=int, hidden=True,
              help="Stop when this process (the serve that started the worker) is gone.")
def worker(once: bool, names: str | None, parent: int | None) -> None:
    """Run every scheduled job when it is due: webhooks, notices, overage to Stripe, credits,
    finance roll-ups, the limits catch-up, quarantine alerts. Any number of workers may run:
    each job runs on one at a time, and a stopped worker's jobs pass to the others. One log
    line per run."""
    import logging
    import signal

    from core import logs
    from core.jobs import JobBoard
    from core.worker import Outcome, Worker, lock_factory

    ctx = context()
    if ctx.config().embedded:
        ctx.ensure_embedded_schema()
    board = ctx.part(JobBoard)
    only = [n.strip() for n in names.split(",") if n.strip()] if names else None
    unknown = sorted(set(only or ()) - set(board.jobs))
    if unknown:
        raise click.BadParameter(f"no job {unknown}; the jobs are {', '.join(board.jobs)}",
                                 param_hint="--jobs")
    logs.configure(ctx.config().log_format)  # the serve's format (MLANE_LOG_FORMAT)
    log = logging.getLogger("meterlane.worker")

    def report(outcome: Outcome) -> None:
        logs.event(log, f"job {outcome.job} {'ok' if outcome.ok else 'failed'}",
                   {"event": "job", "job": outcome.job,
                                          "outcome": "ok" if outcome.ok else "error",
                                          "duration_ms": round(outcome.seconds * 1000, 1),
                                          "detail": outcome.message},
                   logging.INFO if outcome.ok else logging.ERROR)

    runner = Worker(board, lock_factory(board.engine, ctx.config().data_dir), only=only,
                    report=report)
    if once:
        failed = [o.job for o in runner.tick(due_only=False) if not o.ok]
        if failed:
            raise click.ClickException(f"jobs failed: {', '.join(failed)}")
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stopping.set())
    logs.event(log, f"worker {runner.name} runs jobs {', '.join(j.name for j in runner.jobs)}",
               {"event": "startup", "worker": runner.name})
    runner.run_forever(parent=parent)
    logs.event(log, f"worker {runner.name} stopped", {"event": "stop", "worker": runner.name})
