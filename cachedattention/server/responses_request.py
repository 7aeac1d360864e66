"""A Responses API request (POST /v1/responses) read into the chat request the engine already serves.

OpenAI's Responses API keeps a conversation on the server: a request names the response it
continues (`previous_response_id`) and sends only the new input. The conversation is rebuilt as
chat messages: this request's `instructions` (a previous response's are not carried over, as in
OpenAI's API), the conversation so far, then the new input items.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from cachedattention.errors import InvalidRequest
from cachedattention.model.messages import joined_text_parts
from cachedattention.server.api_error import APIError, bad
from cachedattention.server.protocol import REASONING_EFFORTS, flag, whole_number

# sampling fields passed to the chat parser as they are (vLLM's Responses request takes these too)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos", "skip_special_tokens",
                   "stop_token_ids", "include_stop_str_in_output", "bad_words", "priority", "session_id", "cache_salt")  # fmt: skip
# read here, or accepted at their neutral values; anything else is refused (the API is young and
# a field silently dropped would change what the client gets)
FIELDS = frozenset((
    "model", "input", "instructions", "previous_response_id", "max_output_tokens", "stream", "store", "tools",
    "tool_choice", "parallel_tool_calls", "text", "metadata", "user", "truncation", "include", "top_logprobs",
    "background", "reasoning", "service_tier", "prompt_cache_key", "safety_identifier", "stream_options",
    "max_tool_calls", *SAMPLING_FIELDS,
))  # fmt: skip
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# the chat request's field names -> the Responses request's (errors name the field the client sent)
CHAT_NAMES = (("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
              ("response_format", "text.format"), ("logprobs", "include"))  # fmt: skip
TEXT_PARTS = ("input_text", "output_text", "text")
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
MAX_METADATA_KEYS = 16


@dataclass(frozen=True)
class ResponsesRequest:
    """The chat body to parse, and what the response echoes or needs besides."""

    chat_body: dict[str, Any]
    input_messages: list[dict[str, Any]]  # the new input as chat messages (stored with the answer)
    items: list[dict[str, Any]]  # the new input as items with ids (GET /v1/responses/{id}/input_items)
    instructions: str | None
    previous_response_id: str | None
    store: bool
    truncation: str  # "disabled": a conversation past the window is a 400; "auto": old turns dropped
    echo: dict[str, Any]  # the request's fields a response object repeats


def read_request(body: dict[str, Any], history: list[dict[str, Any]], reasons: bool = False) -> ResponsesRequest:
    """`history`: the chat messages of the conversation `previous_response_id` names (empty without one);
    `reasons`: the server reads its model's reasoning (--reasoning-parser), so `reasoning` options are taken."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad(f"{unknown[0]} is not supported by this server's Responses API", unknown[0], "unsupported_parameter")
    _check_json_values(body)
    _refuse_unsupported(body, reasons)
    instructions = _optional_text(body, "instructions")
    new = input_messages(body.get("input"))
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history + new
    chat: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    chat.update(messages=messages, stream=flag(body, "stream"), model=body.get("model"))
    tokens = body.get("max_output_tokens")
    if tokens is not None:
        chat["max_tokens"] = tokens  # checked by the chat parser (a positive integer)
    chat.update(_logprobs(body))
    chat.update(_tools(body))
    effort, summary = _reasoning_options(body.get("reasoning"))
    if effort is not None:  # as vLLM's: the chat template gets it (a template that reads it may act on it)
        chat["reasoning_effort"] = effort
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    truncation = "disabled" if body.get("truncation") is None else body["truncation"]
    if not isinstance(truncation, str) or truncation not in ("disabled", "auto"):  # (0, "" or [] is no setting)
        raise bad(f"truncation must be 'disabled' or 'auto', got {truncation!r}", "truncation")
    echo = {
        "instructions": instructions,
        "max_output_tokens": _as_int(tokens),  # (as vLLM's echo: 100.0 is 100, checked by the chat parser)
        "metadata": _metadata(body.get("metadata")),
        "parallel_tool_calls": flag(body, "parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": effort, "summary": summary},
        "background": flag(body, "background"),
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
        "tools": body.get("tools") or [],
        "top_logprobs": _as_int(body.get("top_logprobs")),
        "truncation": truncation,
        "user": _optional_text(body, "user"),
    }  # fmt: skip
    return ResponsesRequest(chat, new, input_items(body["input"]), instructions, body.get("previous_response_id"),
                            flag(body, "store", True),
                            truncation, echo)  # fmt: skip


def _check_json_values(body: dict[str, Any]) -> None:
    """What is echoed, stored or tokenized must be writable as JSON again: JSON may carry lone
    surrogates (UTF-8 has none), and Python's reader takes NaN and Infinity (JSON has neither: the
    response repeating them could not be sent, nor a stored one read back)."""
    for key, value in body.items():
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        except UnicodeEncodeError:  # (a ValueError too: first)
            raise bad(f"{key} is not valid Unicode text (it has a lone surrogate)", key) from None
        except ValueError:
            raise bad(f"{key} holds NaN or Infinity, which JSON has no value for", key) from None


def in_responses_terms(e: APIError) -> APIError:
    """The chat parser's error, naming the Responses request's field (its messages are the input)."""
    param = e.param or ""
    for chat, ours in CHAT_NAMES:
        if param == chat or param.startswith((chat + ".", chat + "[")):
            param = ours + param[len(chat) :]
            break
    param = param.replace(".function.", ".")  # chat nests a tool's fields under "function"
    if param.startswith("messages"):  # the conversation so far and this input: "input" is the part sent
        param = "input"
    return APIError(e.status, e.message, e.code, param or None, e.type)


def trim_conversation(conversation: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """The conversation within max_bytes of JSON, or as it is: past it, its oldest turns (after its
    leading system messages) go until half of it is left, so that trims are rare (each costs the
    next turn the reuse of its history)."""
    sizes = [len(json.dumps(m, ensure_ascii=False)) for m in conversation]
    if sum(sizes) <= max_bytes:
        return conversation
    head = 0
    while head < len(conversation) and conversation[head].get("role") in ("system", "developer"):
        head += 1
    start, total = head, sum(sizes)
    while total > max_bytes // 2:
        nxt = next((i for i in range(start + 1, len(conversation)) if conversation[i].get("role") == "user"), None)
        if nxt is None:
            break  # the last turn stays whole
        total -= sum(sizes[start:nxt])
        start = nxt
    return conversation[:head] + conversation[start:]


def previous_id(body: dict[str, Any]) -> str | None:
    v = body.get("previous_response_id")
    if v is not None and (not isinstance(v, str) or not v):
        raise bad("previous_response_id must be a non-empty string", "previous_response_id", "invalid_type")
    return v


def _refuse_unsupported(body: dict[str, Any], reasons: bool) -> None:
    if flag(body, "background") and flag(body, "stream"):
        raise bad("a background response is not streamed here: poll GET /v1/responses/{id} for it",
                  "background", "unsupported_parameter")  # fmt: skip
    if flag(body, "background") and not flag(body, "store", True):
        raise bad("a background response must be stored (store: true): it is read back by its id", "background")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad("reasoning must be an object", "reasoning", "invalid_type")
    if reasoning and any(v is not None for v in reasoning.values()) and not reasons:
        raise bad("reasoning options are not supported: this server reads no reasoning from its model (start it "
                  "with --reasoning-parser for a reasoning model)", "reasoning", "unsupported_parameter")  # fmt: skip
    include = [] if body.get("include") is None else body["include"]
    if not isinstance(include, list) or any(i != LOGPROBS_INCLUDE for i in include):
        raise bad(f"include may only list {LOGPROBS_INCLUDE!r} on this server", "include", "unsupported_parameter")
    _check_ignored(body)


def _check_ignored(body: dict[str, Any]) -> None:
    """The fields accepted and not acted on must still be of their type (a client's bug is said, not hidden)."""
    for key in ("service_tier", "prompt_cache_key", "safety_identifier"):
        _optional_text(body, key)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    calls = body.get("max_tool_calls")
    if calls is not None and ((n := whole_number(calls)) is None or n < 1):
        raise bad(f"max_tool_calls must be a positive integer, got {calls!r}", "max_tool_calls")


REASONING_SUMMARIES = ("auto", "concise", "detailed")


def _reasoning_options(reasoning: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """`reasoning.effort` and `.summary` (accepted only with a reasoning parser: checked before).
    No summary is written here: a reasoning item's summary stays empty, as OpenAI's may be."""
    reasoning = reasoning or {}
    unknown = sorted(set(reasoning) - {"effort", "summary", "generate_summary"})
    if unknown:
        raise bad(f"reasoning.{unknown[0]} is not supported", f"reasoning.{unknown[0]}", "unsupported_parameter")
    effort, summary = reasoning.get("effort"), reasoning.get("summary") or reasoning.get("generate_summary")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad(f"reasoning.effort must be one of {', '.join(REASONING_EFFORTS)}", "reasoning.effort")
    if summary is not None and summary not in REASONING_SUMMARIES:
        raise bad(f"reasoning.summary must be one of {', '.join(REASONING_SUMMARIES)}", "reasoning.summary")
    return effort, summary


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise bad(f"{key} must be a string", key, "invalid_type")
    return v


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The input as chat messages: a string is one user message; a list holds message items,
    function_call items (an assistant's tool calls, consecutive ones in one message),
    function_call_output items (a tool's result) and reasoning items (the reasoning of the assistant
    turn that follows, given to the template as its `reasoning_content`)."""
    if isinstance(value, str):
        if not value:
            raise bad("input must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input must be a non-empty string or a non-empty list of input items", "input", "invalid_type")
    out: list[dict[str, Any]] = []
    thought: str | None = None  # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{param} must be an object", param, "invalid_type")
        kind = item.get("type", "message")
        if item.get("status") is not None and item["status"] not in ITEM_STATUSES:  # (listed back as it came)
            raise bad(f"{param}.status must be one of {', '.join(ITEM_STATUSES)}", f"{param}.status")
        if kind == "reasoning":
            thought = _reasoning_text(item, param)
            continue
        if kind == "message":
            if item.get("role") not in MESSAGE_ROLES:
                raise bad(f"{param}.role must be one of {', '.join(MESSAGE_ROLES)}", f"{param}.role")
            if not isinstance(item.get("content"), (str, list)):  # (the items listed back read it as one of those)
                raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type")
            out.append({"role": item["role"], "content": _content(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", param), "type": "function",
                    "function": {"name": _string(item, "name", param), "arguments": _string(item, "arguments", param)}}  # fmt: skip
            if out and out[-1].get("role") == "assistant" and out[-1].get("tool_calls") and thought is None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, f"{param}.output")
            if not isinstance(content, str):  # (else the chat's check would name a messages[i].content never sent)
                raise bad(f"{param}.output must be a string or a list of text parts, got {type(output).__name__}",
                          f"{param}.output", "invalid_type")  # fmt: skip
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", param), "content": content})
        else:
            raise bad(f"{param}.type {kind!r} is not supported: use message, function_call, function_call_output "
                      "or reasoning items", f"{param}.type", "unsupported_parameter")  # fmt: skip
        if thought is not None and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"] = thought
        thought = None  # reasoning before anything but an assistant turn is no one's
    if not out:
        raise bad("input has no message", "input")
    return out


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_items(value: Any) -> list[dict[str, Any]]:
    """The input (checked by input_messages first) as OpenAI lists it back: items with ids, a
    message's text as content parts (input_text; output_text for an assistant's)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    out, seen = [], set()
    for item in value:
        kind = item.get("type", "message")
        item = {**item, "type": kind, "status": item.get("status") or "completed"}
        if not isinstance(item.get("id"), str) or not item["id"] or item["id"] in seen:  # ids page the listing
            item["id"] = f"{ITEM_ID_PREFIXES[kind]}_{uuid.uuid4().hex}"
        seen.add(item["id"])
        if kind == "message":
            item["content"] = _listed_parts(item.get("content"), item["role"])
        out.append(item)
    return out


def _listed_parts(content: Any, role: str) -> list[dict[str, Any]]:
    """A message's text as OpenAI lists it: input_text parts (an assistant's: output_text, with annotations)."""
    kind = "output_text" if role == "assistant" else "input_text"
    parts = [{"type": kind, "text": content}] if isinstance(content, str) else list(content)
    out = []
    for part in parts:
        part = {**part, "type": kind} if part.get("type") == "text" else dict(part)
        if part["type"] == "output_text":
            part.setdefault("annotations", [])
        out.append(part)
    return out


def _reasoning_text(item: dict[str, Any], param: str) -> str:
    """A reasoning item's text: its reasoning_text parts joined (its summary is not the reasoning)."""
    parts = item.get("content") or []
    if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
        raise bad(f"{param}.content must be a list of reasoning_text parts", f"{param}.content", "invalid_type")
    return "".join(p["text"] for p in parts)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or (key != "arguments" and not v):
        raise bad(f"{param}.{key} must be a non-empty string", f"{param}.{key}", "invalid_type")
    return v


def _content(content: Any, param: str) -> Any:
    """A message's text: a string, or a list of text parts (input_text, output_text, text) joined."""
    try:
        return joined_text_parts(content, param, TEXT_PARTS)
    except InvalidRequest as e:
        raise bad(str(e), e.param, "unsupported_parameter") from None


def _as_int(v: Any) -> Any:
    """An integer field's value as the response repeats it: 100.0 as 100 (a typed client's int
    field could not read 100.0); anything else as it came (the chat parser has said what is wrong)."""
    n = whole_number(v)
    return v if n is None else n


def _logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Logprobs come with the text when `include` asks for them, top_logprobs alternatives each."""
    top = body.get("top_logprobs")
    if top is not None and (top := whole_number(top)) is None:
        raise bad("top_logprobs must be an integer", "top_logprobs", "invalid_type")
    if top is not None and top < 0:  # (checked against the server's limit where include asks for logprobs)
        raise bad(f"top_logprobs must be >= 0, got {top}", "top_logprobs")
    if LOGPROBS_INCLUDE not in (body.get("include") or []):
        return {}
    return {"logprobs": True, "top_logprobs": top or 0}


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """Responses' function tools ({"type": "function", "name": ...}) in chat's nesting."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        return {} if choice is None else {"tool_choice": choice}  # the chat parser refuses a choice without tools
    if not isinstance(tools, list):
        raise bad("tools must be a list of function tools", "tools", "invalid_type")
    chat_tools = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise bad(f"tools[{i}]: only function tools are supported, got {kind!r}", f"tools[{i}]",
                      "unsupported_parameter")  # fmt: skip
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        chat_tools.append({"type": "function", "function": fn})
    out: dict[str, Any] = {"tools": chat_tools} if chat_tools else {}
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
                      "tool_choice")  # fmt: skip
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _text_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's response_format: text, json_object, or json_schema (name, schema, strict)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        if isinstance(text, dict):
            return None
        raise bad("text must be an object such as {'format': {'type': 'json_object'}}", "text", "invalid_type")
    if not isinstance(fmt, dict):
        raise bad("text.format must be an object", "text.format", "invalid_type")
    if fmt.get("type") != "json_schema":
        return fmt  # text / json_object: the chat parser takes them as they are (and refuses other types)
    inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": inner}


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata: at most 16 string pairs, echoed back."""
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in value.items())):  # fmt: skip
        raise bad(f"metadata must be an object of at most {MAX_METADATA_KEYS} string values (keys up to 64 "
                  "characters, values up to 512)", "metadata", "invalid_type")  # fmt: skip
    return dict(value)
