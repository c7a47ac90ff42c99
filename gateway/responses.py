"""OpenAI's Responses API on top of a chat call, or forwarded to an upstream that speaks it.

An app posts to /v1/responses (the `openai` package's `client.responses`, the `openai-agents`
package). When the model's upstream declares `api = "responses"` the body goes to it as it is
(model name, output cap), and its usage is read from the Response. Otherwise the request is
translated into the chat completion the gateway meters, limits and forwards like any other, and
the answer is translated back: a Response, or the Responses event stream.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from core.config import Config
from core.errors import InvalidRequestError
from metering.records import CallRecord
from metering.service import ENDPOINT_RESPONSES

RESPONSES_ENDPOINT = ENDPOINT_RESPONSES  # the ledger's name for calls that came in this way
# Fields a translated call cannot serve: they need state or tools the upstream does not keep.
_STATEFUL = {
    "previous_response_id": "the upstream does not keep state: send the whole conversation "
                            "in `input` (only upstreams with api = \"responses\" take it)",
    "conversation": "the upstream does not keep conversations: send them in `input`",
    "prompt": "stored prompts need an upstream with api = \"responses\"",
}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_EFFORTS = ("minimal", "low", "medium", "high", "xhigh", "none")


def speaks_responses(config: Config, name: Any) -> bool:
    """Whether a Responses call for this model name goes to its upstream as it is: the model's
    upstream (or every candidate's, for a configured alias) declares api = "responses"."""
    if not isinstance(name, str):
        return False
    model = config.model(name)
    names = [model.name] if model is not None else next(
        (list(a.models) for a in config.aliases if a.name == name), [])
    if not names:
        return False  # unknown, or a plan's alias: served as chat
    apis = {config.upstream(m.upstream).api for m in config.models if m.name in names}
    return apis == {"responses"}


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request for a Responses request; bad input raises a 400 naming the
    field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    for name, why in _STATEFUL.items():
        if body.get(name) not in (None, False):
            raise InvalidRequestError(f"{name} is not supported for model {model!r}: {why}.",
                                      param=name)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequestError("instructions must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages.extend(_chat_messages(body.get("input")))
    chat: dict[str, Any] = {"model": model, "messages": messages}
    if not isinstance(body.get("stream"), bool | None):
        raise InvalidRequestError("stream must be true or false.", param="stream")
    if body.get("stream") is True:
        chat["stream"] = True
    cap = body.get("max_output_tokens")
    if cap is not None:
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise InvalidRequestError("max_output_tokens must be a positive integer.",
                                      param="max_output_tokens")
        chat["max_tokens"] = cap  # its upper bound is checked with every cap field
    for name in ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key",
                 "service_tier"):
        if body.get(name) is not None:
            chat[name] = body[name]
    _add_options(body, chat)
    return chat


def _add_options(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """Tools, the tool choice, the reasoning effort and the output format, as chat's."""
    tools = body.get("tools")
    if tools:
        chat["tools"] = _chat_tools(tools)
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _chat_tool_choice(choice)
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        if reasoning["effort"] not in _EFFORTS:
            raise InvalidRequestError(f"reasoning.effort must be one of {', '.join(_EFFORTS)}.",
                                      param="reasoning")
        chat["reasoning_effort"] = reasoning["effort"]
    fmt = body.get("text", {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("input must be a string or a non-empty list of items.",
                                  param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object.", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_chat_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" \
                    and not isinstance(last.get("content"), list):
                last.setdefault("tool_calls", []).append(call)  # one turn: one message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequestError(f"{where}.call_id must be a string.", param="input")
            output = item.get("output", "")
            text = output if isinstance(output, str) else _joined_text(output, where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # a model's earlier reasoning is not sent back to a chat model
        else:
            raise InvalidRequestError(
                f"{where}: input items of type {kind!r} are not supported for this model "
                "(messages, function_call and function_call_output are).", param="input")
    return out


def _chat_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequestError(f"{where}.role must be user, assistant, system or developer.",
                                  param="input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts.",
                                  param="input")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content[{j}]"
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InvalidRequestError(f"{at}: an image needs an image_url (a URL or a data "
                                          "URL); file_id is not supported for this model.",
                                          param="input")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequestError(f"{at}: content part {kind!r} is not supported for "
                                      f"{role} messages of this model.", param="input")
    if all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name = item.get("call_id"), item.get("name")
    arguments = item.get("arguments", "")
    if not isinstance(call_id, str) or not isinstance(name, str) \
            or not isinstance(arguments, str):
        raise InvalidRequestError(f"{where}: a function_call needs call_id, name and arguments "
                                  "(strings).", param="input")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _joined_text(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise InvalidRequestError(f"{where}.output must be a string or a list of parts.",
                                  param="input")
    return "".join(p["text"] for p in parts
                   if isinstance(p, dict) and isinstance(p.get("text"), str))


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequestError(
                f"tools[{i}]: built-in tools ({kind!r}) are not supported for this model: its "
                "upstream serves chat completions, which take function tools only.",
                param="tools")
        if not isinstance(tool.get("name"), str):
            raise InvalidRequestError(f"tools[{i}]: a function tool needs a name.",
                                      param="tools")
        fn: dict[str, Any] = {"name": tool["name"],
                              "parameters": tool.get("parameters") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError("tool_choice must be auto, none, required or a function "
                              "({\"type\": \"function\", \"name\": ...}).", param="tool_choice")


# -- the answer ----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def usage_of(record: CallRecord) -> dict[str, Any]:
    """The ledger's usage as the Responses API reports it (input includes the cached part)."""
    return {"input_tokens": record.input_tokens,
            "input_tokens_details": {"cached_tokens": record.cached_input_tokens,
                                     "cache_write_tokens": record.cache_write_tokens},
            "output_tokens": record.output_tokens,
            "output_tokens_details": {"reasoning_tokens": record.reasoning_tokens},
            "total_tokens": record.input_tokens + record.output_tokens}


def shell(request: dict[str, Any], response_id: str, created: int) -> dict[str, Any]:
    """A Response's fields that echo the request, with no output yet (status in_progress)."""
    text = request.get("text") if isinstance(request.get("text"), dict) else None
    return {
        "id": response_id, "object": "response", "created_at": created,
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"), "model": request.get("model"),
        "output": [], "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None, "reasoning": request.get("reasoning") or {
            "effort": None, "summary": None},
        "store": False, "temperature": request.get("temperature"),
        "text": text or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
        "top_p": request.get("top_p"), "truncation": request.get("truncation", "disabled"),
        "usage": None, "user": request.get("user"), "metadata": request.get("metadata") or {},
    }


def finished(response: dict[str, Any], finish: Any, record: CallRecord) -> dict[str, Any]:
    """The response, complete (or incomplete: cut at the output cap, or filtered)."""
    reason = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["usage"] = usage_of(record)
    return response


def message_item(item_id: str, text: str, status: str = "completed",
                 refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [],
                        "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def response_from_chat(doc: Any, request: dict[str, Any], record: CallRecord) -> dict[str, Any]:
    """A Response for a chat completion response."""
    choice = first_choice(doc)
    message = as_dict(choice.get("message"))
    output: list[dict[str, Any]] = []
    text, refusal = message.get("content"), message.get("refusal")
    if (isinstance(text, str) and text) or (isinstance(refusal, str) and refusal):
        output.append(message_item(new_id("msg"), text if isinstance(text, str) else "",
                                   refusal=refusal if isinstance(refusal, str) else None))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            output.append(call_item(new_id("fc"), str(call.get("id") or new_id("call")),
                                    str(fn.get("name") or ""), str(fn.get("arguments") or "")))
    response = shell(request, new_id("resp"), int(time.time()))
    response["output"] = output
    return finished(response, choice.get("finish_reason"), record)


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def first_choice(doc: Any) -> dict[str, Any]:
    choices = doc.get("choices") if isinstance(doc, dict) else None
    return as_dict(choices[0]) if isinstance(choices, list) and choices else {}
