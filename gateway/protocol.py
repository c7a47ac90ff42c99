"""OpenAI wire format: reading usage and generated text out of responses and stream chunks."""

from __future__ import annotations

from typing import Any

from metering.pricing import TokenUsage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from(doc: Any) -> TokenUsage | None:
    """TokenUsage from an OpenAI `usage` object, or None when absent or empty."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    result = TokenUsage(
        input_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        cached_input_tokens=_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict) else 0,
        output_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict) else 0,
    )
    if result.input_tokens == 0 and result.output_tokens == 0 and not usage.get("total_tokens"):
        return None
    return result


def texts_of_choices(doc: Any) -> list[str]:
    """Generated text in a response or a stream chunk: message/delta content, legacy `text`,
    refusals, reasoning content, and tool-call names and arguments."""
    out: list[str] = []
    if not isinstance(doc, dict):
        return out
    choices = doc.get("choices")
    if not isinstance(choices, list):
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
