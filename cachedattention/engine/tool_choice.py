"""tool_choice "required" or a named function: the answer is one tool call of one of the given
functions, written as the model writes its calls (its CallForm): Hermes-style
<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call> (Qwen2.5, Hermes), Llama 3.1's
JSON {"name": NAME, "parameters": {...}}, Mistral's [TOOL_CALLS][{"name": NAME, "arguments": {...}}],
Granite's <|tool_call|>[...] and Phi-4-mini's functools[...] arrays of one such object, or a Python list
of one call, [NAME(**{...})] (the pythonic parser's form, its arguments in JSON).

The name is one of the allowed names exactly; the arguments follow that function's parameters
schema (any JSON object where it has none); the request stops when the call is written whole.
"""

from __future__ import annotations

import json
import keyword
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachedattention.engine import json_schema, schema_nodes
from cachedattention.engine.guided import Automaton
from cachedattention.engine.schema_compile import compile_schema


@dataclass(frozen=True)
class CallForm:
    """How a model writes one call: `opening` NAME `between` ARGUMENTS `closing` (the arguments in
    JSON; the name too, or bare where `quoted` is False)."""

    name: str
    opening: str
    between: str
    closing: str
    quoted: bool = True

    def head(self, function: str) -> str:
        if self.quoted:
            return f"{self.opening}{json.dumps(function, ensure_ascii=False)}{self.between}"
        if not all(_callable_name(part) for part in function.split(".")):
            raise ValueError(f"the function name {function!r} cannot be written as a Python call (pythonic tool calls)")
        return f"{self.opening}{function}{self.between}"


def _callable_name(name: str) -> bool:
    """A name Python reads back as itself in a call: an identifier, not a keyword, NFKC-stable."""
    return name.isidentifier() and not keyword.iskeyword(name) and unicodedata.normalize("NFKC", name) == name


CALL_FORMS = {
    "hermes": CallForm("hermes", '<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>"),
    "llama3_json": CallForm("llama3_json", '{"name": ', ', "parameters": ', "}"),
    "mistral": CallForm("mistral", '[TOOL_CALLS][{"name": ', ', "arguments": ', "}]"),
    "granite": CallForm("granite", '<|tool_call|>[{"name": ', ', "arguments": ', "}]"),
    "phi4_mini_json": CallForm("phi4_mini_json", 'functools[{"name": ', ', "arguments": ', "}]"),
    "pythonic": CallForm("pythonic", "[", "(**", ")]", quoted=False),
    "xlam": CallForm("xlam", '[{"name": ', ', "arguments": ', "}]"),
    "olmo3": CallForm("olmo3", "<function_calls>\n", "(**", ")\n</function_calls>", quoted=False),
    # Qwen3-Coder's parameters are untyped text: a forced call is written in Hermes' JSON, which its parser reads too
    "qwen3_coder": CallForm("qwen3_coder", '<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>"),
    "seed_oss": CallForm("seed_oss", '<seed:tool_call>\n{"name": ', ', "arguments": ', "}\n</seed:tool_call>"),
    "glm45": CallForm("glm45", '<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>"),
}


def parameters_node(schema: Any) -> Any:
    """A function's parameters schema compiled, as the object its arguments are: the schema's
    object readings (any object where it allows any value). ValueError when it allows no object."""
    objects = _objects(compile_schema(schema), set())
    if not objects:
        raise ValueError("a function's parameters schema must describe an object (its arguments)")
    return objects[0] if len(objects) == 1 else schema_nodes.Union(tuple(objects))


def _objects(node: Any, seen: set[int]) -> list[Any]:
    node = schema_nodes.resolve(node)
    if id(node) in seen:
        return []
    seen.add(id(node))
    if isinstance(node, schema_nodes.AnyValue):
        return [schema_nodes.ANY_OBJECT]
    if isinstance(node, schema_nodes.Obj):
        return [node]
    if isinstance(node, schema_nodes.Union):
        return [o for option in node.options for o in _objects(option, seen)]
    return []


def tool_call_automaton(names: Sequence[str], parameters: Sequence[Any] = (), form: str = "hermes") -> Automaton:
    """`parameters`: each function's parameters schema (a dict or its JSON text; None or "": any
    object), in the order of `names`, or none at all; `form`: a CALL_FORMS name. States: ("head",
    bytes so far), ("args", the schema automaton's state), ("tail", bytes of the closing written), ("done",)."""
    if not names:
        raise ValueError("a forced tool call needs at least one function name")
    if parameters and len(parameters) != len(names):
        raise ValueError("give one parameters schema per function name, or none")
    if form not in CALL_FORMS:
        raise ValueError(f"tool call format must be one of {', '.join(CALL_FORMS)}, got {form!r}")
    call = CALL_FORMS[form]
    tail = call.closing.encode()
    nodes = [parameters_node(p) if p else schema_nodes.ANY_OBJECT for p in parameters or [None] * len(names)]
    heads = {call.head(n).encode(): json_schema.automaton(node) for n, node in zip(names, nodes)}

    def step(state: tuple[Any, ...], b: int) -> tuple[Any, ...] | None:
        kind = state[0]
        if kind == "head":
            text = state[1] + bytes([b])
            if text in heads:
                return ("args", heads[text].start)
            return ("head", text) if any(h.startswith(text) for h in heads) else None
        if kind == "args":
            nxt = json_schema.step(state[1], b)
            if nxt is None:
                return None
            return ("tail", 0) if json_schema.is_done(nxt) else ("args", nxt)  # the arguments' object closed
        if kind == "tail" and b == tail[state[1]]:
            return ("done",) if state[1] + 1 == len(tail) else ("tail", state[1] + 1)
        return None

    def in_text(state: tuple[Any, ...]) -> bool:  # inside the arguments' strings
        return state[0] == "args" and json_schema.in_text(state[1])

    return Automaton(("head", b""), step, lambda state: state[0] == "done", in_text=in_text)
