"""Tool calls in a model's answer, written the Hermes way (Qwen2.5, Hermes 2 and 3, SmolLM3, ...):
text, then one or more <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


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


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's text before its tool calls (None when there is none, as vLLM; whitespace stays,
    as it streams) and the calls. A block
    that is not a JSON object with a name (or a model that only talks about <tool_call>) leaves
    the whole answer as text, as vLLM's parser does. The last block may lack its closing tag (a
    model that stops right after the JSON)."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for block in text[start + len(OPEN) :].split(OPEN):
        body = block.split(CLOSE, 1)[0].strip()
        try:
            obj = json.loads(body)
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return text, []
        args = obj.get("arguments", obj.get("parameters")) or {}
        args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], args_text))
    return text[:start] or None, calls


def plain_text_end(text: str) -> int:
    """How much of a streamed answer is plain text for sure: up to its first <tool_call>, less a
    tail that may still grow into one."""
    i = text.find(OPEN)
    if i >= 0:
        return i
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return len(text) - k
    return len(text)
