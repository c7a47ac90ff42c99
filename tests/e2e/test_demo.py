"""`meterlane demo`: the whole product from one command, on the embedded default, in a folder
of its own. Its report is checked against the demo's own database (the ledger, the plans),
and the addresses it prints answer while it serves."""

from __future__ import annotations

import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _env() -> dict[str, str]:
    # whatever the shell has set for Meterlane, the demo uses none of it
    return {**os.environ, "MLANE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/no",
            "MLANE_CONFIG": "/nonexistent.toml"}


def _get(url: str, accept: str = "text/html") -> tuple[int, str]:
    host, _, path = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", "/" + path, headers={"Accept": accept})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def _check_report(out: str, folder: Path) -> None:
    """The demo's report says what its database holds."""
    answered = int(re.search(r"(\d+) calls answered", out)[1])  # type: ignore[index]
    refused = sum(int(n) for n in re.findall(r"(\d+) [a-z_]+(?:,|\n)", out.split(
        "refused: ")[1].split("\n")[0] + "\n"))
    subscribed = int(re.search(r"(\d+) subscribed to Pro", out)[1])  # type: ignore[index]
    assert answered > 0 and refused > 0 and subscribed > 0, out
    assert "offered pro-monthly" in out  # the 402 carried the published offer

    db = sqlite3.connect(folder / "data" / "meterlane.db")
    try:
        statuses = dict(db.execute("SELECT status, count(*) FROM usage_events GROUP BY status"))
        on_pro = db.execute("SELECT count(*) FROM end_user_plans WHERE plan_id = 'pro'"
                            ).fetchone()[0]
        per_model = dict(db.execute("SELECT requested_model, count(*) FROM usage_events "
                                    "GROUP BY requested_model"))
    finally:
        db.close()
    assert statuses.get("ok") == answered  # every answered call has its row
    assert sum(statuses.values()) == answered + refused  # and every refused one
    assert on_pro == subscribed
    for model, calls in per_model.items():  # the report's table is the ledger's
        assert re.search(rf"^  {re.escape(model)}\s+{calls:,}\s", out, re.M), (model, out)
    for line in ("revenue", "inference cost", "gross margin", "active users"):
        assert re.search(rf"^    {line}\s+[\d,.]+", out, re.M), (line, out)
    assert re.search(r"^  finance dashboard  http://127\.0\.0\.1:\d+/finance#key=mlk_", out,
                     re.M)


def test_demo_reports_what_the_ledger_holds_and_serves_its_pages_until_ctrl_c(
        tmp_path: Path) -> None:
    """(One demo run for both: `--once` prints the same report and stops, as the test with a
    model server of its own checks.)"""
    folder = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "app", "demo", "--dir", str(folder),
                             "--users", "24"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:  # the demo says when it is ready
            seen.append(line)
            if "serving until Ctrl-C" in line:
                break
        out = "".join(seen)
        _check_report(out, folder)
        app_url = re.search(r"demo app \(widget\)\s+(\S+)", out)[1]  # type: ignore[index]
        service = re.search(r"the service\s+(\S+)", out)[1]  # type: ignore[index]
        status, page = _get(app_url)
        # a user who subscribed, one out of quota, one with quota left (as this run had them)
        assert status == 200 and page.count("/widget.js\" data-key=\"mlk_") >= 2, page
        status, front = _get(service, "application/json")
        assert status == 200 and '"service":"meterlane"' in front
        assert _get(service.rstrip("/") + "/finance")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, "".join(seen) + rest
    assert "demo: stopped" in rest


def test_demo_uses_the_model_server_it_is_given(tmp_path: Path) -> None:
    """`--upstream URL`: the demo calls that OpenAI-compatible server (here a simulator the
    test starts, standing in for vLLM or Ollama) for every model, with the model it lists."""
    from gateway.simulator import SIMULATOR, Simulator

    with Simulator() as server:
        done = subprocess.run([sys.executable, "-m", "app", "demo", "--once", "--dir",
                               str(tmp_path / "demo"), "--users", "4", "--upstream",
                               server.base_url], env=_env(), capture_output=True, text=True,
                              timeout=300, check=False)
        served = server.calls
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model simulator answers" not in done.stdout  # no simulator of its own
    answered = int(re.search(r"(\d+) calls answered", done.stdout)[1])  # type: ignore[index]
    assert served == answered > 0
    config = (tmp_path / "demo" / "meterlane.toml").read_text()
    assert config.count(f'base_url = "{server.base_url}"') == 2
    assert f'upstream_model = "{SIMULATOR}"' in config
