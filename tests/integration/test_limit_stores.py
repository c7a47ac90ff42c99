"""The limit store contract: the Redis store and the SQL store (Postgres and SQLite) behave
alike, step for step. Time is passed explicitly (a frozen clock)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine

from core.db import make_engine
from metering.limitstore import Actual, Check, SqlLimitStore
from metering.redislimits import RedisLimitStore

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000  # a fixed "now", in ms
DAY_END = T0 + 3_600_000


def tokens(amount: int, key: str = "tokens|day||*|d1", **kw: Any) -> Check:
    return Check(key=key, kind="counter", metric="t", amount=amount, fixed=kw.pop("fixed", 10),
                 per_out=1, expires_ms=DAY_END, **kw)


def requests(amount: int) -> Check:
    return Check(key="requests|minute||*|m1", kind="counter", metric="r", amount=amount,
                 fixed=1, per_out=0, expires_ms=DAY_END)


def gauge(amount: int) -> Check:
    return Check(key="concurrent|none||*", kind="gauge", metric="g", amount=amount, fixed=1,
                 per_out=0)


S0 = T0 // 60_000  # the one-minute slot that holds T0


def rolling(amount: int, slot: int, fixed: int = 0) -> Check:
    # 5-minute span of 5 one-minute slots; `slot` counts from S0
    return Check(key="tokens|rolling:5m||*", kind="rolling", metric="t", amount=amount,
                 fixed=fixed, per_out=1, slot_ms=60_000, slots=5, slot=S0 + slot)


def bucket(amount: int, fixed: int) -> Check:
    # refill 10 tokens per second, capacity `amount`
    return Check(key="tokens|bucket:10/1s||*", kind="bucket", metric="t", amount=amount,
                 fixed=fixed, per_out=0, refill=10, interval_ms=1000)


@pytest.fixture(params=["redis", "cluster", "postgres", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(url)
        yield RedisLimitStore(client, prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
        client.close()
        return
    if request.param == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        nodes = request.getfixturevalue("redis_cluster")
        cluster = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes])
        yield RedisLimitStore(cluster, prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
        cluster.close()
        return
    if request.param == "postgres":
        engine: Engine = request.getfixturevalue("clean_db")
        yield SqlLimitStore(engine)
        return
    from migrations.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'limits.db'}")
    upgrade(engine)
    yield SqlLimitStore(engine)
    engine.dispose()


def reserve(store: Any, checks: list[Check], *, lease: str | None = None, now: int = T0,
            want: int = 100, least: int = 1, clip: bool = True, ttl: int = 60_000,
            tag: str = "u1.1") -> Any:
    return store.reserve(tag, lease or f"ls_{uuid.uuid4().hex}", checks, now_ms=now,
                         expires_ms=now + ttl, want_out=want, min_out=least, clip=clip,
                         meta={"who": "test"})


def used(store: Any, checks: list[Check], now: int = T0, tag: str = "u1.1") -> list[int]:
    return [s.used for s in store.peek(tag, checks, now_ms=now)]


def test_reserve_charges_the_estimate_and_settle_applies_the_real_usage(store: Any) -> None:
    checks = [tokens(1000), requests(5)]
    got = reserve(store, checks, lease="ls_a", want=100)
    assert got.granted and got.out == 100
    assert [s.used for s in got.states] == [110, 1]
    assert used(store, checks) == [110, 1]
    assert store.settle("u1.1", "ls_a", Actual(tokens=42), now_ms=T0).outcome == "settled"
    assert used(store, checks) == [42, 1]  # the request stays counted


def test_settle_and_release_are_idempotent_per_lease(store: Any) -> None:
    checks = [tokens(1000)]
    reserve(store, checks, lease="ls_a")
    reserve(store, checks, lease="ls_b")
    store.settle("u1.1", "ls_a", Actual(tokens=30), now_ms=T0)
    again = store.settle("u1.1", "ls_a", Actual(tokens=30), now_ms=T0)
    assert again.outcome == "already_settled" and again.actual == {"tokens": 30, "cost": 0,
                                                              "credits": 30}
    assert store.settle("u1.1", "ls_b", None, now_ms=T0).outcome == "released"
    assert store.settle("u1.1", "ls_b", None, now_ms=T0).outcome == "already_released"
    assert store.settle("u1.1", "ls_b", Actual(tokens=5), now_ms=T0).outcome == "already_released"
    assert store.settle("u1.1", "ls_nope", None, now_ms=T0).outcome == "unknown"
    assert used(store, checks) == [30]


def test_all_or_nothing_when_one_limit_refuses(store: Any) -> None:
    checks = [tokens(1000), requests(1)]
    assert reserve(store, checks).granted
    refused = reserve(store, checks)
    assert not refused.granted and refused.refused == 1
    assert [s.used for s in refused.states] == [110, 1]
    assert used(store, checks) == [110, 1]  # the tokens check was not charged either


def test_clip_grants_what_remains_and_reject_refuses(store: Any) -> None:
    checks = [tokens(150)]
    first = reserve(store, checks, want=100)
    assert first.out == 100
    clipped = reserve(store, checks, want=100)  # 40 left: 10 prompt + 30 output
    assert clipped.granted and clipped.out == 30 and clipped.states[0].remaining == 0
    assert not reserve(store, checks, want=1).granted  # nothing left for even one token
    rejected_store_checks = [tokens(1000, key="tokens|day||*|d2")]
    reserve(store, rejected_store_checks, want=900)
    rejected = reserve(store, rejected_store_checks, want=100, clip=False)
    assert not rejected.granted and rejected.refused == 0


def test_an_unsettled_lease_expires_by_itself(store: Any) -> None:
    checks = [tokens(1000), gauge(1)]
    reserve(store, checks, lease="ls_dead", ttl=5_000)
    assert not reserve(store, checks, now=T0 + 1_000).granted  # the slot is held
    assert used(store, checks, now=T0 + 4_999) == [110, 1]
    assert used(store, checks, now=T0 + 5_000) == [0, 0]  # no job: the next step releases it
    assert reserve(store, checks, now=T0 + 5_001).granted
    late = store.settle("u1.1", "ls_dead", Actual(tokens=50), now_ms=T0 + 6_000)
    assert late.outcome == "expired"
    assert used(store, checks, now=T0 + 6_000) == [110, 1]  # nothing double-counted


def test_concurrency_slots_free_when_calls_end(store: Any) -> None:
    checks = [gauge(2)]
    reserve(store, checks, lease="ls_1", want=0, least=0)
    reserve(store, checks, lease="ls_2", want=0, least=0)
    assert not reserve(store, checks, want=0, least=0).granted
    store.settle("u1.1", "ls_1", Actual(tokens=10), now_ms=T0)
    assert reserve(store, checks, want=0, least=0).granted


def test_rolling_window_forgets_slots_that_left_the_span(store: Any) -> None:
    assert reserve(store, [rolling(100, slot=10)], want=60, lease="ls_r").granted
    store.settle("u1.1", "ls_r", Actual(tokens=60), now_ms=T0)
    assert reserve(store, [rolling(100, slot=12)], want=40).granted
    # slot 10 still counts in slot 14's span (10..14), so only 0 are left
    assert not reserve(store, [rolling(100, slot=14)], want=1).granted
    # in slot 15 the span is 11..15: slot 10's 60 tokens are gone
    states = store.peek("u1.1", [rolling(100, slot=15)], now_ms=T0)
    assert states[0].used == 40 and states[0].oldest_slot == S0 + 12


def test_token_bucket_refills_over_time(store: Any) -> None:
    check = bucket(50, fixed=30)
    assert reserve(store, [check], want=0, least=0, now=T0).granted
    assert not reserve(store, [check], want=0, least=0, now=T0).granted  # 20 left
    assert reserve(store, [check], want=0, least=0, now=T0 + 1_000).granted  # +10/s: 30
    states = store.peek("u1.1", [check], now_ms=T0 + 1_000)
    assert states[0].remaining == 0
    assert store.peek("u1.1", [check], now_ms=T0 + 60_000)[0].remaining == 50  # capped


def test_commit_counts_tracked_usage_once_per_event(store: Any) -> None:
    checks = [tokens(1000), requests(10)]
    assert store.commit("u1.1", "ev:1", checks, Actual(tokens=70), now_ms=T0)
    assert not store.commit("u1.1", "ev:1", checks, Actual(tokens=70), now_ms=T0)
    assert used(store, checks) == [70, 1]


def test_overwrite_sets_counters_and_keeps_what_leases_hold(store: Any) -> None:
    checks = [tokens(1000)]
    reserve(store, checks, lease="ls_live", want=90)  # holds 100
    store.overwrite("u1.1", [(checks[0], 500)], now_ms=T0)
    assert used(store, checks) == [600]
    store.settle("u1.1", "ls_live", Actual(tokens=20), now_ms=T0)
    assert used(store, checks) == [520]


def test_large_cost_amounts_stay_exact(store: Any) -> None:
    amount = 9_000_000_000_000_000  # 9,000 USD in pico-USD
    cost = Check(key="cost_usd|month||*|m1", kind="counter", metric="c", amount=amount,
                 fixed=123_456_789_012_345, per_out=1_234_567, expires_ms=DAY_END)
    got = reserve(store, [cost], lease="ls_c", want=1000)
    assert got.states[0].used == 123_456_789_012_345 + 1_234_567_000
    store.settle("u1.1", "ls_c", Actual(tokens=1, cost=987_654_321_098_765), now_ms=T0)
    assert used(store, [cost]) == [987_654_321_098_765]


def test_tags_are_independent(store: Any) -> None:
    checks = [tokens(120)]
    assert reserve(store, checks, tag="u1.1", want=100).granted
    assert reserve(store, checks, tag="u1.2", want=100).granted
    assert not reserve(store, checks, tag="u1.1", want=100, least=100).granted


def test_parallel_reservations_never_overspend(store: Any) -> None:
    checks = [tokens(1000, fixed=0)]
    granted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            got = reserve(store, checks, want=30)
            if got.granted:
                with lock:
                    granted.append(got.out)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000  # clipped grants fill the quota exactly, never past it
    assert used(store, checks) == [1000]


@pytest.mark.parametrize("store", ["cluster"], indirect=True)  # the cluster param only
def test_cluster_keys_of_a_tag_share_one_slot(store: Any) -> None:
    client = store.client
    checks = [tokens(10_000), requests(100), gauge(100), rolling(10_000, slot=0),
              bucket(10_000, fixed=1)]
    # two different tags hash to different slots...
    assert client.keyslot(store.base("u1.1")) != client.keyslot(store.base("u1.2"))
    # ...while every key a script builds for one tag shares the tag's slot
    base = store.base("u1.1")
    names = [base, f"{base}:leases", f"{base}:l:ls_x", f"{base}:d:ls_x"]
    names += [base + c.key for c in checks]
    assert {client.keyslot(name) for name in names} == {client.keyslot(base)}

    # reservations for many tags run on every master, each tag on its own slot's node
    tags = [f"u{n}.{n % 7}" for n in range(60)]
    for tag in tags:
        got = reserve(store, checks, tag=tag, lease=f"ls_{tag}", want=10)
        assert got.granted and got.out == 10
        assert store.settle(tag, f"ls_{tag}", Actual(tokens=5), now_ms=T0).outcome == "settled"
        assert used(store, checks[:2], tag=tag) == [5, 1]
    primaries = client.get_primaries()
    assert len(primaries) == 3
    stored: dict[str, set[str]] = {}  # tag -> the nodes holding its keys
    slots: dict[str, set[int]] = {}  # tag -> the slots of its keys
    for node in primaries:
        for raw in client.scan_iter(match=f"{store.prefix}*", target_nodes=node):
            key = raw.decode()
            tag = key[key.index("{") + 1:key.index("}")]
            stored.setdefault(tag, set()).add(node.name)
            slots.setdefault(tag, set()).add(client.keyslot(key))
    assert set(stored) == set(tags)
    assert all(len(nodes) == 1 for nodes in stored.values())
    assert all(len(found) == 1 for found in slots.values())
    assert {node for nodes in stored.values() for node in nodes} == {n.name for n in primaries}


def test_the_service_counts_on_a_cluster_when_told(redis_cluster: list[tuple[str, int]],
                                                   tmp_path: Path) -> None:
    """MLANE_REDIS_CLUSTER=1: the app's limits run on the Redis Cluster the URL names."""
    from redis.cluster import RedisCluster

    from app import build_wiring
    from core.config import Config
    from migrations.schema import upgrade

    host, port = redis_cluster[0]
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(make_engine(db))
    config = Config.from_env({"MLANE_DATABASE_URL": db, "MLANE_REDIS_URL": f"redis://{host}:{port}/0",
                              "MLANE_REDIS_CLUSTER": "1",
                              "MLANE_REDIS_PREFIX": f"mlt-{uuid.uuid4().hex[:8]}:"})
    wiring = build_wiring(config)
    store = wiring.limits.store
    assert isinstance(store, RedisLimitStore) and isinstance(store.client, RedisCluster)
    checks = [tokens(100)]
    assert reserve(store, checks, want=50).granted
    assert used(store, checks) == [60]
    store.client.close()
    wiring.engine.dispose()


def test_settle_many_is_each_settle_in_one_round_trip(store: Any) -> None:
    checks = [tokens(1000)]
    reserve(store, checks, lease="ls_1")
    reserve(store, checks, lease="ls_2")
    reserve(store, checks, lease="ls_3")
    results = store.settle_many([("u1.1", "ls_1", Actual(tokens=5)), ("u1.1", "ls_2", None),
                                 ("u1.1", "ls_nope", None), ("u1.1", "ls_3", Actual(tokens=7))],
                                now_ms=T0, remember_ms=0)
    assert [r.outcome for r in results] == ["settled", "released", "unknown", "settled"]
    assert used(store, checks) == [12]
    # remember_ms=0 keeps no answer: a repeat finds nothing to settle
    assert store.settle("u1.1", "ls_1", Actual(tokens=5), now_ms=T0).outcome == "unknown"


# -- the Redis store's own connections ------------------------------------------------------

@pytest.fixture()
def redis_store(redis_server: str) -> Iterator[RedisLimitStore]:
    client = redis.Redis.from_url(redis_server)
    yield RedisLimitStore(client, prefix=f"mlt-{uuid.uuid4().hex[:8]}:")
    client.close()


def test_scripts_flushed_on_the_server_are_loaded_again(redis_store: RedisLimitStore) -> None:
    checks = [tokens(1000)]
    reserve(redis_store, checks, lease="ls_a")
    reserve(redis_store, checks, lease="ls_b")
    redis_store.client.script_flush()
    results = redis_store.settle_many([("u1.1", "ls_a", Actual(tokens=5)),
                                       ("u1.1", "ls_b", Actual(tokens=6))], now_ms=T0)
    assert [r.outcome for r in results] == ["settled", "settled"]
    redis_store.client.script_flush()
    assert reserve(redis_store, checks).granted
    assert used(redis_store, checks) == [5 + 6 + 110]


def test_connections_the_server_dropped_are_replaced(redis_server: str) -> None:
    name = f"mlt-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server, client_name=name)
    store = RedisLimitStore(client, prefix=f"{name}:")
    admin = redis.Redis.from_url(redis_server)
    try:
        checks = [tokens(1000)]
        assert reserve(store, checks, lease="ls_1").granted  # its connection is kept
        mine = [c for c in admin.client_list() if c.get("name") == name]
        assert mine
        for c in mine:  # as a server restart would
            admin.client_kill_filter(_id=c["id"])
        # the kept connection fails once inside the store; the call goes on a new one
        assert reserve(store, checks, lease="ls_2").granted
        assert store.settle("u1.1", "ls_1", Actual(tokens=1), now_ms=T0).outcome == "settled"
        assert used(store, checks) == [1 + 110]
    finally:
        client.close()
        admin.close()


def test_leases_stored_by_the_previous_version_still_settle_and_expire(
        redis_store: RedisLimitStore) -> None:
    checks = [tokens(1000)]
    assert reserve(redis_store, checks, lease="ls_new").granted  # creates the counter: 110
    base = redis_store.base("u1.1")
    old = {"charges": [{**{k: str(v) if isinstance(v, int) else v
                           for k, v in c.wire().items()}, "charged": "110"} for c in checks],
           "meta": {"who": "old"}}
    client = redis_store.client
    for lease, expires in (("ls_old_settled", T0 + 60_000), ("ls_old_expired", T0 + 1)):
        client.incrby(f"{base}{checks[0].key}", 110)  # what the old reserve charged
        client.set(f"{base}:l:{lease}", json.dumps(old))
        client.zadd(f"{base}:leases", {lease: expires})
    assert used(redis_store, checks) == [330]
    assert redis_store.settle("u1.1", "ls_old_settled", Actual(tokens=7),
                              now_ms=T0 + 2).outcome == "settled"
    # ls_old_expired was swept by that settle: its 110 returned
    assert used(redis_store, checks, now=T0 + 2) == [110 + 7]
