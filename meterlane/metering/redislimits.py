"""The Redis limit store: each step is one Lua script, atomic on the server.

Every key of a tag is "ml:{<tag>}:...", so a script touches one hash slot and runs on Redis
Cluster. The scripts (lua/*.lua, each prefixed with lua/common.lua) mirror the SQL store's
Python in limitstore.py step for step; the contract suite holds them to one behaviour."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson

from meterlane.metering.limitstore import (
    DONE_TTL_MS,
    Actual,
    Check,
    CheckState,
    Reservation,
    Settlement,
)

PREFIX = "ml:"


def _script(name: str) -> str:
    folder = resources.files("meterlane.metering") / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def _states(raw: list[list[Any]]) -> tuple[CheckState, ...]:
    return tuple(CheckState(int(s[0]), int(s[1]), int(s[2]) if s[2] else None) for s in raw)


def _settlement(raw: bytes) -> Settlement:
    doc = orjson.loads(raw)
    recorded = doc.get("actual")
    return Settlement(doc["outcome"], {k: int(v) for k, v in recorded.items()}
                      if isinstance(recorded, dict) else None)


def _actual(actual: Actual) -> bytes:
    return orjson.dumps({"tokens": str(actual.tokens), "cost": str(actual.cost)})


class RedisLimitStore:
    def __init__(self, client: Any, prefix: str = PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        # A cluster client refuses scripts in a pipeline: there, each settle goes on its own.
        self.batches = type(client).__name__ != "RedisCluster"
        self._scripts = {name: client.register_script(_script(name))
                         for name in ("reserve", "settle", "peek", "commit", "overwrite")}

    def base(self, tag: str) -> str:
        return f"{self.prefix}{{{tag}}}"

    def _run(self, name: str, tag: str, *args: Any) -> Any:
        return self._scripts[name](keys=[self.base(tag)], args=list(args))

    def ping(self) -> None:
        self.client.ping()

    def reserve(self, tag: str, lease_id: str, checks: list[Check], *, now_ms: int,
                expires_ms: int, want_out: int, min_out: int, clip: bool,
                meta: dict[str, Any]) -> Reservation:
        raw = self._run("reserve", tag, now_ms, lease_id, expires_ms, want_out, min_out,
                        1 if clip else 0, orjson.dumps(meta),
                        orjson.dumps([c.wire() for c in checks]))
        doc = orjson.loads(raw)
        if doc["granted"]:
            return Reservation(True, int(doc["out"]), None, _states(doc["states"]))
        refused = int(doc["refused"])
        return Reservation(False, 0, refused if refused >= 0 else None, _states(doc["states"]))

    def settle(self, tag: str, lease_id: str, actual: Actual | None, *, now_ms: int,
               remember_ms: int = DONE_TTL_MS) -> Settlement:
        return _settlement(self._run("settle", tag, now_ms, lease_id,
                                     _actual(actual) if actual is not None else "",
                                     remember_ms))

    def settle_many(self, items: list[tuple[str, str, Actual | None]], *, now_ms: int,
                    remember_ms: int = DONE_TTL_MS) -> list[Settlement]:
        """Several settles in one round trip (a pipeline; each script stays atomic)."""
        if len(items) == 1 or not self.batches:
            return [self.settle(tag, lease_id, actual, now_ms=now_ms, remember_ms=remember_ms)
                    for tag, lease_id, actual in items]
        pipe = self.client.pipeline(transaction=False)
        script = self._scripts["settle"]
        for tag, lease_id, actual in items:
            script(keys=[self.base(tag)], args=[
                now_ms, lease_id, _actual(actual) if actual is not None else "", remember_ms],
                client=pipe)
        return [_settlement(raw) for raw in pipe.execute()]

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

    def overwrite(self, tag: str, values: list[tuple[Check, int]], *, now_ms: int) -> None:
        self._run("overwrite", tag, now_ms, orjson.dumps([[c.wire(), v] for c, v in values]))
