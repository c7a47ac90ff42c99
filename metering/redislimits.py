"""The Redis limit store: each step is one Lua script, atomic on the server.

Every key of a tag is "ml:{<tag>}:...", so a script touches one hash slot and runs on Redis
Cluster. The scripts (lua/*.lua, each prefixed with lua/common.lua) mirror the SQL store's
Python in limitstore.py step for step; the contract suite holds them to one behaviour."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from metering.limitstore import (
    DONE_TTL_MS,
    Actual,
    Check,
    CheckState,
    Reservation,
    Settlement,
)

PREFIX = "ml:"
MAX_IDLE = 64  # idle connections a worker keeps for its scripts
# How long a reservation may hold its whole worker waiting for Redis's reply (which comes in
# tens of us) before it waits cooperatively; only while the worker serves no other call
# (RedisLimitStore.hold_first).
HOLD_S = 0.0002


def _script(name: str) -> str:
    folder = resources.files("metering") / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def _states(raw: list[list[Any]]) -> tuple[CheckState, ...]:
    return tuple(CheckState(int(s[0]), int(s[1]), int(s[2]) if s[2] else None) for s in raw)


def _settlement(raw: bytes) -> Settlement:
    doc = orjson.loads(raw)
    recorded = doc.get("actual")
    return Settlement(doc["outcome"], {k: int(v) for k, v in recorded.items()}
                      if isinstance(recorded, dict) else None)


def _actual(actual: Actual) -> bytes:
    return orjson.dumps({"tokens": str(actual.tokens), "cost": str(actual.cost),
                         "credits": str(actual.charge({"metric": "w"}, 0))})


def pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP, as redis-py packs it (its packer checks every argument against
    half a dozen types: a fifth of a reservation's CPU). Arguments are str (UTF-8), int or
    bytes; anything else is refused, as redis-py refuses it (a float would lose digits)."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            raise TypeError(f"a Redis argument must be str, int or bytes, not {kind.__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


@functools.cache
def _blocking_select() -> Callable[..., Any]:
    """select.select as it was before gevent patched it: it blocks the whole process."""
    from gevent.monkey import get_original

    return get_original("select", "select")  # type: ignore[no-any-return]


def _hold(conn: Any) -> None:
    """Wait up to HOLD_S for a reply without giving gevent's hub a turn. A turn would run the
    worker's background work first (the last call's settle and commit: hundreds of us) while
    the reply waits, and this call with it; after HOLD_S the read waits cooperatively."""
    monkey = sys.modules.get("gevent.monkey")
    sock = getattr(conn, "_sock", None)
    if monkey is None or sock is None or not monkey.is_module_patched("select"):
        return  # not under gevent: the read blocks anyway
    _blocking_select()([sock.fileno()], [], [], HOLD_S)


class _Lane:
    """Commands on connections of the store's own: a free list of redis-py connections made
    with the client's settings (address, auth, database, TLS, timeouts). redis-py's pool
    checks each connection it lends for unread data (a poll), takes a lock and records
    metrics on every command: under gevent that is about 80 us a call, half of what a
    reservation costs. A connection that fails is dropped; one that fails after waiting in
    the free list (the server restarted) is replaced and the commands are sent once more, as
    redis-py's default retry does."""

    def __init__(self, client: Any) -> None:
        pool = client.connection_pool
        self._cls = pool.connection_class
        self._kwargs = dict(pool.connection_kwargs)
        self._free: list[Any] = []
        self._pid = os.getpid()

    def run(self, commands: list[tuple[Any, ...]], hold: bool = False) -> list[Any]:
        """Send `commands` in one write and read their replies; an error reply is returned
        as its ResponseError, the others as redis-py parses them. `hold`: wait for them
        holding the worker at first (_hold)."""
        if self._pid != os.getpid():  # a forked child never shares its parent's sockets
            self._free, self._pid = [], os.getpid()
        try:
            conn, reused = self._free.pop(), True
        except IndexError:  # none free (atomic under threads as under greenlets)
            conn, reused = self._cls(**self._kwargs), False
        try:
            replies = self._send(conn, commands, hold)
        except RedisConnectionError:
            conn.disconnect()
            if not reused:
                raise
            conn = self._cls(**self._kwargs)
            try:
                replies = self._send(conn, commands)
            except BaseException:
                conn.disconnect()
                raise
        except BaseException:
            conn.disconnect()
            raise
        if len(self._free) < MAX_IDLE:
            self._free.append(conn)
        else:  # after a burst, keep a bounded number of idle connections
            conn.disconnect()
        return replies

    @staticmethod
    def _send(conn: Any, commands: list[tuple[Any, ...]], hold: bool = False) -> list[Any]:
        conn.send_packed_command([b"".join(map(pack, commands))], check_health=False)
        if hold:
            _hold(conn)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:  # the connection stays in step: read the rest
                replies.append(exc)
        return replies


class RedisLimitStore:
    def __init__(self, client: Any, prefix: str = PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        # A cluster client refuses scripts in a pipeline and has no single pool: there, each
        # script goes through the client, and each settle on its own.
        self.batches = type(client).__name__ != "RedisCluster"
        self._source = {name: _script(name)
                        for name in ("reserve", "settle", "peek", "commit", "overwrite", "renew")}
        self._scripts = {name: client.register_script(src) for name, src in self._source.items()}
        self._sha = {name: script.sha for name, script in self._scripts.items()}
        self._lane = _Lane(client) if self.batches else None
        # Whether the worker serves no call but the caller's (the gateway's router says): a
        # reservation then waits for its reply holding the worker at first (_hold).
        self.hold_first: Callable[[], bool] | None = None

    def base(self, tag: str) -> str:
        return f"{self.prefix}{{{tag}}}"

    def _run(self, name: str, tag: str, *args: Any, hold: bool = False) -> Any:
        if self._lane is None:
            return self._scripts[name](keys=[self.base(tag)], args=list(args))
        return self._run_many(name, [(tag, args)], hold)[0]

    def _run_many(self, name: str, calls: list[tuple[str, tuple[Any, ...]]],
                  hold: bool = False) -> list[Any]:
        """One script on several tags, in one round trip; raises the first error reply."""
        assert self._lane is not None
        sha = self._sha[name]
        commands = [("EVALSHA", sha, 1, self.base(tag), *args) for tag, args in calls]
        replies = self._lane.run(commands, hold)
        if any(isinstance(r, NoScriptError) for r in replies):  # the server forgot it
            self._lane.run([("SCRIPT", "LOAD", self._source[name])])
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for i, reply in zip(again, self._lane.run([commands[i] for i in again]),
                                strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    def ping(self) -> None:
        self.client.ping()

    def reserve(self, tag: str, lease_id: str, checks: list[Check], *, now_ms: int,
                expires_ms: int, want_out: int, min_out: int, clip: bool,
                meta: dict[str, Any]) -> Reservation:
        hold = self.hold_first is not None and self.hold_first()
        raw = self._run("reserve", tag, now_ms, lease_id, expires_ms, want_out, min_out,
                        1 if clip else 0, orjson.dumps(meta),
                        orjson.dumps([c.wire() for c in checks]), hold=hold)
        doc = orjson.loads(raw)
        if doc["granted"]:
            return Reservation(True, int(doc["out"]), None, _states(doc["states"]))
        refused = int(doc["refused"])
        return Reservation(False, 0, refused if refused >= 0 else None, _states(doc["states"]))

    def renew(self, tag: str, lease_id: str, *, now_ms: int, expires_ms: int) -> bool:
        return int(self._run("renew", tag, now_ms, lease_id, expires_ms)) == 1

    def settle(self, tag: str, lease_id: str, actual: Actual | None, *, now_ms: int,
               remember_ms: int = DONE_TTL_MS) -> Settlement:
        return _settlement(self._run("settle", tag, now_ms, lease_id,
                                     _actual(actual) if actual is not None else "",
                                     remember_ms))

    def settle_many(self, items: list[tuple[str, str, Actual | None]], *, now_ms: int,
                    remember_ms: int = DONE_TTL_MS) -> list[Settlement]:
        """Several settles in one round trip (a pipeline; each script stays atomic)."""
        if self._lane is None:
            return [self.settle(tag, lease_id, actual, now_ms=now_ms, remember_ms=remember_ms)
                    for tag, lease_id, actual in items]
        replies = self._run_many("settle", [
            (tag, (now_ms, lease_id, _actual(actual) if actual is not None else "", remember_ms))
            for tag, lease_id, actual in items])
        return [_settlement(raw) for raw in replies]

    def lease_meta(self, tag: str, lease_id: str) -> dict[str, Any] | None:
        base = self.base(tag)
        for key in (f"{base}:l:{lease_id}", f"{base}:d:{lease_id}"):
            raw = self.client.get(key)
            if raw is not None:
                meta: dict[str, Any] | None = orjson.loads(raw).get("meta")
                return meta
        return None

    def peek(self, tag: str, checks: list[Check], *, now_ms: int) -> tuple[CheckState, ...]:
        checks_doc = orjson.dumps([c.wire() for c in checks])
        doc = orjson.loads(self._run("peek", tag, now_ms, checks_doc))
        return _states(doc["states"])

    def commit(self, tag: str, event_id: str, checks: list[Check], actual: Actual, *,
               now_ms: int) -> bool:
        return bool(self._run("commit", tag, now_ms, event_id, _actual(actual),
                              orjson.dumps([c.wire() for c in checks])))

    def peek_many(self, items: list[tuple[str, list[Check]]], *, now_ms: int
                  ) -> list[tuple[CheckState, ...]]:
        """Several peeks in one round trip."""
        if self._lane is None or not items:
            return [self.peek(tag, checks, now_ms=now_ms) for tag, checks in items]
        replies = self._run_many("peek", [
            (tag, (now_ms, orjson.dumps([c.wire() for c in checks]))) for tag, checks in items])
        return [_states(orjson.loads(raw)["states"]) for raw in replies]

    def commit_many(self, items: list[tuple[str, str, list[Check], Actual]], *,
                    now_ms: int) -> list[bool]:
        """Several commits in one round trip (a pipeline; each script stays atomic)."""
        if self._lane is None or not items:
            return [self.commit(tag, event_id, checks, actual, now_ms=now_ms)
                    for tag, event_id, checks, actual in items]
        replies = self._run_many("commit", [
            (tag, (now_ms, event_id, _actual(actual), orjson.dumps([c.wire() for c in checks])))
            for tag, event_id, checks, actual in items])
        return [bool(r) for r in replies]

    def overwrite(self, tag: str, values: list[tuple[Check, int]], *, now_ms: int) -> None:
        self._run("overwrite", tag, now_ms, orjson.dumps([[c.wire(), v] for c, v in values]))
