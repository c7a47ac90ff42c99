"""Every `meterlane` command logs in MLANE_LOG_FORMAT (set up once, by the command group): a
job run by hand as the worker's lines are, and with json a command's error too, not click's
plain `Error: ...`. Real `python -m app` processes on the embedded database."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner

from core.cli import LoggedGroup, child_error

ROOT = Path(__file__).resolve().parents[3]


def _meterlane(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLANE_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=False, env={**clean, "PYTHONPATH": str(ROOT),
                                       "MLANE_DATA_DIR": str(tmp_path / "var"),
                                       "MLANE_LOG_FORMAT": "json", **env})


def _json_lines(stderr: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(("args", "env", "said"), [
    (("billing", "report-overage"), {}, "Stripe is not configured"),
    (("worker", "--once"), {"MLANE_JOB_INTERVALS": "nosuch=5"}, "names no job ['nosuch']"),
    (("worker", "--once"), {"MLANE_JOB_INTERVALS": "webhooks=abc"}, "MLANE_JOB_INTERVALS must"),
])
def test_a_command_error_is_one_json_line(tmp_path: Path, args: tuple[str, ...],
                                          env: dict[str, str], said: str) -> None:
    done = _meterlane(tmp_path, *args, **env)
    assert done.returncode == 1, done.stderr
    lines = _json_lines(done.stderr)  # every line JSON: no plain `Error:`, no traceback
    assert [line["level"] for line in lines][-1] == "error"
    assert said in str(lines[-1]["msg"]) and lines[-1]["logger"] == "meterlane.cli"


def test_a_command_logs_in_the_format(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.group(cls=LoggedGroup)
    def group() -> None:
        pass

    @group.command()
    def job() -> None:
        logging.getLogger("meterlane.job").warning("ran by hand")

    root = logging.getLogger()
    handlers = list(root.handlers)
    monkeypatch.setenv("MLANE_LOG_FORMAT", "json")
    try:
        result = CliRunner().invoke(group, ["job"])
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
    assert result.exit_code == 0, result.output
    line = _json_lines(result.stderr)[-1]
    assert (line["logger"], line["msg"], line["level"]) == ("meterlane.job", "ran by hand",
                                                           "warning")


def test_serve_reports_its_pre_flight_child_in_its_own_words() -> None:
    json_error = '{"level":"error","logger":"meterlane.cli","msg":"no database","pid":1}'
    assert child_error(json_error + "\n") == "no database"
    assert child_error("Error: configuration error: bad\n") == "configuration error: bad"
    traceback = ("Traceback (most recent call last):\n  File \"x\", line 1, in <module>\n"
                 "    boom()\nOperationalError: connection refused\n")
    assert child_error(traceback) == "OperationalError: connection refused"
