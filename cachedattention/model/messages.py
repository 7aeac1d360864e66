"""OpenAI-style chat messages, checked before a chat template renders them: roles and text content,
an assistant's tool calls (and reasoning) and the tool results that answer them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachedattention.errors import InvalidRequest
from cachedattention.model.content_format import TEXT_PARTS

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as the chat template takes them; InvalidRequest (a ValueError) names what is wrong.

    A null content is an empty one (as vLLM takes it; an assistant that only calls tools sends
    one); an assistant message may carry `tool_calls`; a `tool` message is a tool's result, with
    the `tool_call_id` it answers."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {'role': ..., 'content': ...} dicts", "messages")
    return [_message(i, m) for i, m in enumerate(messages)]


def joined_text_parts(content: Any, param: str, part_types: tuple[str, ...] = ("text",)) -> Any:
    """OpenAI's content as a list of parts flattened into its text, one part a line (as vLLM joins
    them); any other content as it is (its type is the caller's to check). A part not of
    `part_types`' text is refused, naming it."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in part_types:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(
                f"{param}[{j}]: only text parts are supported ({', '.join(part_types)}), got {kind!r}", f"{param}[{j}]"
            )
        if not isinstance(part.get("text"), str):  # (a text part without its text is no other kind of part)
            raise InvalidRequest(f"{param}[{j}].text must be a string, got {type(part.get('text')).__name__}",
                                 f"{param}[{j}].text")  # fmt: skip
        texts.append(part["text"])
    return "\n".join(texts)


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise InvalidRequest(f"messages[{i}] must be a dict, got {type(m).__name__}", f"messages[{i}]")
    role = "system" if m.get("role") == "developer" else m.get("role")  # (OpenAI's newer name for it)
    if role not in ROLES:
        raise InvalidRequest(
            f"messages[{i}].role must be one of {', '.join(map(repr, ROLES))} (or 'developer', taken as 'system'), "
            f"got {role!r}", f"messages[{i}].role"
        )
    # an empty list is no calls (some clients send one, older vLLM answers carry one): left out, as vLLM
    # drops it, so a template stays on the plain answer's path
    calls = _tool_calls(i, m.get("tool_calls")) if role == "assistant" and m.get("tool_calls") else None
    sends_calls = role == "assistant" and m.get("tool_calls") is not None  # (its content may be left out)
    if "content" not in m and not sends_calls:  # (a client bug worth telling; null is fine)
        raise InvalidRequest(f"messages[{i}].content is missing", f"messages[{i}].content")
    given = m.get("content")
    content = joined_text_parts(given, f"messages[{i}].content")
    if content is None:
        content = ""  # as vLLM: null content is empty (templates concatenate content)
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content must be a string, a list of text parts or null",
                             f"messages[{i}].content")  # fmt: skip
    out: dict[str, Any] = {"role": role, "content": content}
    if isinstance(given, list) and len(given) > 1:  # the parts as given, for a template that reads them
        out[TEXT_PARTS] = [part["text"] for part in given]
    if calls:
        out["tool_calls"] = calls
    if role == "assistant":
        reasoning = _reasoning(i, m)
        if reasoning is not None:  # a reasoning model's thinking, given back: its template may write it
            out["reasoning_content"] = reasoning  # (Qwen3's, DeepSeek-R1's name)
            out["thinking"] = reasoning  # (gpt-oss's)
    # a speaker's name, any role's (as vLLM passes it: some templates write it); a tool result's call id
    for key in ("tool_call_id", "name") if role == "tool" else ("name",):
        v = m.get(key)
        if v is not None and not isinstance(v, str):
            raise InvalidRequest(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}")
        if v is not None:
            out[key] = v
    return out


def _reasoning(i: int, m: dict[str, Any]) -> str | None:
    """An assistant's reasoning, under vLLM's name (`reasoning`) or its older one (`reasoning_content`)."""
    for key in ("reasoning_content", "reasoning"):
        value = m.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidRequest(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}")
            return value
    return None


def _tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
    out = []
    for j, call in enumerate(calls):
        param = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"{param}.function.name must be a non-empty string", f"{param}.function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise InvalidRequest(f"{param}.function.arguments must be a JSON string", f"{param}.function.arguments")
        if isinstance(args, str):  # clients send JSON text; templates write arguments as objects (as vLLM)
            args = _json_object(args)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidRequest(f"{param}.id must be a string", f"{param}.id")
        out.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _json_object(text: str) -> dict[str, Any] | str:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # (nested past the parser's depth: not read as JSON either)
        return text  # not JSON: the template gets the text as it came
    return value if isinstance(value, dict) else text


MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI's function definitions ([{"type": "function", "function": {"name", "description",
    "parameters"}}]) as the chat template takes them; None for none."""
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS} function definitions", "tools")
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            shape = "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
            raise InvalidRequest(f"tools[{j}] must be {shape}", f"tools[{j}]")
        if not TOOL_NAME.fullmatch(fn["name"]):
            raise InvalidRequest(f"tools[{j}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and - (as OpenAI's)",
                                 f"tools[{j}]")  # fmt: skip
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InvalidRequest(f"tools[{j}].function.parameters must be a JSON schema object", f"tools[{j}]")
    names = [t["function"]["name"] for t in tools]
    for j, name in enumerate(names):
        if name in names[:j]:  # which one would a call of it mean?
            raise InvalidRequest(f"tools[{j}].function.name {name!r} is given twice", f"tools[{j}]")
    return tools or None


# what the template receives beside these (and its own functions), and apply_chat_template's own
# options: chat_template_kwargs may not replace them
RESERVED_TEMPLATE_NAMES = frozenset((
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "conversation",
    "conversations", "self", "namespace", "raise_exception", "strftime_now", "range", "loop", "tokenize",
    "chat_template", "return_dict", "padding", "truncation", "max_length", "return_tensors", "tokenizer_kwargs",
    "return_assistant_tokens_mask", "sanitize_control_tokens", "kwargs",
))  # fmt: skip


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt beyond its messages (vLLM's chat fields): the assistant's
    header at the end (add_generation_prompt), or the last message, the assistant's, left open for
    the model to go on with (continue_final_message); extra variables for the chat template
    (chat_template_kwargs, e.g. Qwen3's enable_thinking); documents for retrieval-augmented
    templates (the template's `documents`, a list of objects); add_special_tokens: the rendered
    text encoded with what the tokenizer adds around a text (Llama's BOS) on top of the template's
    own, as vLLM's field asks (off: the template writes its own)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    template: str | None = None  # a request's own chat template (a server started to trust them), checked
    documents: Sequence[Mapping[str, Any]] | None = None
    add_special_tokens: bool = False

    def __post_init__(self) -> None:
        for name in ("add_generation_prompt", "continue_final_message", "add_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false", name)
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequest("continue_final_message goes on with the last message: set add_generation_prompt "
                                 "to false with it", "continue_final_message")  # fmt: skip
        kwargs = self.template_kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise InvalidRequest("chat_template_kwargs must map template variable names to values",
                                 "chat_template_kwargs")  # fmt: skip
        taken = sorted(RESERVED_TEMPLATE_NAMES & set(kwargs))
        if taken:
            raise InvalidRequest(f"chat_template_kwargs may not set {taken[0]!r}: it has its own field",
                                 "chat_template_kwargs")  # fmt: skip
        _check_documents(self.documents)

    def check(self, messages: Sequence[dict[str, Any]]) -> None:
        if self.continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequest("continue_final_message goes on with the last message, which must be the "
                                 "assistant's", "continue_final_message")  # fmt: skip

    def render_kwargs(self) -> dict[str, Any]:
        """apply_chat_template's keyword arguments."""
        kwargs = {"add_generation_prompt": self.add_generation_prompt,
                  "continue_final_message": self.continue_final_message, **self.template_kwargs}  # fmt: skip
        if self.documents is not None:  # (transformers' own argument: the template's `documents`)
            kwargs["documents"] = list(self.documents)
        return kwargs


def _check_documents(documents: Any) -> None:
    """vLLM's `documents`: a list of objects (a retrieved text's fields, as the template reads them)."""
    if documents is None:
        return
    if not isinstance(documents, (list, tuple)):
        raise InvalidRequest("documents must be a list of objects", "documents")
    for j, doc in enumerate(documents):
        if not isinstance(doc, Mapping) or not all(isinstance(k, str) for k in doc):
            raise InvalidRequest(f"documents[{j}] must be an object", f"documents[{j}]")
