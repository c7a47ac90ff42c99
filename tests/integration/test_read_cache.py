"""The hot path's cached reads (keys, plans, end users) on Postgres: a burst of calls on an
entry that lapsed reads it once per worker, a revoked key is refused within
MLANE_KEY_CACHE_SECONDS, and with the database away calls fail as they did before."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

from core.audit import Actor
from core.auth import AuthService, Principal, Role, issue_in
from core.db import make_engine, utcnow
from core.errors import AuthenticationError
from core.keys import KeyService
from core.tenancy import TenancyService
from plans.catalog import parse_plans
from plans.service import PlanService
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration
TTL = 2.0
CALLS = 40
PLANS = parse_plans(({"id": "free", "default": True}, {"id": "pro"}), "")


class Clock:
    """The caches' monotonic clock, moved by the test (no waiting for real seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """Counts the statements on an engine that contain `marker` (a cursor event, as
    SQLAlchemy runs them); while `hold` is clear, each such read, once executed, waits for
    it before its caller goes on (a read kept under way while other calls arrive)."""

    def __init__(self, engine: Engine, marker: str) -> None:
        self.engine, self.marker = engine, marker
        self.count = 0
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        event.listen(engine, "after_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.marker not in statement:
            return
        with self._lock:
            self.count += 1
        self.entered.set()
        assert self.hold.wait(30), "the held read was never released"

    def close(self) -> None:
        event.remove(self.engine, "after_cursor_execute", self._seen)


@pytest.fixture()
def key_reads(clean_db: Engine) -> Iterator[Reads]:
    reads = Reads(clean_db, "api_keys.secret_sha256")
    yield reads
    reads.hold.set()
    reads.close()


def _issue(engine: Engine) -> tuple[str, int]:
    """A key stored as KeyService stores one (its audit row aside): (the key, its row id)."""
    with engine.begin() as conn:
        return issue_in(conn, role=Role.APP, app_id=None, end_user_id=None)


def burst(n: int, call: Callable[[], Any]) -> tuple[list[threading.Thread], list[Any]]:
    """n threads making the same call; their results (or exceptions) in `out`."""
    out: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            got: Any = call()
        except Exception as exc:  # noqa: BLE001 - kept for the test to assert on
            got = exc
        with lock:
            out.append(got)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, out


def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def held_burst(reads: Reads, cache: Any, call: Callable[[], Any],
               n: int = CALLS) -> list[Any]:
    """n concurrent calls while the first one's read is held until every other call has
    either joined it or started a read of its own (which the count would show)."""
    joined, began = cache.joined, reads.count
    reads.hold.clear()
    reads.entered.clear()
    threads, out = burst(n, call)
    assert reads.entered.wait(30)
    # (the threads block on the held read: nothing to wait on but their count)
    wait_for(lambda: (cache.joined - joined) + (reads.count - began) >= n, 30,
             "the calls never arrived", interval=0.001)
    reads.hold.set()
    join(threads)
    return out


@pytest.mark.parametrize("cached_before", [False, True])
def test_a_burst_on_a_lapsed_or_missing_key_reads_it_once(
        clean_db: Engine, key_reads: Reads, cached_before: bool) -> None:
    clock = Clock()
    auth = AuthService(clean_db, cache_seconds=TTL, monotonic=clock)
    key, pk = _issue(clean_db)
    if cached_before:
        assert auth.authenticate(key).key_pk == pk
        clock.now += TTL  # lapsed: no longer used
    before = key_reads.count
    out = held_burst(key_reads, auth._cache, lambda: auth.authenticate(key))
    assert key_reads.count - before == 1
    assert [p.key_pk if isinstance(p, Principal) else p for p in out] == [pk] * CALLS
    assert auth.authenticate(key).key_pk == pk and key_reads.count - before == 1  # cached


def test_a_key_past_half_its_ttl_is_read_again_once_and_served_meanwhile(
        clean_db: Engine, key_reads: Reads) -> None:
    """The first call past half the TTL re-reads the key (beside the calls under gevent,
    inline here); the others are answered from the cache without waiting for it."""
    clock = Clock()
    auth = AuthService(clean_db, cache_seconds=TTL, monotonic=clock)
    key, pk = _issue(clean_db)
    auth.authenticate(key)
    clock.now += TTL * 0.75
    key_reads.hold.clear()
    key_reads.entered.clear()
    refresher, first = burst(1, lambda: auth.authenticate(key))
    assert key_reads.entered.wait(30)
    others, out = burst(CALLS, lambda: auth.authenticate(key))
    join(others)  # all answered while the refresh is still held
    assert [p.key_pk for p in out] == [pk] * CALLS
    key_reads.hold.set()
    join(refresher)
    assert first[0].key_pk == pk and key_reads.count == 2
    clock.now += TTL * 0.25  # fresh from the refresh: no read
    assert auth.authenticate(key).key_pk == pk and key_reads.count == 2


def test_a_key_revoked_through_another_worker_is_refused_within_the_ttl(
        clean_db: Engine, key_reads: Reads) -> None:
    """README: a revoked key is refused by every worker within MLANE_KEY_CACHE_SECONDS,
    even while a refresh of it is still under way when the TTL ends."""
    clock = Clock()
    here = AuthService(clean_db, cache_seconds=TTL, monotonic=clock)
    there = AuthService(clean_db, cache_seconds=TTL, monotonic=clock)
    key, pk = _issue(clean_db)
    assert here.authenticate(key).key_pk == pk and there.authenticate(key).key_pk == pk
    revoked = KeyService(there, TenancyService(clean_db)).revoke(Actor.cli(), key)
    assert revoked["state"] == "revoked"
    with pytest.raises(AuthenticationError):
        there.authenticate(key)  # the worker that revoked: at once
    clock.now += TTL * 0.25
    assert here.authenticate(key).key_pk == pk  # the other: cached, within its bound
    # a refresh in the second half of the TTL is held; the TTL ends meanwhile
    clock.now += TTL * 0.5
    key_reads.hold.clear()
    key_reads.entered.clear()
    refresher, first = burst(1, lambda: here.authenticate(key))
    assert key_reads.entered.wait(30)
    clock.now += TTL * 0.25  # the TTL is over: calls now wait for the read under way
    reads = key_reads.count
    threads, out = burst(CALLS, lambda: here.authenticate(key))
    wait_for(lambda: here._cache.joined >= CALLS, 30, "the calls never joined the read",
             interval=0.001)
    key_reads.hold.set()
    join(refresher + threads)
    assert key_reads.count == reads
    assert all(isinstance(r, AuthenticationError) for r in out + first), out + first


@pytest.fixture()
def away_db(pg_server: str, tmp_path: Path) -> Iterator[tuple[Engine, Callable[[bool], None]]]:
    """An engine on a database of its own, and a switch that refuses (or allows again)
    every connection to it, dropping the ones open."""
    from migrations.schema import upgrade
    from tests.support.services import create_database, libpq_url

    url = create_database(pg_server, f"mlane_rc_{tmp_path.name[-12:].replace('-', '_')}")
    name = make_url(url).database
    engine = make_engine(url)
    upgrade(engine)
    ident = sql.Identifier(name or "")

    def switch(away: bool) -> None:
        with psycopg.connect(libpq_url(pg_server), autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                ident, sql.SQL("false" if away else "true")))
            if away:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s", (name,))
        engine.dispose()

    yield engine, switch
    switch(False)
    engine.dispose()


def test_with_the_database_away_a_cached_key_serves_its_ttl_then_calls_fail_as_before(
        away_db: tuple[Engine, Callable[[bool], None]],
        caplog: pytest.LogCaptureFixture) -> None:
    """A refresh that fails leaves the cached key serving until its TTL (logged once, not
    tried again on every call); past it, each call fails with the database's error (the
    gateway's 503, with no ledger row: tests/integration/test_ledger.py), and a burst of
    calls makes one attempt, not one each."""
    engine, switch = away_db
    connects = [0]
    hold = threading.Event()
    hold.set()
    entered = threading.Event()

    def connecting(*_args: Any) -> None:
        connects[0] += 1
        entered.set()
        assert hold.wait(30)

    clock = Clock()
    auth = AuthService(engine, cache_seconds=TTL, monotonic=clock)
    key, pk = _issue(engine)
    assert auth.authenticate(key).key_pk == pk
    switch(True)
    event.listen(engine, "do_connect", connecting)
    try:
        clock.now += 1.25  # past half the TTL (numbers exact in binary)
        assert auth.authenticate(key).key_pk == pk  # the refresh failed: still cached
        assert connects[0] == 1 and "could not refresh one of the cached keys" in caplog.text
        assert key not in caplog.text
        clock.now += 0.5
        assert auth.authenticate(key).key_pk == pk and connects[0] == 1  # no second try
        clock.now += 0.25  # lapsed
        hold.clear()
        entered.clear()
        threads, out = burst(CALLS, lambda: auth.authenticate(key))
        assert entered.wait(30)
        wait_for(lambda: auth._cache.joined + connects[0] - 2 >= CALLS - 1, 30,
                 "the calls never arrived", interval=0.001)
        hold.set()
        join(threads)
        assert connects[0] == 2
        assert len(out) == CALLS and all(isinstance(e, OperationalError) for e in out), out
    finally:
        hold.set()
        event.remove(engine, "do_connect", connecting)
    switch(False)
    assert auth.authenticate(key).key_pk == pk  # back: read again


def test_a_burst_on_a_lapsed_plan_reads_it_once_and_an_assignment_here_is_seen_at_once(
        clean_db: Engine) -> None:
    clock = Clock()
    tenancy = TenancyService(clean_db)
    app_id = tenancy.ensure_app("acme")[0]
    user = tenancy.ensure_end_user(app_id, "alice")
    plans = PlanService(clean_db, PLANS, cache_seconds=TTL, monotonic=clock)
    reads = Reads(clean_db, "FROM end_user_plans")
    try:
        assert plans.plan_of(user).plan.id == "free"
        clock.now += TTL
        before = reads.count
        out = held_burst(reads, plans._cache, lambda: plans.plan_of(user))
        assert reads.count - before == 1 and {a.plan.id for a in out} == {"free"}
        # a read done before this worker assigns a plan, still under way after it, is
        # handed to its caller but not kept: the next call reads again and sees the plan
        clock.now += TTL
        reads.hold.clear()
        reads.entered.clear()
        threads, old = burst(1, lambda: plans.plan_of(user))
        assert reads.entered.wait(30)  # read (no assignment yet), held
        pro = PLANS.get("pro")
        assert pro is not None
        with clean_db.begin() as conn:
            plans.assign_in(conn, app_id, user, pro, utcnow())
        reads.hold.set()
        join(threads)
        assert old[0].plan.id == "free"
        assert plans.plan_of(user).plan.id == "pro"
    finally:
        reads.hold.set()
        reads.close()


def test_a_new_users_first_calls_together_create_and_read_them_once(clean_db: Engine) -> None:
    tenancy = TenancyService(clean_db)
    app_id = tenancy.ensure_app("acme")[0]
    reads = Reads(clean_db, "FROM end_users")
    try:
        out = held_burst(reads, tenancy._users, lambda: tenancy.ensure_end_user(app_id, "bob"))
        assert len(set(out)) == 1 and isinstance(out[0], int)
        assert reads.count == 2  # the lookup, then the insert's read back: once for all
        assert tenancy.ensure_end_user(app_id, "bob") == out[0] and reads.count == 2
    finally:
        reads.close()
