"""Keys over HTTP (issue 17, part 2): created (shown once), listed (never a secret), rotated
with an overlap after which the old key is refused, revoked; an app-bound admin key manages
its own app's keys only; the CLI calls the same service. Real Postgres, Flask's test client."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from core.auth import Role
from core.models import ApiKey
from tests.conftest import bearer

pytestmark = pytest.mark.integration


def _call(client: Any, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    resp = client.open(path, method=method, json=body, headers=bearer(key))
    return resp.status_code, resp.get_json()


def _works(client: Any, key: str) -> int:
    return int(client.get("/v1/models", headers=bearer(key)).status_code)


@pytest.fixture()
def operator(app: Any) -> str:
    return str(app.extensions["wiring"].keys.create_key(Role.ADMIN, None).key)


def test_a_key_is_created_listed_rotated_and_revoked_over_http(app: Any, client: Any,
                                                              operator: str,
                                                              clean_db: Engine) -> None:
    status, made = _call(client, "POST", "/v1/keys", operator, {
        "role": "app", "app": "acme", "name": "prod", "description": "the acme backend"})
    assert status == 201, made
    key = made["key"]
    assert key.startswith(f"mlk_{made['id']}_") and made["prefix"] == f"mlk_{made['id']}"
    assert (made["role"], made["app"], made["state"]) == ("app", "acme", "active")
    assert made["description"] == "the acme backend" and made["expires_at"] is None
    assert _works(client, key) == 200

    status, listed = _call(client, "GET", "/v1/keys?app=acme", operator)
    assert status == 200 and listed["has_more"] is False
    [row] = [k for k in listed["data"] if k["id"] == made["id"]]
    assert "key" not in row and key.split("_", 2)[2] not in str(listed)  # never the secret
    with clean_db.connect() as conn:
        digest = conn.execute(select(ApiKey.secret_sha256)
                              .where(ApiKey.key_id == made["id"])).scalar_one()
    assert digest not in str(listed)  # nor its hash
    assert row["last_used_at"] is not None  # it was used above
    assert _works(client, key) == 200  # used again within the minute: not written again
    status, relisted = _call(client, "GET", f"/v1/keys/{made['id']}", operator)
    assert relisted["last_used_at"] == row["last_used_at"]
    assert row["created_at"] == made["created_at"]

    # rotate with a 1 s overlap: both keys work, then only the new one
    status, rotated = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", operator,
                            {"overlap_seconds": 1})
    assert status == 201, rotated
    new = rotated["key"]
    assert rotated["rotated_from"] == made["prefix"] and rotated["id"] != made["id"]
    assert (rotated["role"], rotated["app"], rotated["description"]) == (
        "app", "acme", "the acme backend")
    assert rotated["previous"]["expires_at"] is not None
    assert _works(client, new) == 200
    deadline = time.monotonic() + 10
    while _works(client, key) == 200:  # the overlap is wall-clock time: wait it out
        assert time.monotonic() < deadline, "the old key still works after its overlap"
        time.sleep(0.1)
    assert _works(client, key) == 401
    assert _works(client, new) == 200
    status, old = _call(client, "GET", f"/v1/keys/{made['id']}", operator)
    assert status == 200 and old["state"] == "expired"

    # revoke: refused at once (this worker forgets it); a second revoke changes nothing
    status, revoked = _call(client, "DELETE", f"/v1/keys/{rotated['id']}", operator)
    assert status == 200 and revoked["state"] == "revoked" and revoked["revoked_at"]
    assert _works(client, new) == 401
    status, again = _call(client, "DELETE", f"/v1/keys/{rotated['id']}", operator)
    assert status == 200 and again["revoked_at"] == revoked["revoked_at"]
    status, active = _call(client, "GET", "/v1/keys?app=acme", operator)
    assert rotated["id"] not in [k["id"] for k in active["data"]]
    status, every = _call(client, "GET", "/v1/keys?app=acme&include_revoked=true", operator)
    assert rotated["id"] in [k["id"] for k in every["data"]]
    status, _ = _call(client, "POST", f"/v1/keys/{rotated['id']}/rotate", operator, {})
    assert status == 409  # a revoked key has no successor


def test_the_list_pages_with_a_cursor(client: Any, operator: str) -> None:
    made = [_call(client, "POST", "/v1/keys", operator, {"role": "finance", "app": "acme"})[1]
            ["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        query = "/v1/keys?app=acme&role=finance&limit=2" + (
            f"&starting_after={after}" if after else "")
        status, page = _call(client, "GET", query, operator)
        assert status == 200 and len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == made[::-1]  # newest first, each once
    for bad in ("limit=0", "limit=101", "role=root", "include_revoked=maybe"):
        status, problem = _call(client, "GET", f"/v1/keys?{bad}", operator)
        assert status == 422 and problem["errors"], (bad, problem)
    status, _ = _call(client, "GET", "/v1/keys?starting_after=ffffffffffffffff", operator)
    assert status == 404


def test_an_app_admin_manages_only_its_own_apps_keys(app: Any, client: Any,
                                                     operator: str) -> None:
    service = app.extensions["wiring"].keys
    acme_admin = service.create_key(Role.ADMIN, "acme").key
    globex_key = service.create_key(Role.APP, "globex").key
    globex_id = globex_key.split("_")[1]

    status, made = _call(client, "POST", "/v1/keys", acme_admin, {"role": "admin"})
    assert status == 201 and made["app"] == "acme"  # its own app, never operator-wide
    status, made = _call(client, "POST", "/v1/keys", acme_admin,
                         {"role": "user", "user": "alice", "ttl_seconds": 600})
    assert status == 201 and (made["app"], made["user"]) == ("acme", "alice")
    status, _ = _call(client, "POST", "/v1/keys", acme_admin, {"role": "app", "app": "globex"})
    assert status == 403
    status, _ = _call(client, "POST", "/v1/keys", acme_admin, {"role": "admin", "app": None})
    assert status == 422

    status, listed = _call(client, "GET", "/v1/keys?include_revoked=true", acme_admin)
    assert status == 200 and {k["app"] for k in listed["data"]} == {"acme"}
    assert globex_id not in str(listed)
    status, _ = _call(client, "GET", "/v1/keys?app=globex", acme_admin)
    assert status == 403
    for method, path in (("GET", f"/v1/keys/{globex_id}"), ("DELETE", f"/v1/keys/{globex_id}"),
                         ("POST", f"/v1/keys/{globex_id}/rotate")):
        status, problem = _call(client, method, path, acme_admin, {})
        assert status == 404, (method, path, problem)  # as unknown as a key that is not there
    assert _works(client, globex_key) == 200

    # an app key mints end-user keys, and manages no keys: a leaked one cannot outlive itself
    app_key = service.create_key(Role.APP, "acme").key
    finance = service.create_key(Role.FINANCE, None).key
    for key in (app_key, finance):
        assert _call(client, "POST", "/v1/keys", key, {"role": "app"})[0] == 403
        assert _call(client, "GET", "/v1/keys", key)[0] == 403
    # the operator sees every app's keys
    status, listed = _call(client, "GET", "/v1/keys?limit=100", operator)
    assert {"acme", "globex", None} <= {k["app"] for k in listed["data"]}


def test_rotation_keeps_a_lifetime_and_bounds_its_overlap(client: Any, operator: str) -> None:
    status, made = _call(client, "POST", "/v1/keys", operator,
                         {"role": "app", "app": "acme", "ttl_seconds": 3600})
    assert status == 201 and made["expires_at"]
    status, problem = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", operator,
                            {"overlap_seconds": 8 * 24 * 3600})
    assert status == 422 and "overlap_seconds" in problem["errors"]
    status, rotated = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", operator,
                            {"overlap_seconds": 7200})
    assert status == 201 and rotated["expires_at"] is not None  # an hour, as the old one
    # never past the old key's own expiry
    assert rotated["previous"]["expires_at"] <= made["expires_at"]


def test_the_cli_lists_rotates_and_revokes_through_the_same_service(
        app: Any, client: Any, pg_url: str, tmp_path: Any, clean_db: Engine) -> None:
    from app import main

    env = {"MLANE_DATABASE_URL": pg_url, "MLANE_DATA_DIR": str(tmp_path / "cli")}
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "create", "--role", "app", "--app", "acme",
                                "--description", "cli made"], env=env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    listed = runner.invoke(main, ["keys", "list", "--app", "acme"], env=env)
    assert listed.exit_code == 0 and f"mlk_{key_id}" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout and "cli made" in listed.stdout
    rotated = runner.invoke(main, ["keys", "rotate", f"mlk_{key_id}", "--overlap-seconds",
                                   "0"], env=env)
    assert rotated.exit_code == 0, rotated.output
    new = rotated.stdout.strip().splitlines()[-1]
    assert _works(client, key) == 401 and _works(client, new) == 200
    revoked = runner.invoke(main, ["keys", "revoke", new], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert _works(client, new) == 401
    missing = runner.invoke(main, ["keys", "revoke", "0123456789abcdef"], env=env)
    assert missing.exit_code != 0 and "No key" in missing.output
    admin = app.extensions["wiring"].keys.create_key(Role.ADMIN, None).key
    status, trail = _call(client, "GET", "/v1/audit?limit=100", admin)
    rows = [r for r in trail["data"] if r["actor"]["role"] == "cli"]
    assert [r["action"] for r in rows] == ["key.revoke", "key.create", "key.rotate",
                                           "key.create"]
    assert all(r["actor"]["name"] and r["actor"]["key_id"] is None for r in rows)


def test_an_app_keys_end_user_keys_are_audited_too(app: Any, client: Any,
                                                    operator: str) -> None:
    app_key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    status, minted = _call(client, "POST", "/v1/users/alice/keys", app_key,
                           {"ttl_seconds": 600})
    assert status == 201
    status, trail = _call(client, "GET", "/v1/audit?action=key.create", operator)
    [row] = trail["data"]
    assert (row["actor"]["key_id"], row["actor"]["role"], row["app"]) == (
        app_key.split("_")[1], "app", "acme")
    assert row["target"]["id"] == minted["key"].split("_")[1]
    assert row["after"]["user"] == "alice" and minted["key"] not in str(trail)


def test_the_worker_that_revokes_or_rotates_forgets_its_cached_keys_at_once(
        app_config: Any) -> None:
    """With keys cached for a minute, the worker that revokes (or rotates with no overlap)
    refuses the key on its very next call."""
    from dataclasses import replace

    from app import create_app

    cached = create_app(replace(app_config, key_cache_seconds=60))
    try:
        client = cached.test_client()
        service = cached.extensions["wiring"].keys
        operator = service.create_key(Role.ADMIN, None).key
        revoked, rotated = (service.create_key(Role.APP, "acme").key for _ in range(2))
        assert _works(client, revoked) == 200 and _works(client, rotated) == 200  # cached
        assert _call(client, "DELETE", f"/v1/keys/{revoked.split('_')[1]}", operator)[0] == 200
        assert _works(client, revoked) == 401
        status, successor = _call(client, "POST", f"/v1/keys/{rotated.split('_')[1]}/rotate",
                                  operator, {"overlap_seconds": 0})
        assert status == 201
        assert _works(client, rotated) == 401 and _works(client, successor["key"]) == 200
    finally:
        cached.extensions["wiring"].engine.dispose()


def test_a_key_rotates_once_and_its_successor_keeps_the_keys_own_lifetime(
        client: Any, operator: str) -> None:
    """A second rotation (a client's retry after a lost answer) is refused, naming the
    successor: it would make a second live successor, its lifetime cut to the first's
    overlap. The successor may be rotated in turn."""
    status, made = _call(client, "POST", "/v1/keys", operator, {"role": "app", "app": "acme"})
    assert status == 201 and made["expires_at"] is None  # a permanent key
    status, first = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", operator,
                          {"overlap_seconds": 600})
    assert status == 201 and first["expires_at"] is None  # as permanent as the old key
    resp = client.post(f"/v1/keys/{made['id']}/rotate", json={"overlap_seconds": 600},
                       headers=bearer(operator))
    assert resp.status_code == 409 and resp.mimetype == "application/problem+json"
    problem = resp.get_json()
    assert first["prefix"] in problem["detail"] and "rotates once" in problem["detail"]
    status, listed = _call(client, "GET", "/v1/keys?app=acme&limit=100", operator)
    assert [k["id"] for k in listed["data"] if k["rotated_from"] == made["prefix"]] == [
        first["id"]]  # one successor, not two
    assert _works(client, first["key"]) == 200
    status, second = _call(client, "POST", f"/v1/keys/{first['id']}/rotate", operator, {})
    assert status == 201 and second["rotated_from"] == first["prefix"]
    assert second["expires_at"] is None


def _waits_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar())


def _meanwhile(engine: Engine, call: Any) -> tuple[threading.Thread, list[Any]]:
    """`call` in another thread, returned once it has ended or waits for a lock (this
    transaction's: nothing else runs in the test's database)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while thread.is_alive() and not _waits_for_a_lock(engine):
        assert time.monotonic() < deadline, "the other call neither ended nor waited"
        time.sleep(0.001)
    return thread, out


@pytest.mark.parametrize("first", ["rotation", "revocation"])
def test_a_rotation_and_a_revocation_at_once_never_give_a_revoked_key_a_later_successor(
        app: Any, clean_db: Engine, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """Invariant: a revoked key's successor, if it has one, was made before the revocation
    (never a live successor of a key revoked first). Each call comes while the other holds
    the key's row, between its read and its write (Postgres, threads)."""
    import core.keys as keys_module
    from core.audit import Actor
    from core.errors import ConflictError

    service = app.extensions["wiring"].keys
    key_id = service.create_key(Role.APP, "acme").key.split("_")[1]
    actor = Actor.cli()
    others: list[tuple[threading.Thread, list[Any]]] = []

    def rotate() -> Any:
        return service.rotate(actor, key_id, overlap_seconds=600)

    def revoke() -> Any:
        return service.revoke(actor, key_id)

    if first == "rotation":
        issue_in = keys_module.issue_in

        def issuing(conn: Any, **kwargs: Any) -> Any:  # the rotation has read the key
            others.append(_meanwhile(clean_db, revoke))
            return issue_in(conn, **kwargs)

        monkeypatch.setattr(keys_module, "issue_in", issuing)
        rotate()
    else:
        record = keys_module.record

        def recording(conn: Any, actor: Any, action: str, **kwargs: Any) -> None:
            if action == "key.revoke":  # the revocation is written, not yet committed
                others.append(_meanwhile(clean_db, rotate))
            record(conn, actor, action, **kwargs)

        monkeypatch.setattr(keys_module, "record", recording)
        revoke()
    [(thread, out)] = others
    thread.join(30)
    assert not thread.is_alive() and len(out) == 1
    if first == "revocation":
        assert isinstance(out[0], ConflictError) and "revoked" in out[0].detail
    with clean_db.connect() as conn:
        revoked_at = conn.execute(select(ApiKey.revoked_at).where(ApiKey.key_id == key_id)
                                  ).scalar_one()
        made = conn.execute(select(ApiKey.created_at).where(ApiKey.rotated_from == select(
            ApiKey.id).where(ApiKey.key_id == key_id).scalar_subquery())).scalars().all()
    assert revoked_at is not None
    assert all(at < revoked_at for at in made), (made, revoked_at)
    assert len(made) == (1 if first == "rotation" else 0)


def test_a_user_key_made_or_rotated_by_an_admin_has_an_end_user_keys_lifetime(
        app: Any, client: Any, operator: str, clean_db: Engine) -> None:
    """As a key an app mints (POST /v1/users/{u}/keys): 1 hour when none is asked (the
    default), refused past user_key_max_ttl_seconds (7 days), on create and on rotate."""
    from datetime import datetime, timedelta

    from core.auth import issue_in
    from core.db import utcnow

    acme_admin = app.extensions["wiring"].keys.create_key(Role.ADMIN, "acme").key
    status, made = _call(client, "POST", "/v1/keys", acme_admin,
                         {"role": "user", "user": "bob"})
    assert status == 201, made
    lifetime = datetime.fromisoformat(made["expires_at"]) - datetime.fromisoformat(
        made["created_at"])
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)
    week = 7 * 24 * 3600
    status, problem = _call(client, "POST", "/v1/keys", acme_admin,
                            {"role": "user", "user": "bob", "ttl_seconds": week + 1})
    assert status == 400 and problem["param"] == "ttl_seconds" and str(week) in problem["detail"]
    assert _call(client, "POST", "/v1/keys", acme_admin,
                 {"role": "user", "user": "bob", "ttl_seconds": week})[0] == 201
    status, problem = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", acme_admin,
                            {"ttl_seconds": 10 * 365 * 24 * 3600})
    assert status == 400 and problem["param"] == "ttl_seconds"
    status, rotated = _call(client, "POST", f"/v1/keys/{made['id']}/rotate", acme_admin, {})
    assert status == 201 and rotated["expires_at"] is not None  # its hour again
    # a user key made before the cap held (no expiry): its successor gets the default
    with clean_db.begin() as conn:
        app_id, end_user_id = conn.execute(select(ApiKey.app_id, ApiKey.end_user_id).where(
            ApiKey.key_id == made["id"])).one()
        old, _ = issue_in(conn, role=Role.USER, app_id=app_id, end_user_id=end_user_id)
    status, rotated = _call(client, "POST", f"/v1/keys/{old.split('_')[1]}/rotate",
                            acme_admin, {})
    assert status == 201, rotated
    assert datetime.fromisoformat(rotated["expires_at"]) <= utcnow() + timedelta(hours=1)


@pytest.mark.parametrize("other", ["revocation", "second rotation"])
def test_on_sqlite_nothing_writes_between_a_rotations_check_and_its_write(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    """The embedded default: SQLite's driver reads outside any transaction until the first
    write, so a revocation (or a second rotation) could commit between a rotation's checks
    and its successor. Each is tried right there, from another connection: it must wait for
    the rotation (here: give up after its 0.2 s busy timeout), never get in between."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    import core.keys as keys_module
    from app import create_app
    from core.audit import Actor
    from tests.conftest import config_from_toml

    app = create_app(config_from_toml("", tmp_path,
                                      database_url=f"sqlite:///{tmp_path / 'keys.db'}"))
    engine: Engine = app.extensions["wiring"].engine
    try:
        service = app.extensions["wiring"].keys
        key_id = service.create_key(Role.APP, "acme").key.split("_")[1]
        engine.dispose()  # every connection from now on gives up on a lock after 0.2 s
        event.listen(engine, "connect",
                     lambda conn, _rec: conn.execute("PRAGMA busy_timeout=200"))
        actor = Actor.cli()
        between: list[BaseException | None] = []
        tried: list[bool] = []
        issue_in = keys_module.issue_in

        def issuing(conn: Any, **kwargs: Any) -> Any:  # the rotation has checked the key
            if not tried:  # (once: the other call, a rotation, comes through here too)
                tried.append(True)
                try:
                    if other == "revocation":
                        service.revoke(actor, key_id)
                    else:
                        service.rotate(actor, key_id, overlap_seconds=60)
                    between.append(None)
                except OperationalError as exc:
                    between.append(exc)
            return issue_in(conn, **kwargs)

        monkeypatch.setattr(keys_module, "issue_in", issuing)
        service.rotate(actor, key_id, overlap_seconds=600)
        assert len(between) == 1 and between[0] is not None, "it got in between"
        assert "locked" in str(between[0])
        with engine.connect() as conn:
            old = conn.execute(select(ApiKey.id, ApiKey.revoked_at)
                               .where(ApiKey.key_id == key_id)).one()
            successors = conn.execute(select(ApiKey.key_id)
                                      .where(ApiKey.rotated_from == old.id)).all()
        assert old.revoked_at is None and len(successors) == 1
    finally:
        engine.dispose()
