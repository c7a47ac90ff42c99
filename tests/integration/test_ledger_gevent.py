"""Under gevent (how `meterlane serve` runs) the ledger writer is one greenlet among the calls
it writes for. Each time it waits on the database's socket, every call that is ready runs
first: a write that waits once per row takes as many turns of a busy worker as it has rows.
psycopg's executemany does that (it pipelines a statement per row), so under a steady load
the writer fell behind the calls, and the calls waiting for their commits (answered, but
held in memory and in the intent journal) piled up for as long as the load lasted: a
worker's memory grew about 6 KB a call on Postgres (bench/idle_rss.py --calls). A batch must
cost the writer a few turns, whatever its size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.integration.test_ledger import app_and_user, keys_in_ledger

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, os, sys, tempfile
    from pathlib import Path

    import gevent
    import greenlet

    from core.db import make_engine
    from metering.ledger import LedgerWriter
    from tests.integration.test_ledger import record

    url, app_id, user_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writer = LedgerWriter(make_engine(url), Path(tempfile.mkdtemp()))
    writer.record(record(app_id, user_id, "warm"))  # the writer and a connection, started
    main, hub = greenlet.getcurrent(), gevent.get_hub()
    turns = []

    def trace(event, args):
        if event == "switch" and args[1] not in (main, hub):
            turns.append(1)  # the writer greenlet (the only other one) is given a turn

    out = {}
    for n in (1, 500):
        turns.clear()
        greenlet.settrace(trace)
        results = writer.record_many([record(app_id, user_id, f"{n}-{i}") for i in range(n)])
        greenlet.settrace(None)
        assert results == ["written"] * n, results
        out[n] = len(turns)
    print(json.dumps(out))
""")


def test_a_batch_of_rows_costs_the_writer_a_few_turns_of_the_hub(clean_db: Engine,
                                                                 tmp_path: Path) -> None:
    app_id, user_id = app_and_user(clean_db)
    url = clean_db.url.render_as_string(hide_password=False)
    done = subprocess.run([sys.executable, "-c", SCRIPT, url, str(app_id), str(user_id)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    turns = {int(k): v for k, v in json.loads(done.stdout).items()}
    assert turns[1] >= 1  # the probe sees the writer's turns
    # one statement however many rows: its sending and its answer, not a wait per row
    assert turns[500] <= turns[1] + 10, turns
    assert len(keys_in_ledger(clean_db)) == 1 + 1 + 500  # warm, then each batch
