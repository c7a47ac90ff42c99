"""OpenAI wire format: reading usage and generated text out of responses and stream chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from metering.pricing import TokenUsage

MAX_TOKENS_PER_CALL = 10**9  # DESIGN.md §9


@dataclass(frozen=True)
class UsageReading:
    """What an upstream's `usage` says: the counts when they can be trusted; else why not
    (the gateway then counts with the tokenizer and the ledger row says why). `total` is a
    total_tokens reported without its split (the gateway splits it by counting)."""

    usage: TokenUsage | None = None
    problem: str | None = None
    total: int | None = None
    # the usage as taken, adjusted (why); or one side not reported: that side is counted
    note: str | None = None
    count_output: bool = False


def _count(usage: dict[str, Any], names: tuple[str, ...]) -> tuple[int | None, str | None]:
    """A token count under one of `names`: (value, None), (None, None) when absent, or
    (None, why) when it is not a whole number from 0 to 10^9."""
    for name in names:
        if name not in usage or usage[name] is None:
            continue
        value = usage[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 12.0 is twelve
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 0 <= value <= MAX_TOKENS_PER_CALL:
            shown = repr(value)
            return None, f"{name} {shown[:40]} is not a whole number from 0 to 10^9"
        return value, None
    return None, None


def read_usage(doc: Any) -> UsageReading:
    """The `usage` object of an OpenAI response or stream chunk, checked: every count a whole
    number from 0 to 10^9 (an integral float such as 12.0 is taken as the integer)."""
    if not isinstance(doc, dict) or "usage" not in doc or doc["usage"] is None:
        return UsageReading()
    usage = doc["usage"]
    if not isinstance(usage, dict):
        return UsageReading(problem="usage is not an object")
    # chat completions' names, else the Responses API's
    prompt_details = usage.get("prompt_tokens_details")
    if prompt_details is None:
        prompt_details = usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    if completion_details is None:
        completion_details = usage.get("output_tokens_details")
    counts: dict[str, int | None] = {}
    for key, source, names in (
            ("input", usage, ("prompt_tokens", "input_tokens")),
            ("output", usage, ("completion_tokens", "output_tokens")),
            ("total", usage, ("total_tokens",)),
            ("cached", prompt_details, ("cached_tokens",)),
            ("reasoning", completion_details, ("reasoning_tokens",))):
        if source is not None and not isinstance(source, dict):
            return UsageReading(problem=f"usage details for {key} tokens are not an object")
        value, problem = _count(source or {}, names)
        if problem is not None:
            return UsageReading(problem=problem)
        counts[key] = value
    inp, out, total = counts["input"], counts["output"], counts["total"]
    if inp is None and out is None:
        # nothing, or a total alone: what was sent and generated is counted (and split)
        return UsageReading(total=total) if total else UsageReading()
    if inp is None:  # the output alone: the total gives the input, else it is all counted
        assert out is not None
        if total is None or total < out:
            return UsageReading(problem="usage has completion_tokens but no prompt_tokens")
        inp = total - out
    count_output = False
    if out is None:  # the input alone (as embeddings report it): the total gives the output
        if total is not None and total >= inp:
            out = total - inp
        else:
            out, count_output = 0, True
    if inp == 0 and out == 0 and not total:
        return UsageReading()  # an empty usage: counted, as if absent
    notes = []
    cached, reasoning = counts["cached"] or 0, counts["reasoning"] or 0
    if cached > inp:
        notes.append(f"cached_tokens {cached} above prompt_tokens {inp}: capped")
    if reasoning > out and not count_output:
        notes.append(f"reasoning_tokens {reasoning} above completion_tokens {out}: capped")
    return UsageReading(TokenUsage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=min(cached, inp),
        reasoning_tokens=min(reasoning, out)), note="; ".join(notes) or None,
        count_output=count_output)


def usage_from(doc: Any) -> TokenUsage | None:
    """TokenUsage from an OpenAI `usage` object, or None when absent, empty or not to be
    trusted."""
    return read_usage(doc).usage


def texts_of_choices(doc: Any) -> list[str]:
    """Generated text in a response or a stream chunk: message/delta content, legacy `text`,
    refusals, reasoning content, and tool-call names and arguments."""
    out: list[str] = []
    if not isinstance(doc, dict):
        return out
    choices = doc.get("choices")
    if not isinstance(choices, list):
        output = doc.get("output")  # a Response: its items
        if isinstance(output, list):
            _response_texts(output, out)
        return out
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            out.append(choice["text"])
        for key in ("message", "delta"):
            part = choice.get(key)
            if isinstance(part, dict):
                _message_texts(part, out)
    return out


# Output items of a Response that a [[meters]] entry counts: the item type, and the meter.
TOOL_METERS = {"web_search_call": "web_search_calls"}


def metered_item(item: Any, index: Any) -> tuple[str, str] | None:
    """(meter id, item id) for one output item a meter counts, else None. An item whose id is
    missing or not a short printable string is named by its place in the output."""
    if not isinstance(item, dict) or item.get("type") not in TOOL_METERS:
        return None
    item_id = item.get("id")
    if not (isinstance(item_id, str) and 0 < len(item_id) <= 200 and item_id.isprintable()):
        item_id = f"output-{index}"
    return TOOL_METERS[item["type"]], item_id


def metered_items(doc: Any) -> list[tuple[str, str]]:
    """The metered items of a Response's output (nothing for any other answer)."""
    output = doc.get("output") if isinstance(doc, dict) else None
    if not isinstance(output, list):
        return []
    return [found for i, item in enumerate(output) if (found := metered_item(item, i))]


def _message_texts(message: dict[str, Any], out: list[str]) -> None:
    for key in ("content", "refusal", "reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            out.append(value)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        out.append(fn[key])


def _response_texts(output: list[Any], out: list[str]) -> None:
    """Generated text of a Response's output items: message parts, function calls, reasoning
    summaries."""
    for item in output:
        if not isinstance(item, dict):
            continue
        for key in ("name", "arguments"):
            if isinstance(item.get(key), str):
                out.append(item[key])
        for holder in ("content", "summary"):
            parts = item.get(holder)
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict):
                    out.extend(part[k] for k in ("text", "refusal")
                               if isinstance(part.get(k), str))


def joined_texts(docs: Iterable[Any]) -> list[str]:
    """The generated text of a stream's chunks, joined per choice and per part (content,
    refusal, reasoning, each tool call's name and arguments) before it is counted: a text cut
    into many small chunks counts as the whole text does, not as its pieces."""
    parts: dict[tuple[Any, ...], list[str]] = {}
    for doc in docs:
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list):
            continue
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            index = index if isinstance(index, int) else position
            if isinstance(choice.get("text"), str):
                parts.setdefault((index, "text"), []).append(choice["text"])
            for holder in ("message", "delta"):
                part = choice.get(holder)
                if isinstance(part, dict):
                    _message_parts(index, part, parts)
    return [_whole("".join(pieces)) for pieces in parts.values()]


def _whole(text: str) -> str:
    """Surrogate halves sent in separate chunks, joined into their character."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _message_parts(index: int, message: dict[str, Any],
                   parts: dict[tuple[Any, ...], list[str]]) -> None:
    for key in ("content", "refusal", "reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            parts.setdefault((index, key), []).append(value)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for position, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                continue
            at = call.get("index")
            at = at if isinstance(at, int) else position
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    parts.setdefault((index, "tool", at, key), []).append(fn[key])
