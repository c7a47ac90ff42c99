"""PromptMemo (metering/tokens.py): a worker counts each prompt text of an app once; the
counts it gives back are the tokenizer's own, whatever it remembers or forgets."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from metering.tokens import (
    PromptMemo,
    TiktokenTokenizer,
    TokenizerRegistry,
    _Remembered,
    count_chat_prompt,
    load_encoding,
)


class Asked:
    """A real tokenizer that notes which texts it was asked to count."""

    def __init__(self, inner: TiktokenTokenizer) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def count(self, text: str) -> int:
        return self.count_all([text])

    def count_all(self, texts: Sequence[str]) -> int:
        return sum(self.counts(texts))

    def counts(self, texts: Sequence[str]) -> list[int]:
        self.asked += texts
        return self.inner.counts(texts)


@pytest.fixture(scope="module")
def o200k() -> TiktokenTokenizer:
    return TiktokenTokenizer(load_encoding("o200k_base"))


SYSTEM = "You are a careful assistant. " * 40
TURNS = ["Tell me about the quick brown fox", "And the lazy dog?", "Ünïcödé 你好 \ud800 🙂",
         "", "Thanks"]


def test_a_conversation_counts_only_its_new_turn(o200k: TiktokenTokenizer) -> None:
    memo, inner = PromptMemo(), Asked(o200k)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    seen: set[str] = set()
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        inner.asked.clear()
        counted = count_chat_prompt(_Remembered(inner, memo, b"app 1"), messages)
        assert counted == count_chat_prompt(o200k, messages)  # the tokenizer's count, always
        sent = {text for m in messages for text in m.values()}
        assert set(inner.asked) == sent - seen  # only what this app had not sent before
        assert turn in inner.asked or turn in seen
        seen |= sent
        messages.append({"role": "assistant", "content": f"reply to {turn}"})


def test_apps_do_not_share_what_they_sent(o200k: TiktokenTokenizer) -> None:
    memo, inner = PromptMemo(), Asked(o200k)
    assert memo.counts(inner, b"app 1", [SYSTEM]) == [o200k.count(SYSTEM)]
    assert memo.counts(inner, b"app 1", [SYSTEM]) == [o200k.count(SYSTEM)]
    assert inner.asked == [SYSTEM]  # the second of app 1: remembered
    assert memo.counts(inner, b"app 2", [SYSTEM]) == [o200k.count(SYSTEM)]
    assert inner.asked == [SYSTEM, SYSTEM]  # app 2 counts its own: no timing to learn from


def test_it_holds_no_text_and_no_more_than_its_entries(o200k: TiktokenTokenizer) -> None:
    memo, inner = PromptMemo(entries=50), Asked(o200k)
    rng = random.Random(7)
    texts = [" ".join(rng.choice(["fox", "dog", "ünï", "42", "\n"]) for _ in range(rng.randint(
        0, 30))) + str(i) for i in range(400)]
    for at in range(3, 400, 7):
        inner.asked.clear()
        batch = texts[:3] + texts[at:at + 7]  # the first three: used on every call
        assert memo.counts(inner, b"app 1", batch) == [o200k.count(t) for t in batch]
        assert len(memo) <= 50
        if at > 3:  # the recently used stay while 350 others come and go
            assert not set(inner.asked) & set(texts[:3])
    assert all(isinstance(k, bytes) and len(k) == 16 for k in memo._counts)  # digests only


def test_a_text_sent_twice_in_one_call_is_asked_for_once(o200k: TiktokenTokenizer) -> None:
    memo, inner = PromptMemo(), Asked(o200k)
    texts = ["user", "hello there", "user", "hello there", "again"]
    assert memo.counts(inner, b"app 1", texts) == [o200k.count(t) for t in texts]
    assert inner.asked == ["user", "hello there", "again"]


def test_odd_texts(o200k: TiktokenTokenizer) -> None:
    memo, inner = PromptMemo(), Asked(o200k)
    odd: list[object] = ["", None, 3, "a", "a"]
    assert memo.counts(inner, b"app 1", odd) == [0, 0, 0, 1, 1]  # type: ignore[arg-type]
    assert memo.counts(inner, b"app 1", []) == []


def test_the_registry_remembers_per_app_and_encoding() -> None:
    registry = TokenizerRegistry.load()
    one = registry.for_prompt("gpt-4o", None, 1)
    assert one.count_all(["hello world", "hello world"]) == 4
    assert one.counts(["hello world"]) == [2]
    assert registry.for_prompt("gpt-4", None, 1).count("hello world") == 2  # cl100k_base
    assert registry.for_prompt("gpt-4o", None, 2).count("hello world") == 2
    assert registry.built == ("o200k_base", "cl100k_base")
    memos = registry._memos
    assert (len(memos["o200k_base"]), len(memos["cl100k_base"])) == (2, 1)  # per app, each
