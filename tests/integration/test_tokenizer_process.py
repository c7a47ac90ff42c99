"""serve's tokenizer process (metering/tokenserver.py): a real process on a Unix socket; its
counts equal tiktoken's; a worker that cannot reach it counts itself."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering import tokenserver
from metering.tokens import (
    TiktokenTokenizer,
    TokenizerRegistry,
    count_chat_prompt,
    count_completion_prompt,
    load_encoding,
)
from metering.tokenserver import SOCKET_ENV, TokenClient, count_in_process, tokenizer_beside

TEXTS = [
    "", "hello world", "Ünïcödé, 你好世界, 🙂👍🏽 emoji", "don't WE'LL they're I'M",
    "<|endoftext|> and <|endofprompt|> <|fim_prefix|>",  # special tokens count as text
    "a lone surrogate \ud800 here", "x" * 150_000,  # past one chunk (_CHUNK_CHARS)
    "line\n" * 40_000,
]
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {}},
                "a bare string part"]},
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}]


@pytest.fixture(scope="module")
def local() -> dict[str, TiktokenTokenizer]:
    return {name: TiktokenTokenizer(load_encoding(name)) for name in ("o200k_base",
                                                                        "cl100k_base")}


@pytest.fixture
def process() -> Iterator[tuple[int, str]]:
    with tokenizer_beside() as pid:
        yield pid, os.environ[SOCKET_ENV]
    assert SOCKET_ENV not in os.environ


def _registry(path: str) -> TokenizerRegistry:
    registry = TokenizerRegistry.load()
    count_in_process(registry, path)
    return registry


def test_counts_in_the_process_equal_tiktokens(process: tuple[int, str],
                                               local: dict[str, TiktokenTokenizer]) -> None:
    registry = _registry(process[1])
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        tok = registry.for_model(model)
        assert [tok.count(t) for t in TEXTS] == [local[name].count(t) for t in TEXTS]
        assert tok.count_all(TEXTS) == sum(local[name].count(t) for t in TEXTS)
        assert tok.counts(TEXTS) == [local[name].count(t) for t in TEXTS]  # one frame
        assert tok.counts([]) == []
        assert count_chat_prompt(tok, MESSAGES, [{"type": "function"}]) == \
            count_chat_prompt(local[name], MESSAGES, [{"type": "function"}])
        assert count_completion_prompt(tok, ["a b", [1, 2, 3], "c"]) == \
            count_completion_prompt(local[name], ["a b", [1, 2, 3], "c"])
    assert registry.built == ()  # nothing built in this process: the other one counted


def test_a_killed_process_leaves_the_worker_counting_itself(
        process: tuple[int, str], local: dict[str, TiktokenTokenizer]) -> None:
    pid, path = process
    registry = _registry(path)
    tok = registry.for_model("gpt-4o")
    assert tok.count(TEXTS[2]) == local["o200k_base"].count(TEXTS[2])
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert [tok.count(t) for t in TEXTS] == [local["o200k_base"].count(t) for t in TEXTS]
    assert registry.built == ("o200k_base",)
    assert count_chat_prompt(registry.for_model("gpt-4o"), MESSAGES) == \
        count_chat_prompt(local["o200k_base"], MESSAGES)


def test_an_apps_prompt_texts_are_counted_once(process: tuple[int, str],
                                               local: dict[str, TiktokenTokenizer]) -> None:
    pid, path = process
    registry = _registry(path)
    expected = count_chat_prompt(local["o200k_base"], MESSAGES)
    assert count_chat_prompt(registry.for_prompt("gpt-4o", None, 1), MESSAGES) == expected
    os.kill(pid, signal.SIGKILL)  # from here on, a count would have to build the encoding
    os.waitpid(pid, 0)
    assert count_chat_prompt(registry.for_prompt("gpt-4o", None, 1), MESSAGES) == expected
    assert registry.built == ()  # remembered: neither the process nor a build was asked
    assert count_chat_prompt(registry.for_prompt("gpt-4o", None, 2), MESSAGES) == expected
    assert registry.built == ("o200k_base",)  # another app's: counted afresh


def test_no_process_at_all_is_a_local_count(tmp_path: Path,
                                            local: dict[str, TiktokenTokenizer]) -> None:
    registry = _registry(str(tmp_path / "absent.sock"))
    assert registry.for_model("gpt-4").count("hello world") == \
        local["cl100k_base"].count("hello world")
    assert registry.built == ("cl100k_base",)


def test_a_malformed_frame_ends_only_its_connection(process: tuple[int, str]) -> None:
    path = process[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.settimeout(10)
        bad.connect(path)
        bad.sendall((7).to_bytes(4, "big") + b"\x80\x00\x00\x00\x09ab")  # runs past its frame
        assert bad.recv(4) == b""  # closed, no count
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.settimeout(10)
        old.connect(path)
        # an earlier version's frame (no 0x80 mark: it expects the sum): closed at once, so
        # that a worker of one version never waits for answers of the other's form
        old.sendall((8).to_bytes(4, "big") + b"\x00" + (3).to_bytes(4, "big") + b"abc")
        assert old.recv(4) == b""
    assert TokenClient(path).counts("o200k_base", ["hello world"]) == [2]


def test_the_process_stops_with_the_block() -> None:
    with tokenizer_beside() as pid:
        path = Path(os.environ[SOCKET_ENV])
        assert TokenClient(str(path)).counts("o200k_base", ["hi", "hello world"]) == [1, 2]
    assert not path.parent.exists()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)  # already reaped: stopped and waited for


def _stop(pid: int) -> None:
    """SIGSTOP `pid`, and wait until the kernel shows it stopped (the stop is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(100_000):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
    raise AssertionError(f"{pid} did not stop")


def test_a_slow_answer_is_waited_for_and_a_hung_process_is_left(
        process: tuple[int, str], local: dict[str, TiktokenTokenizer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pid, path = process
    registry = _registry(path)
    tok = registry.for_model("gpt-4o")
    expected = local["o200k_base"].count(TEXTS[3])
    assert tok.count(TEXTS[3]) == expected
    _stop(pid)  # a busy machine: the answer comes after the blocking wait
    resume = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))
    resume.start()
    assert tok.count(TEXTS[3]) == expected
    resume.join()
    assert registry.built == ()  # answered by the process
    monkeypatch.setattr(tokenserver, "_COUNT_SECONDS", 0.2)
    _stop(pid)  # hung: the worker counts itself once the wait is over
    try:
        assert tok.count(TEXTS[3]) == expected
    finally:
        os.kill(pid, signal.SIGCONT)
    assert registry.built == ("o200k_base",)
