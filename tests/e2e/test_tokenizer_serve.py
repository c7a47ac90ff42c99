"""`meterlane serve` counts in its tokenizer process; killed, the workers count themselves:
the counts are tiktoken's either way (metering/tokenserver.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from core.config import default_sqlite_url
from metering.models import UsageEvent
from metering.tokens import TiktokenTokenizer, count_chat_prompt, load_encoding
from tests.conftest import gateway_toml
from tests.e2e.test_serve import MESSAGES, cli, served_engine, start_server, stop
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


def _beside(master: int, marker: bytes) -> list[int]:
    """The master's children whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes() and \
                    int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_counted_call_is_counted_the_same_with_or_without_the_tokenizer_process(
        tmp_path: Path) -> None:
    o200k = TiktokenTokenizer(load_encoding("o200k_base"))
    expected = count_chat_prompt(o200k, MESSAGES)
    with FakeUpstream() as upstream:
        (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")} | {
            "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
            "MLANE_DATA_DIR": str(tmp_path / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
        key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
        proc, base = start_server(env, tmp_path)
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)
        # its reads wait for the answered calls to be committed (they are answered first)
        engine = served_engine(env, default_sqlite_url(str(tmp_path / "var")))
        try:
            [tokenizer] = _beside(proc.pid, b"metering.tokenserver")
            ids = []
            for kill in (False, True):
                if kill:
                    os.kill(tokenizer, signal.SIGKILL)
                for n in range(4):  # over both workers
                    answer = client.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini", messages=MESSAGES, user=f"u{n}",
                        extra_body={"fake": {"usage": False}})  # the gateway counts
                    assert answer.http_response.status_code == 200
                    ids.append(answer.headers["x-meterlane-request-id"])
            with engine.connect() as conn:
                rows = dict(conn.execute(select(UsageEvent.request_id, UsageEvent.input_tokens)
                                         .where(UsageEvent.request_id.in_(ids))).all())
        finally:
            engine.dispose()
            stop(proc)
    assert rows == dict.fromkeys(ids, expected)
