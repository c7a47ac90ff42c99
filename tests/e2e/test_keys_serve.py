"""Keys over HTTP against a real `meterlane serve` (2 gevent workers, each with its own cache of
verified keys, MLANE_KEY_CACHE_SECONDS=2 as shipped): a key's last use is written beside the
request, a rotated key is refused on every worker after its overlap, a revoked one within the
cache's seconds; every step is in the audit trail."""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.polling import wait_for
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
CACHE_SECONDS = 2


def request(base: str, method: str, path: str, key: str, body: Any = None
            ) -> tuple[int, Any]:
    """One request on a connection of its own (so that both workers answer some)."""
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=10)
    try:
        conn.request(method, path, body=None if body is None else orjson.dumps(body),
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, orjson.loads(data) if data else None
    finally:
        conn.close()


def statuses(base: str, key: str, n: int = 12) -> set[int]:
    return {request(base, "GET", "/v1/models", key)[0] for _ in range(n)}


@pytest.fixture(scope="module")
def served(pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp: Path = tmp_path_factory.mktemp("keys")
    url = create_database(pg_server, f"mlane_keys_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": str(CACHE_SECONDS)}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "admin", "--description", "operator")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    try:
        yield base, created.stdout.strip().splitlines()[-1]
    finally:
        stop(proc)


def test_rotation_and_revocation_reach_every_worker(served: tuple[str, str]) -> None:
    base, admin = served
    status, made = request(base, "POST", "/v1/keys", admin,
                           {"role": "app", "app": "acme", "description": "backend"})
    assert status == 201, made
    old = made["key"]
    assert statuses(base, old) == {200}

    def last_used() -> Any:
        return request(base, "GET", f"/v1/keys/{made['id']}", admin)[1]["last_used_at"]

    wait_for(lambda: last_used() is not None, 20, "the key's last use was never written",
             interval=0.1)

    status, rotated = request(base, "POST", f"/v1/keys/{made['id']}/rotate", admin,
                              {"overlap_seconds": 1})
    assert status == 201, rotated
    rotated_at = time.monotonic()
    new = rotated["key"]
    assert statuses(base, new) == {200}
    # the old key: refused by every worker once the overlap is over and every worker's
    # cached copy (read before the rotation, without the new expiry) has lapsed
    bound = max(1, CACHE_SECONDS) + 0.5
    wait_for(lambda: time.monotonic() - rotated_at > bound, 20,  # the documented bound
             interval=0.1)
    assert statuses(base, old) == {401} and statuses(base, new) == {200}

    status, revoked = request(base, "DELETE", f"/v1/keys/{rotated['id']}", admin)
    assert status == 200 and revoked["state"] == "revoked"
    revoked_at = time.monotonic()
    # the revoking worker at once; the other within MLANE_KEY_CACHE_SECONDS
    wait_for(lambda: time.monotonic() - revoked_at > CACHE_SECONDS + 0.5, 20, interval=0.1)
    assert statuses(base, new, 20) == {401}

    status, trail = request(base, "GET", "/v1/audit?app=acme", admin)
    assert status == 200
    assert [r["action"] for r in trail["data"]][::-1] == [
        "key.create", "key.rotate", "key.create", "key.revoke"]
    assert {r["actor"]["key"] for r in trail["data"]} == {f"mlk_{admin.split('_')[1]}"}
