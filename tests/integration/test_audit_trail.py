"""The audit trail (issue 17, part 3): a scripted admin session leaves exactly its rows (when,
which key, which app, what, before and after), an app-bound admin key sees its app's rows
only, filters and the cursor work, and the database itself refuses to UPDATE or DELETE a row
(Postgres and SQLite triggers). Real Postgres, the fake Stripe, Flask's test client."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from core.audit import Actor, record
from core.db import make_engine, utcnow
from tests.support.consent import publish_offer
from tests.support.lifecycle import World, open_world

pytestmark = pytest.mark.integration

world = pytest.fixture(name="world")(open_world)


def _trail(w: World, key: str, query: str = "") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = ""
    while True:
        status, page = w.call("GET", f"/v1/audit?limit=3{query}{after}", key=key)
        assert status == 200, page
        rows += page["data"]
        if not page["has_more"]:
            return rows
        after = f"&starting_after={page['data'][-1]['id']}"


def test_a_scripted_admin_session_leaves_exactly_its_audit_rows(world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("carol", "pro", "US-CA")  # the set-up: not the session
    marker = max(r["id"] for r in _trail(w, w.admin))
    operator_id = w.admin.split("_")[1]

    # -- the session ---------------------------------------------------------------------
    status, made = w.call("POST", "/v1/keys", {"role": "admin", "app": "acme",
                                               "description": "support desk"}, key=w.admin)
    assert status == 201, made
    desk, desk_id = made["key"], made["id"]
    when = (utcnow() + timedelta(hours=1)).replace(microsecond=0)
    status, _ = w.call("POST", "/v1/prices", {"model": "gpt-4o-mini", "input": "0.20",
                                              "output": "0.80",
                                              "effective_from": when.isoformat()}, key=w.admin)
    assert status == 201
    effective = (utcnow() + timedelta(days=45)).replace(microsecond=0)
    status, change = w.call("POST", "/v1/price-changes", {
        "plan": "trial", "to_version": 2, "effective_at": effective.isoformat()}, key=w.admin)
    assert status == 201, change
    status, _ = w.call("PUT", "/v1/users/bob/plan", {"plan": "pro"}, key=desk)
    assert status == 200
    status, _ = w.call("PUT", "/v1/users/bob/plan", {"plan": "lite"}, key=desk)
    assert status == 200
    status, grant = w.call("POST", "/v1/users/bob/credits/grants", {
        "amount": 500, "source": "promotion", "external_id": "promo-1"}, key=desk)
    assert status == 201
    status, again = w.call("POST", "/v1/users/bob/credits/grants", {
        "amount": 500, "source": "promotion", "external_id": "promo-1"}, key=desk)
    assert status == 200  # the same grant again: no change, no row
    status, hook = w.call("PUT", "/v1/webhooks", {"url": w.receiver.url,
                                                  "rotate_secret": True}, key=desk)
    assert status == 200 and hook["secret"]
    offer = publish_offer(lambda m, p, b: w.call(m, p, b, key=desk), "lite")
    status, changed = w.call("POST", f"/v1/subscriptions/{sub_id}/change", {"plan": "lite"})
    assert status == 200 and changed["action"] == "downgrade_scheduled", changed
    status, _ = w.call("POST", f"/v1/subscriptions/{sub_id}/cancel", {})  # the app key
    assert status == 200
    status, refused = w.call("POST", "/v1/prices", {"model": "gpt-4o-mini", "input": "x",
                                                    "output": "1"}, key=w.admin)
    assert status in (400, 422)  # refused: no change, no row
    status, _ = w.call("DELETE", f"/v1/keys/{desk_id}", key=w.admin)
    assert status == 200

    # -- what the operator's trail shows ----------------------------------------------------
    rows = [r for r in _trail(w, w.admin) if r["id"] > marker][::-1]  # oldest first
    app_key_id = w.key.split("_")[1]
    assert [(r["action"], r["actor"]["key_id"], r["app"]) for r in rows] == [
        ("key.create", operator_id, "acme"),
        ("price.create", operator_id, None),
        ("price_change.schedule", operator_id, None),
        ("plan_assignment.set", desk_id, "acme"),
        ("plan_assignment.set", desk_id, "acme"),
        ("credit_grant.create", desk_id, "acme"),
        ("webhook.set", desk_id, "acme"),
        ("offer.create", desk_id, "acme"),
        ("offer.create", desk_id, "acme"),
        ("offer.publish", desk_id, "acme"),
        ("subscription.change", app_key_id, "acme"),
        ("subscription.cancel", app_key_id, "acme"),
        ("key.revoke", operator_id, "acme"),
    ]
    by = {r["action"]: r for r in rows}
    assert by["key.create"]["after"]["description"] == "support desk"
    assert by["key.create"]["target"] == {"type": "key", "id": desk_id}
    assert by["price.create"]["before"]["input"] == "0.15"  # the config's price
    assert by["price.create"]["after"]["input"] == "0.20"
    first, second = [r for r in rows if r["action"] == "plan_assignment.set"]
    assert first["before"] is None and first["after"]["plan"] == "pro@1"
    assert second["before"]["plan"] == "pro@1" and second["after"]["plan"] == "lite@1"
    assert second["target"] == {"type": "end_user", "id": "bob"}
    assert by["credit_grant.create"]["after"]["amount"] == 500
    assert by["credit_grant.create"]["target"]["id"] == str(grant["id"])
    webhook = by["webhook.set"]
    assert webhook["after"] == {"url": w.receiver.url, "secret_changed": True}
    assert hook["secret"] not in str(rows)  # a webhook secret never reaches the trail
    assert desk.split("_", 2)[2] not in str(rows)  # nor a key's
    assert by["offer.publish"]["target"]["id"].startswith(f"{offer}@")
    assert by["offer.publish"]["before"] == {"status": "draft"}
    scheduled = by["price_change.schedule"]
    assert scheduled["target"]["id"] == change["change_id"]
    assert (scheduled["before"]["version"], scheduled["after"]["version"]) == (1, 2)
    assert scheduled["before"]["price"] == change["old_price"]
    assert by["subscription.change"]["before"] == {"plan": "pro@1"}
    assert by["subscription.change"]["after"]["plan"] == "lite@1"
    cancel = by["subscription.cancel"]
    assert cancel["target"] == {"type": "subscription", "id": sub_id}
    assert cancel["after"]["cancel_at_period_end"] is True and cancel["actor"]["role"] == "app"
    assert by["key.revoke"]["before"] == {"revoked_at": None}
    assert all(r["request_id"] and r["request_id"].startswith("req_") for r in rows)

    # -- filters ---------------------------------------------------------------------------
    assert [r["action"] for r in _trail(w, w.admin, f"&actor_key=mlk_{desk_id}")] == [
        r["action"] for r in rows if r["actor"]["key_id"] == desk_id][::-1]
    assert {r["action"] for r in _trail(w, w.admin, "&action=offer")} >= {
        "offer.create", "offer.publish"}
    assert [r["action"] for r in _trail(w, w.admin, "&action=price.create")] == [
        "price.create"]
    assert [r["id"] for r in _trail(w, w.admin, "&target_type=end_user&target_id=bob")] == [
        second["id"], first["id"]]
    since = rows[0]["at"]
    assert len(_trail(w, w.admin, f"&since={since.replace('+', '%2B')}")) == len(rows)
    for bad in ("limit=0", "since=yesterday", "starting_after=-1", "color=red",
                f"since={since.replace('+', '%2B')}&until={since.replace('+', '%2B')}"):
        status, problem = w.call("GET", f"/v1/audit?{bad}", key=w.admin)
        assert status in (400, 422) and problem["status"] == status, (bad, problem)


def test_an_app_admin_sees_only_its_apps_rows(world: World) -> None:
    w = world
    status, made = w.call("POST", "/v1/keys", {"role": "admin", "app": "acme"}, key=w.admin)
    acme = made["key"]
    status, made = w.call("POST", "/v1/keys", {"role": "admin", "app": "globex"}, key=w.admin)
    globex = made["key"]
    w.call("PUT", "/v1/users/bob/plan", {"plan": "pro"}, key=acme)
    w.call("PUT", "/v1/users/gus/plan", {"plan": "pro"}, key=globex)
    when = (utcnow() + timedelta(hours=1)).replace(microsecond=0)
    w.call("POST", "/v1/prices", {"model": "gpt-4o-mini", "input": "0.2", "output": "0.8",
                                  "effective_from": when.isoformat()}, key=w.admin)
    mine = _trail(w, acme)
    assert mine and {r["app"] for r in mine} == {"acme"}
    assert "price.create" not in {r["action"] for r in mine}  # the operator's own change
    assert "gus" not in str(mine)
    theirs = _trail(w, globex)
    assert {r["app"] for r in theirs} == {"globex"} and "bob" not in str(theirs)
    status, _ = w.call("GET", "/v1/audit?app=globex", key=acme)
    assert status == 403
    assert _trail(w, acme, "&app=acme") == mine
    operator = _trail(w, w.admin, "&app=globex")
    assert {r["app"] for r in operator} == {"globex"}
    for key in (w.key, w.other):  # app keys are audited, they do not read the trail
        assert w.call("GET", "/v1/audit", key=key)[0] == 403


def test_a_withdrawal_is_audited_once_as_the_app_key_that_asked(world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("fleur", "annual", "EU-FR")
    w.pay(sub_id, 9600)
    marker = max(r["id"] for r in _trail(w, w.admin))
    status, made = w.call("POST", "/v1/withdrawals", {"subscription": sub_id})
    assert status == 201, made
    assert w.call("POST", "/v1/withdrawals", {"subscription": sub_id})[0] == 200  # no change
    [row] = [r for r in _trail(w, w.admin) if r["id"] > marker]
    assert (row["action"], row["app"], row["actor"]["role"], row["actor"]["key_id"]) == (
        "subscription.withdraw", "acme", "app", w.key.split("_")[1])
    assert row["target"] == {"type": "subscription", "id": sub_id}
    assert row["before"] == {"withdrawal": "pending"}
    assert row["after"] == {"withdrawal": "done", "refund_ref": made["refund_ref"],
                            "user": "fleur"}


def _refusals(engine: Engine) -> None:
    """An audit row is written; UPDATE and DELETE of it are refused by the database."""
    with engine.begin() as conn:
        record(conn, Actor(role="cli", name="tester"), "price.create", target_type="t",
               target_id="1", app_id=None, after={"input": "1"})
    for statement in ("UPDATE audit_events SET action = 'nothing.happened'",
                      "UPDATE audit_events SET after = NULL WHERE id = 1",
                      "DELETE FROM audit_events", "DELETE FROM audit_events WHERE id = 1"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT action, after FROM audit_events")).all() == [
            ("price.create", '{"input":"1"}')]


def test_postgres_refuses_to_update_or_delete_an_audit_row(clean_db: Engine) -> None:
    _refusals(clean_db)
    with clean_db.begin() as conn:  # a deliberate wipe (the suite's own clean-up) still works
        conn.execute(text("TRUNCATE audit_events"))


def test_sqlite_refuses_to_update_or_delete_an_audit_row(tmp_path: Path) -> None:
    from migrations.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        upgrade(engine)
        _refusals(engine)
    finally:
        engine.dispose()


def test_a_price_sheet_imported_with_the_cli_is_audited_as_the_cli(
        app: Any, pg_url: str, tmp_path: Path, clean_db: Engine) -> None:
    from click.testing import CliRunner

    from app import main

    when = (utcnow() + timedelta(hours=2)).replace(microsecond=0).isoformat()
    sheet = tmp_path / "prices.csv"
    sheet.write_text(f"model,input,output,effective_from\ngpt-4o-mini,0.20,0.80,{when}\n")
    env = {"MLANE_DATABASE_URL": pg_url, "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp_path / "cli")}
    done = CliRunner().invoke(main, ["prices", "import", str(sheet)], env=env)
    assert done.exit_code == 0, done.output
    with clean_db.connect() as conn:
        rows = conn.execute(text("SELECT action, actor_role, actor_name, actor_key_id, "
                                 "before, after FROM audit_events")).all()
    [(action, role, name, key_id, before, after)] = rows
    assert (action, role, key_id) == ("price.create", "cli", None) and name
    assert '"input":"0.15"' in before and '"input":"0.20"' in after
