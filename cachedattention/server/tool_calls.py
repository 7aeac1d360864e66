"""Tool calls in a model's answer, in the format the server was started with (`--tool-call-parser`):

- `hermes` (Qwen2.5, Hermes 2 and 3, SmolLM3, ...): text, then one or more
  <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks;
- `llama3_json` (Llama 3.1, 3.2, 3.3): an answer that is one or more JSON objects
  {"name": ..., "parameters": {...}}, separated by ";" (after the <|python_tag|> some write first).

Each parser gives the answer's text besides its calls, and how much of a streamed answer is plain
text for sure (the rest may still become a call, and waits).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def as_json(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's form; `index` for a streamed chunk's delta."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return out if index is None else {"index": index, **out}


def _call(obj: Any, keys: tuple[str, ...], required: bool = False) -> ToolCall | None:
    """A call from a decoded JSON object with a name and its arguments under the first of `keys`
    it has (`required`: an object must be there, else it is no call: a JSON answer that only has a
    "name" is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in keys if k in obj), None)
    if required and (key is None or not _is_object(obj[key])):
        return None
    args = (obj[key] if key is not None else None) or {}
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], args_text)


def _is_object(value: Any) -> bool:
    """A call's arguments: a JSON object, or its text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict)


class HermesCalls:
    """<tool_call> blocks after the answer's text."""

    name = "hermes"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """The answer's text before its tool calls (None when there is none, as vLLM; whitespace stays,
        as it streams) and the calls. A block that is not a JSON object with a name (or a model that
        only talks about <tool_call>) leaves the whole answer as text, as vLLM's parser does. The
        last block may lack its closing tag (a model that stops right after the JSON)."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls = []
        for block in text[start + len(OPEN) :].split(OPEN):
            try:
                call = _call(json.loads(block.split(CLOSE, 1)[0].strip()), ("arguments", "parameters"))
            except ValueError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        return text[:start] or None, calls

    @staticmethod
    def plain_text_end(text: str) -> int:
        """Up to the first <tool_call>, less a tail that may still grow into one."""
        i = text.find(OPEN)
        if i >= 0:
            return i
        for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if text.endswith(OPEN[:k]):
                return len(text) - k
        return len(text)


class Llama3JsonCalls:
    """An answer that is nothing but calls, as JSON objects (Llama 3.1's JSON tool calling)."""

    name = "llama3_json"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """No text and the calls, when the whole answer is calls; else the answer as text, no calls
        (as vLLM's parser: a call starts the answer, or there is none)."""
        body = text.strip()
        body = body.removeprefix(PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except ValueError:
                return text, []
            call = _call(obj, ("arguments", "parameters"), required=True)  # vLLM's order
            if call is None:
                return text, []
            calls.append(call)
            while i < len(body) and (body[i].isspace() or body[i] == ";"):
                i += 1
        return None, calls

    @staticmethod
    def plain_text_end(text: str) -> int:
        """All of it once it surely does not start with a call; nothing while it may."""
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
            return 0
        return len(text)


ToolCallParser = type[HermesCalls] | type[Llama3JsonCalls]
TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {p.name: p for p in (HermesCalls, Llama3JsonCalls)}


def tool_call_parser(name: str) -> ToolCallParser:
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool call parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}")
    return TOOL_CALL_PARSERS[name]
