"""A record the database cannot take never stops the service: it goes to the quarantine with
its reason (never retried on its own), the writer keeps writing, the service starts, /readyz
and /metrics count it, and `meterlane ledger quarantine` lists, exports and retries it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine

from core.config import Config
from core.db import make_engine
from core.models import App
from metering.ledger import LedgerWriter
from metering.models import QuarantinedRecord
from metering.records import CallRecord
from tests.integration.test_ledger import app_and_user, keys_in_ledger, record

pytestmark = pytest.mark.integration


def spool_line(path: Path, rec: CallRecord, **raw: Any) -> None:
    """A spool file as an earlier process left it, with `raw` values written as they are."""
    row = {**rec.__dict__, "created_at": rec.created_at.isoformat()}
    row.update(raw)
    path.mkdir(parents=True, exist_ok=True)
    body = orjson.dumps(row) if all(abs(v) < 2**63 for v in raw.values()
                                    if isinstance(v, int)) else _big_json(row)
    (path / "usage-4242.jsonl").write_bytes(body + b"\n")


def _big_json(row: dict[str, Any]) -> bytes:
    import json

    return json.dumps(row).encode()


def quarantined(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(QuarantinedRecord.reason, QuarantinedRecord.source,
                                        QuarantinedRecord.resolution)))


def test_a_spooled_nul_is_quarantined_and_the_service_starts_and_serves(
        app_config: Config, tmp_path: Path) -> None:
    from app import create_app

    engine = make_engine(app_config.database_url)
    app_id, user_id = app_and_user(engine)
    bad = replace(record(app_id, user_id, "ok-key"), idempotency_key="k\x00ey")
    spool_line(Path(app_config.data_dir) / "spool", bad)
    (Path(app_config.data_dir) / "spool" / "usage-4243.jsonl").write_bytes(
        orjson.dumps({**record(app_id, user_id, "fine").__dict__,
                      "created_at": bad.created_at.isoformat()}) + b"\n")

    app = create_app(app_config)  # on main: psycopg refused the NUL and the start failed
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["gauges"]["ledger_quarantined"] == 1
    assert ready.get_json()["checks"]["ledger_writer"] == "ok"
    assert b"meterlane_ledger_quarantined 1" in client.get("/metrics").data
    assert [k for k, _c, _t in keys_in_ledger(engine)] == ["fine"]
    [(reason, source, resolution)] = quarantined(engine)
    assert "idempotency_key" in reason and source == "replay" and resolution is None
    assert not list((Path(app_config.data_dir) / "spool").glob("usage-*"))
    app.extensions["wiring"].engine.dispose()
    engine.dispose()


def test_a_spooled_cost_past_64_bits_does_not_stop_a_sqlite_start(tmp_path: Path) -> None:
    from app import create_app

    config = Config(database_url=f"sqlite:///{tmp_path / 'var' / 'm.db'}",
                    data_dir=str(tmp_path / "var"), key_cache_seconds=0)
    (tmp_path / "var").mkdir()
    engine = make_engine(config.database_url)
    from migrations.schema import upgrade

    upgrade(engine)
    app_id, user_id = app_and_user(engine)
    spool_line(tmp_path / "var" / "spool", record(app_id, user_id, "huge"),
               cost_pico_usd=2**64 + 5)
    app = create_app(config)
    assert app.test_client().get("/readyz").get_json()["gauges"]["ledger_quarantined"] == 1
    [(reason, _source, _resolution)] = quarantined(engine)
    assert "cost_pico_usd" in reason
    assert keys_in_ledger(engine) == []
    app.extensions["wiring"].engine.dispose()
    engine.dispose()


class _HostileHandler(logging.Handler):
    """A log handler that fails on every record (a full disk, a broken collector)."""

    def emit(self, record: logging.LogRecord) -> None:
        raise OSError("no space left on device")

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        raise OSError("and failing to report the failure too")


def test_absurd_usage_is_quarantined_and_the_writer_keeps_writing(
        clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path / "spool")
    hostile = _HostileHandler()
    logging.getLogger("metering").addHandler(hostile)
    try:
        absurd = replace(record(app_id, user_id, "absurd"), input_tokens=10**17)
        assert writer.record(absurd) == "quarantined"
    finally:
        logging.getLogger("metering").removeHandler(hostile)
    assert writer.writer_alive()
    assert writer.record(record(app_id, user_id, "next")) == "written"
    assert [k for k, _c, _t in keys_in_ledger(clean_db)] == ["next"]
    [(reason, source, _)] = quarantined(clean_db)
    assert "input_tokens" in reason and source == "writer"


def test_a_row_the_database_refuses_is_quarantined_not_spooled_and_can_be_retried(
        clean_db: Engine, tmp_path: Path) -> None:
    from app import main

    app_id, user_id = app_and_user(clean_db)
    spool = tmp_path / "spool"
    writer = LedgerWriter(clean_db, spool)
    orphan = replace(record(app_id, user_id, "orphan"), app_id=app_id + 1000)  # no such app
    batch = [record(app_id, user_id, "a"), orphan, record(app_id, user_id, "b")]
    assert writer.record_many(batch) == ["written", "quarantined", "written"]
    assert not list(spool.glob("usage-*")), "a refused record is never spooled"
    [(reason, _source, _)] = quarantined(clean_db)
    assert "IntegrityError" in reason

    runner = CliRunner()
    env = {"MLANE_DATABASE_URL": clean_db.url.render_as_string(hide_password=False),
           "MLANE_DATA_DIR": str(tmp_path / "var")}
    listed = runner.invoke(main, ["ledger", "quarantine", "list"], env=env)
    assert listed.exit_code == 0 and "IntegrityError" in listed.output
    exported = runner.invoke(main, ["ledger", "quarantine", "export"], env=env)
    [line] = exported.output.strip().splitlines()
    assert orjson.loads(line)["record"]["idempotency_key"] == "orphan"
    refused = runner.invoke(main, ["ledger", "quarantine", "retry"], env=env)
    assert refused.exit_code != 0 and "refused again 1" in refused.output

    with clean_db.begin() as conn:  # the operator fixes the cause: the app exists now
        conn.execute(insert(App).values(id=app_id + 1000, name="restored",
                                        created_at=orphan.created_at))
    retried = runner.invoke(main, ["ledger", "quarantine", "retry"], env=env)
    assert retried.exit_code == 0, retried.output
    assert "written 1" in retried.output
    assert sorted(k for k, _c, _t in keys_in_ledger(clean_db)) == ["a", "b", "orphan"]
    assert quarantined(clean_db)[0][2] == "written"
    assert runner.invoke(main, ["ledger", "quarantine", "list"], env=env).output.strip() \
        in ("", "the quarantine is empty")
    with clean_db.connect() as conn:  # each retry is an audited operator action (issue 17)
        trail = conn.execute(text("SELECT action, actor_role, app_id, before, after FROM "
                                  "audit_events ORDER BY id")).all()
    assert [(a, role, app) for a, role, app, _b, _a in trail] == [
        ("quarantine.retry", "cli", app_id + 1000)] * 2
    assert "IntegrityError" in trail[0][3] and "IntegrityError" in trail[0][4]
    assert orjson.loads(trail[1][4])["resolution"] == "written"


def test_a_database_that_refuses_the_quarantine_too_keeps_the_record_in_a_file(
        clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path / "spool")
    with clean_db.begin() as conn:
        conn.execute(text("ALTER TABLE ledger_quarantine RENAME TO ledger_quarantine_away"))
    try:
        assert writer.record(replace(record(app_id, user_id, "x"), output_tokens=-1)) \
            == "quarantined"
        assert writer.quarantine.file_count() == 1
    finally:
        with clean_db.begin() as conn:
            conn.execute(text("ALTER TABLE ledger_quarantine_away RENAME TO ledger_quarantine"))
    assert writer.quarantine.count() == 1
    [entry] = writer.quarantine.entries()  # read into the table once it takes records again
    assert "output_tokens" in entry.reason and writer.quarantine.file_count() == 0


def test_a_read_only_database_is_an_outage_not_poison(clean_db: Engine, tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    app_id, user_id = app_and_user(clean_db)
    standby = create_engine(clean_db.url, connect_args={
        "options": "-c default_transaction_read_only=on"})
    spool = tmp_path / "spool"
    try:  # a failover left us on a read-only standby: the record waits in the spool
        assert LedgerWriter(standby, spool).record(record(app_id, user_id, "ro")) == "spooled"
    finally:
        standby.dispose()
    assert quarantined(clean_db) == []
    assert LedgerWriter(clean_db, spool).replay() == 1
    assert [k for k, _c, _t in keys_in_ledger(clean_db)] == ["ro"]


def test_replays_during_an_outage_keep_every_line_and_a_dead_claimers_file_is_replayed(
        clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    spool = tmp_path / "spool"
    spool_line(spool, record(app_id, user_id, "one"))
    with (spool / "usage-4242.jsonl").open("ab") as fh:
        fh.write(orjson.dumps({**record(app_id, user_id, "two").__dict__,
                               "created_at": record(1, 1, "x").created_at.isoformat()}) + b"\n")
    # a replay killed half way, by a process that is gone: its claimed file must not be lost
    (spool / "usage-4242.jsonl").rename(spool / "replay-999999-deadbeef.replaying")
    down = make_engine(clean_db.url.set(port=9).render_as_string(hide_password=False))
    for _ in range(20):  # the database stays away: each replay keeps the lines, names stay
        assert LedgerWriter(down, spool).replay() == 0
    names = [p.name for p in spool.iterdir()]
    assert len(names) == 1 and len(names[0]) < 80, names
    assert LedgerWriter(clean_db, spool).replay() == 2
    assert sorted(k for k, _c, _t in keys_in_ledger(clean_db)) == ["one", "two"]
    assert list(spool.iterdir()) == []


def test_a_lone_surrogate_in_a_batch_is_quarantined_and_the_others_are_written(
        clean_db: Engine, tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    writer = LedgerWriter(clean_db, tmp_path / "spool")
    bad = replace(record(app_id, user_id, "s"), idempotency_key="half\ud800")
    batch = [record(app_id, user_id, "a"), record(app_id, user_id, "b"), bad,
             record(app_id, user_id, "c")]
    assert writer.record_many(batch, dedupe=True) == ["written", "written", "quarantined",
                                                      "written"]
