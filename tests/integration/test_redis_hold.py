"""Under gevent, a reservation waits for Redis's reply holding its worker for at most
redislimits.HOLD_S, and only while the worker serves no other call (the router says): a
wait that gives the hub a turn runs the worker's background work first (the last calls'
settles and commits, hundreds of us) while the reply waits. Redis is paused for writes
(CLIENT PAUSE) so that each reply comes late enough to see which way the worker waited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, sys, uuid

    import gevent
    import redis

    from metering import redislimits
    from metering.limitstore import Check

    url, prefix = sys.argv[1], sys.argv[2]
    store = redislimits.RedisLimitStore(redis.Redis.from_url(url), prefix)
    pauser = redis.Redis.from_url(url)
    check = Check(key="requests|minute||*|m1", kind="counter", metric="r", amount=100,
                  fixed=1, per_out=0, expires_ms=1_800_000_060_000)
    ran = []

    def reserve():
        return store.reserve("u1.1", f"ls_{uuid.uuid4().hex}", [check],
                             now_ms=1_800_000_000_000, expires_ms=1_800_000_060_000,
                             want_out=0, min_out=0, clip=True, meta={})

    reserve()  # opens the store's connection (connecting gives the hub turns)

    def reserve_switches(alone: bool, hold_s: float) -> list:
        store.hold_first = lambda: alone
        redislimits.HOLD_S = hold_s
        pauser.execute_command("CLIENT", "PAUSE", 100, "WRITE")  # the reply comes in 0.1 s
        ran.clear()
        gevent.spawn(ran.append, 1)  # runs only if the reserve gives the hub a turn
        got = reserve()
        switched = bool(ran)
        gevent.sleep(0)
        return [got.granted, switched]

    print(json.dumps({
        "alone, held long enough": reserve_switches(True, 5.0),
        "alone, held 0.2 ms": reserve_switches(True, 0.0002),
        "another call in flight": reserve_switches(False, 5.0),
    }))
""")


def test_a_lone_call_s_reservation_holds_the_worker_briefly(redis_server: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_server, f"mlhold-{uuid.uuid4().hex[:8]}:"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {
        "alone, held long enough": [True, False],  # waited blocking: no other greenlet ran
        "alone, held 0.2 ms": [True, True],        # then cooperatively: bounded
        "another call in flight": [True, True],    # never held: the other calls go first
    }
