"""vLLM's --chat-template-content-format: whether a chat template reads a message's content as one
string or as OpenAI's list of parts ({"type": "text", "text": ...}), and the messages as it reads them.
"auto" reads the template: one that loops over a message's content takes the list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachedattention.config import CONTENT_FORMATS

__all__ = ["CONTENT_FORMATS", "TEXT_PARTS", "as_parts", "as_string", "detect_content_format"]
TEXT_PARTS = "_text_parts"  # a validated message's own text parts, when it gave a list (its content joins them)


def detect_content_format(template: str) -> str:
    """"openai" when the template iterates over a message's `content` (`{% for part in
    message['content'] %}`, or over a name set from it), else "string" (also for a template Jinja
    cannot parse: rendering will say why)."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    from_content = {assign.target.name for assign in tree.find_all(nodes.Assign)
                    if isinstance(assign.target, nodes.Name) and _reads_content(assign.node)}  # fmt: skip
    for loop in tree.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Filter) and it.node is not None:  # `content | selectattr(...)` and the like
            it = it.node
        if _reads_content(it) or (isinstance(it, nodes.Name) and it.name in from_content):
            return "openai"
    return "string"


def _reads_content(node: Any) -> bool:
    from jinja2 import nodes

    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return isinstance(node, nodes.Getattr) and node.attr == "content"


def as_parts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their content as OpenAI's list of text parts: the parts a request gave, or
    its text as one part."""
    out = []
    for m in messages:
        texts = m.get(TEXT_PARTS) or [m["content"]]
        out.append({**as_string(m), "content": [{"type": "text", "text": t} for t in texts]})
    return out


def as_string(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its content as one string (its text parts joined a line each)."""
    return {k: v for k, v in message.items() if k != TEXT_PARTS}
