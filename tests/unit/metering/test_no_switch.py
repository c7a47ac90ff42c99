"""Under gevent (how `meterlane serve` runs), what every call does before its upstream answers
must not give the worker's hub a turn: one that does lets the other greenlets (the last call's
commit, the settles) run for hundreds of microseconds inside this call. Thread.is_alive() is
such a yield; the lease heartbeat and the ledger writer asked it on every call."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import tempfile
    from pathlib import Path

    import gevent
    from sqlalchemy import create_engine

    from metering.leases import Heartbeat
    from metering.ledger import LedgerWriter

    ran = []

    def other() -> None:
        ran.append(1)

    def switches(step) -> bool:
        ran.clear()
        gevent.spawn(other)  # runs only if `step` gives the hub a turn
        step()
        switched = bool(ran)
        gevent.sleep(0)
        return switched

    Heartbeat(lambda: True, 60.0).stop()  # the first one starts the beater
    gevent.sleep(0.01)
    writer = LedgerWriter(create_engine("sqlite://"), Path(tempfile.mkdtemp()))
    writer._ensure_writer()  # the first one starts the writer
    gevent.sleep(0.01)
    print("heartbeat", switches(lambda: Heartbeat(lambda: True, 60.0).stop()))
    print("writer", switches(writer._ensure_writer))
    print("probe", switches(lambda: gevent.sleep(0)))  # the probe sees a yield
""")


def test_a_call_s_heartbeat_and_ledger_enqueue_never_yield_to_the_hub() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split() for line in done.stdout.splitlines())
    assert lines == {"heartbeat": "False", "writer": "False", "probe": "True"}
