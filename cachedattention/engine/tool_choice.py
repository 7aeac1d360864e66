"""tool_choice "required" or a named function: the answer is one Hermes-style tool call,
<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>, of one of the given functions.

The name is one of the allowed names exactly; the arguments are any JSON object (not checked
against the function's parameters schema); the request stops when the call's closing tag is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cachedattention.engine.json_mode import START, Automaton
from cachedattention.engine.json_mode import step as json_step

TAIL = b"}\n</tool_call>"


def tool_call_automaton(names: Sequence[str]) -> Automaton:
    """States: ("head", bytes so far), ("args", JSON state), ("tail", bytes of TAIL written), ("done",)."""
    if not names:
        raise ValueError("a forced tool call needs at least one function name")
    heads = tuple(f'<tool_call>\n{{"name": {json.dumps(n, ensure_ascii=False)}, "arguments": '.encode() for n in names)

    def step(state: tuple[Any, ...], b: int) -> tuple[Any, ...] | None:
        kind = state[0]
        if kind == "head":
            text = state[1] + bytes([b])
            if text in heads:
                return ("args", START)
            return ("head", text) if any(h.startswith(text) for h in heads) else None
        if kind == "args":
            nxt = json_step(state[1], b)
            if nxt is None:
                return None
            return ("tail", 0) if nxt[0] == "done" else ("args", nxt)  # the arguments' object closed
        if kind == "tail" and b == TAIL[state[1]]:
            return ("done",) if state[1] + 1 == len(TAIL) else ("tail", state[1] + 1)
        return None

    return Automaton(("head", b""), step, lambda state: state[0] == "done")
