"""The meter events of a relayed call (the web searches a Responses upstream ran) are never
lost and never fail the call: while the database is away they are spooled to disk, and the
replay at the next start (or `meterlane ledger replay`) records each once."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.auth import Role
from core.db import make_engine, utcnow
from core.tenancy import TenancyService
from metering.meters import MeterService
from metering.models import MeterEvent, UsageEvent
from metering.records import CallRecord
from metering.relayed import RelayedEvents
from metering.spool import Spool
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.e2e.test_web_searches import METER, NATIVE, SEARCH
from tests.integration.test_meters import METERS
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration


@pytest.fixture()
def wired(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + METERS, tmp_path,
                                      database_url=pg_url))
    yield app.extensions["wiring"]
    app.extensions["wiring"].engine.dispose()


def call(app_id: int, end_user_id: int) -> CallRecord:
    return CallRecord(
        app_id=app_id, end_user_id=end_user_id, request_id="req_searching",
        idempotency_key="req_searching", endpoint="responses", requested_model="m",
        upstream="u", upstream_model="m", stream=False, input_tokens=1, cached_input_tokens=0,
        output_tokens=1, reasoning_tokens=0, usage_source="reported", cost_pico_usd=0,
        priced=True, status="ok", http_status=200, error=None, latency_ms=1, ttft_ms=None,
        created_at=utcnow() - timedelta(minutes=5))


def events(engine: Engine) -> list[tuple[str, int | None]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(  # type: ignore[misc]
            MeterEvent.idempotency_key, MeterEvent.cost_pico_usd).order_by(MeterEvent.id))]


def test_an_outage_spools_the_searches_and_the_replay_records_each_once(
        wired: Any, tmp_path: Path) -> None:
    tenancy = TenancyService(wired.engine)
    app_id, _ = tenancy.ensure_app("searcher")
    user_id = tenancy.ensure_end_user(app_id, "sol")
    down = make_engine(wired.engine.url.set(port=9).render_as_string(hide_password=False))
    failures: list[str] = []
    spool = Spool(tmp_path / "var" / "spool" / "meters", "meters")
    outage = RelayedEvents(MeterService(down, wired.config, TenancyService(down), wired.limits),
                           spool, failures.append)
    items = [("web_search_calls", "ws_a"), ("web_search_calls", "ws_b"),
             ("web_search_calls", "ws_a"), ("not_a_meter", "x")]
    assert outage.record(call(app_id, user_id), items) == 0  # never raises
    assert failures == ["meter_event_spooled"] * 2 and outage.spooled() == 2
    assert events(wired.engine) == []
    down.dispose()

    relayed = wired.metering.relayed  # the app's own, on the same spool folder
    assert relayed.spool.folder == spool.folder
    assert relayed.record(call(app_id, user_id), items[:1]) == 1  # one made it another way
    assert relayed.replay() == 1 and relayed.spooled() == 0
    assert events(wired.engine) == [("req_searching:ws_a", 10**10),   # $0.01 each
                                    ("req_searching:ws_b", 10**10)]
    assert relayed.replay() == 0
    with wired.engine.connect() as conn:  # when the call happened, not when replayed
        occurred = conn.scalars(select(MeterEvent.occurred_at)).all()
    assert all(at < utcnow() - timedelta(minutes=4) for at in occurred)


def test_the_ledger_replay_command_replays_the_meter_spool(wired: Any,
                                                           tmp_path: Path) -> None:
    tenancy = TenancyService(wired.engine)
    app_id, _ = tenancy.ensure_app("searcher")
    user_id = tenancy.ensure_end_user(app_id, "sol")
    row = {"app_id": app_id, "end_user_id": user_id, "meter": "web_search_calls",
           "key": "req_x:ws_1", "request_id": "req_x", "occurred_at": utcnow().isoformat()}
    wired.metering.relayed.spool.append(row)
    wired.metering.relayed.spool.append({**row, "meter": "gone"})  # can never be recorded
    from app import main

    env = {"MLANE_DATABASE_URL": wired.config.database_url,
           "MLANE_DATA_DIR": wired.config.data_dir,
           "MLANE_CONFIG": str(tmp_path / "meterlane.toml")}  # the app's own config file
    result = CliRunner().invoke(main, ["ledger", "replay"], env=env)
    assert result.exit_code == 0, result.output
    assert "replayed 1 meter events of relayed calls" in result.output
    assert events(wired.engine) == [("req_x:ws_1", 10**10)]
    assert wired.metering.relayed.spooled() == 0


def test_searches_of_a_call_answered_by_a_worker_that_died_are_recovered(
        clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    # A served call is answered once its row is in the worker's journal, and committed
    # after; the meter events it caused upstream must be in that journal too, or a worker
    # killed in between loses them while the next start recovers the row.
    from app import create_app

    toml = gateway_toml(upstream.base_url) + NATIVE.format(base=upstream.base_url) + METER
    app = create_app(config_from_toml(toml, tmp_path, database_url=pg_url))
    wiring = app.extensions["wiring"]
    try:
        key = wiring.keys.create_key(Role.APP, "searcher").key
        upstream.behaviour = {"web_searches": 2}
        never_run: list[Any] = []  # the worker dies as the answer leaves: no commit runs
        wiring.metering._background = never_run.append
        answer = app.test_client().post(
            "/v1/responses", json={"model": "gpt-native", "input": "find it", "tools": SEARCH},
            headers={**bearer(key), "X-Meterlane-User": "sol"})
        assert answer.status_code == 200, answer.data
        assert never_run and events(wiring.engine) == []
        request_id = answer.headers["x-request-id"]

        journal = wiring.metering.intents  # the worker is gone: its journal names no process
        gone = subprocess.Popen(["true"])
        gone.wait()
        journal._path(os.getpid()).rename(journal._path(gone.pid))
        assert wiring.metering.recover_lost() == 1
        with wiring.engine.connect() as conn:
            assert conn.scalar(select(UsageEvent.request_id)) == request_id
        found = events(wiring.engine)
        assert len(found) == 2 and all(k.startswith(f"{request_id}:ws_") for k, _ in found)
        assert wiring.metering.recover_lost() == 0  # recorded once
    finally:
        upstream.behaviour = {}
        wiring.engine.dispose()
