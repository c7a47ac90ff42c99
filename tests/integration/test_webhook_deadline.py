"""A webhook receiver trickling its answer (a byte every quarter second: never a read
timeout) holds a delivery for its deadline only, and a webhooks run picks no new delivery
past its time budget: one slow endpoint cannot hold every other job of a worker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.db import make_engine
from core.events import EventService
from core.models import WebhookDelivery
from core.tenancy import TenancyService

pytestmark = pytest.mark.integration
ANSWER = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 80 + b"\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture()
def trickling_receiver() -> Iterator[str]:
    """Answers each request one byte every 0.25 s: the whole answer takes over 25 s."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in ANSWER:
                if stop.wait(0.25):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # the client cut it off
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        server.close()


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    from migrations.schema import upgrade

    made = make_engine(f"sqlite:///{tmp_path / 'hooks.db'}")
    upgrade(made)
    yield made
    made.dispose()


def pending(engine: Engine, url: str, events: EventService, count: int) -> None:
    app_id, _ = TenancyService(engine).ensure_app("acme")
    events.set_endpoint(app_id, url)
    with engine.begin() as conn:
        for n in range(count):
            events.publish_in(conn, app_id, "test.ping", {"n": n})


def attempts(engine: Engine) -> list[tuple[int, str | None]]:
    with engine.connect() as conn:
        return [(r.attempts, r.last_error) for r in conn.execute(
            select(WebhookDelivery).order_by(WebhookDelivery.id))]


def test_a_trickling_receiver_holds_a_delivery_for_its_deadline_only(
        engine: Engine, trickling_receiver: str) -> None:
    events = EventService(engine, timeout_s=2, deadline_s=1.5, allow_private=True)
    pending(engine, trickling_receiver, events, 1)
    began = time.monotonic()
    assert events.deliver_due() == 1
    took = time.monotonic() - began
    assert took < 6, f"the delivery took {took:.1f} s"  # (the whole answer: 25 s)
    [(tries, error)] = attempts(engine)
    assert tries == 1 and error is not None
    assert error.startswith("DeadlineError: no complete answer within 1.5 s"), error


def test_a_webhooks_run_picks_no_new_delivery_past_its_budget(
        engine: Engine, trickling_receiver: str) -> None:
    events = EventService(engine, timeout_s=2, deadline_s=1.5, allow_private=True)
    pending(engine, trickling_receiver, events, 3)
    assert events.deliver_for(budget_s=0.5) == 1  # the first delivery spent the budget
    assert sorted(tries for tries, _ in attempts(engine)) == [0, 0, 1]  # due next run
