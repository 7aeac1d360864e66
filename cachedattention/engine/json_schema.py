"""Structured answers: JSON that follows a schema (OpenAI's response_format json_schema, vLLM's
guided_json), any JSON object (json_object), or one of given strings (vLLM's guided_choice).

A schema compiles to a tree of nodes (engine/schema_compile.py, engine/schema_nodes.py); this
byte-level automaton follows the answer through it. A state is the set of stacks of open values that
the text so far can be in (more than one where the schema offers alternatives: anyOf, a list of
types), all immutable tuples, so trying a token copies nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachedattention.engine.guided import WHITESPACE, Automaton
from cachedattention.engine.schema_compile import compile_schema
from cachedattention.engine.schema_nodes import (
    ANY_ARRAY,
    ANY_OBJECT,
    ANY_STRING,
    LITERALS,
    NUMBER,
    AnyValue,
    Arr,
    Lit,
    Num,
    Obj,
    Str,
    Union,
    literals,
    resolve,
)  # fmt: skip

HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
JSON_ESCAPES = dict(zip(b'"\\/bfnrt', map(ord, '"\\/\b\f\n\r\t')))  # escape letter -> the character it writes
ESCAPES = frozenset(JSON_ESCAPES)
NUMBER_ENDS = frozenset(("0", "int", "frac", "exp"))  # number parts after which the number may end
MAX_STACKS = 32  # readings of the text followed at once


def _literal_step(rest: tuple, node: Lit, b: int, out: list) -> None:
    child = node.next.get(b)
    if child is None:
        return
    if child.end:  # a string ends here (another may go on)
        out.append(rest)
    if child.next:
        out.append((*rest, ("l", child)))


# -- the automaton: a state is a tuple of stacks (tuples of frames) --------------------------------
# frames: ("r", node) the root value, ("v", node) a value after optional whitespace,
# ("o", obj, seen names, phase, name) an object (phase: first, key, colon, after; seen also holds
# a number per property not listed where the object counts its properties),
# ("k", obj, seen, key bytes, escape) a key, ("a", arr, count, phase) an array (first, after),
# ("s", str, count, escape) a string, ("n", num, part, text of a bounded integer) a number,
# ("l", trie node) the rest of a literal


# a UTF-8 lead byte -> (the range of the next byte, the state after it): overlong forms and
# surrogates are refused as Python's decoder refuses them
UTF8_LEADS = {
    **{b: ((0x80, 0xBF), "") for b in range(0xC2, 0xE0)},
    0xE0: ((0xA0, 0xBF), "c1"), 0xED: ((0x80, 0x9F), "c1"),
    **{b: ((0x80, 0xBF), "c1") for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xF0: ((0x90, 0xBF), "c2"), 0xF4: ((0x80, 0x8F), "c2"),
    **{b: ((0x80, 0xBF), "c2") for b in range(0xF1, 0xF4)},
}  # fmt: skip


def _escape(esc: str | tuple, b: int) -> str | tuple | None:
    """Inside a string, after `esc` (what is in progress: "" nothing, "\\" an escape, "uN" N hex
    digits of a \\u escape to come, "cN" N UTF-8 continuation bytes to come, or a lead byte's
    (range of the next byte, state after it)), byte b: the state after it, or None when the string
    breaks (the closing quote is the caller's)."""
    if not esc:
        if b == ord("\\"):
            return "\\"
        if b < 0x80:
            return None if b < 0x20 else ""  # raw control characters are not allowed
        return UTF8_LEADS.get(b)  # a character's first byte, or None: not valid UTF-8
    if isinstance(esc, tuple):
        (lo, hi), after = esc
        return after if lo <= b <= hi else None
    if esc == "\\":
        return "" if b in ESCAPES else "u4" if b == ord("u") else None
    if esc[0] == "c":
        return ("" if esc == "c1" else f"c{int(esc[1]) - 1}") if 0x80 <= b <= 0xBF else None
    return (f"u{int(esc[1]) - 1}" if esc[1] != "1" else "") if b in HEX else None


def _number_part(part: str, b: int, node: Num) -> str | None:
    digit = b in DIGITS
    if part == "-":
        return "0" if b == ord("0") else "int" if digit else None
    if part in ("0", "int") and not node.integer and (b == ord(".") or (b in b"eE" and not node.bounded)):
        return "." if b == ord(".") else "e"
    if part == "int" and digit:
        return "int"
    if part == ".":
        return "frac" if digit else None
    if part == "frac":
        return "frac" if digit else "e" if b in b"eE" and not node.bounded else None
    if part == "e":
        return "es" if b in b"+-" else "exp" if digit else None
    if part in ("es", "exp"):
        return "exp" if digit else None
    return None


def _start(rest: tuple, node: Any, b: int, out: list, seen: set[int]) -> None:
    """Byte b begins a value of `node`, on top of the frames `rest`: add each stack it can lead to."""
    node = resolve(node)
    if id(node) in seen:  # a union that reaches itself: already tried
        return
    seen.add(id(node))
    if isinstance(node, Union):
        for option in node.options:
            _start(rest, option, b, out, seen)
    elif isinstance(node, AnyValue):
        if b == ord("{"):
            _start(rest, ANY_OBJECT, b, out, seen)
        elif b == ord("["):
            _start(rest, ANY_ARRAY, b, out, seen)
        elif b == ord('"'):
            _start(rest, ANY_STRING, b, out, seen)
        elif b in LITERALS:
            _start(rest, LITERALS[b], b, out, seen)
        else:
            _start(rest, NUMBER, b, out, seen)
    elif isinstance(node, Obj):
        if b == ord("{"):
            out.append((*rest, ("o", node, frozenset(), "first", None)))
    elif isinstance(node, Arr):
        if b == ord("["):
            out.append((*rest, ("a", node, 0, "first")))
    elif isinstance(node, Str):
        if b == ord('"'):
            matched = node.matcher
            out.append((*rest, ("s", node, 0, "") if matched is None else ("s", node, 0, "", matched.start, "")))
    elif isinstance(node, Num) and (b == ord("-") or b in DIGITS):
        text = chr(b) if node.bounded else ""  # only a bounded integer keeps its text (states stay shared)
        if not node.bounded or node.viable(text):
            out.append((*rest, ("n", node, "-" if b == ord("-") else "0" if b == ord("0") else "int", text)))
    elif isinstance(node, Lit):
        _literal_step(rest, node, b, out)


def _more_keys(obj: Obj, seen: frozenset) -> bool:
    return (obj.extra is not None and _may_add(obj, seen, None)) or any(
        name not in seen and _may_add(obj, seen, name) for name in obj.props)  # fmt: skip


def _may_add(obj: Obj, seen: frozenset, name: str | None) -> bool:
    """Whether one more property (`name`; None: one not listed) leaves room under maxProperties
    for the required ones still missing."""
    if obj.max_props is None:
        return True
    missing = len(obj.required - seen - {name})
    return len(seen) + 1 + missing <= obj.max_props


def _closes(obj: Obj, seen: frozenset) -> bool:
    return obj.required <= seen and len(seen) >= obj.min_props


def _with_other(obj: Obj, seen: frozenset) -> frozenset:
    """`seen` after a property not listed: counted (as a number) where the object counts them."""
    return seen | {len(seen)} if obj.counts else seen


def _object(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, obj, seen, phase, name = frame
    if b in WHITESPACE:
        out.append((*rest, frame))
    elif phase in ("first", "key"):
        if b == ord('"') and _more_keys(obj, seen):
            out.append((*rest, ("k", obj, seen, b"", "")))
        elif b == ord("}") and phase == "first" and _closes(obj, seen):
            out.append(rest)
    elif phase == "colon":
        if b == ord(":"):
            value = obj.props[name] if name is not None else obj.extra
            out.append((*rest, ("o", obj, seen, "after", None), ("v", value)))
    elif b == ord(","):  # after a value
        if _more_keys(obj, seen):
            out.append((*rest, ("o", obj, seen, "key", None)))
    elif b == ord("}") and _closes(obj, seen):
        out.append(rest)


def _key(rest: tuple, frame: tuple, b: int, out: list) -> None:
    """A property's name: one of the listed ones not written yet, or (where the object allows
    others) any other string."""
    _, obj, seen, text, esc = frame
    if b == ord('"') and not esc:
        name = obj.keys.get(text)
        if name is not None:
            if name not in seen and _may_add(obj, seen, name):
                out.append((*rest, ("o", obj, seen | {name}, "colon", name)))
        elif obj.extra is not None and _may_add(obj, seen, None):
            out.append((*rest, ("o", obj, _with_other(obj, seen), "colon", None)))
        return
    nxt = _escape(esc, b)
    if nxt is None:
        return
    text += bytes((b,))
    listed = any(k.startswith(text) and n not in seen and _may_add(obj, seen, n) for k, n in obj.keys.items())
    # another key may not be escaped where properties are listed: "\\u0061" would be a listed "a"
    # under another schema
    other = obj.extra is not None and not (obj.keys and b"\\" in text) and _may_add(obj, seen, None)
    if listed or other:
        out.append((*rest, ("k", obj, seen, text if obj.keys else b"", nxt)))


def _array(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, arr, count, phase = frame  # count: the items written (up to arr.counted where unbounded)
    if b in WHITESPACE:
        out.append((*rest, frame))
    elif phase == "first":
        if b == ord("]") and arr.min_items == 0:
            out.append(rest)
        elif arr.max_items != 0 and arr.item(0) is not None:
            _start((*rest, ("a", arr, 1, "after")), arr.item(0), b, out, set())
    elif b == ord(","):
        item = arr.item(count)
        if (arr.max_items is None or count < arr.max_items) and item is not None:
            counted = count + 1 if arr.max_items is not None or count < arr.counted else count  # unbounded: stop counting
            out.append((*rest, ("a", arr, counted, "after"), ("v", item)))
    elif b == ord("]") and count >= arr.min_items:
        out.append(rest)


def _string(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, node, count, esc = frame[:4]
    if node.matcher is not None:
        _pattern_string(rest, frame, b, out)
        return
    if b == ord('"') and not esc:
        if count >= node.min_len:
            out.append(rest)
        return
    nxt = _escape(esc, b)
    if nxt is not None:
        count = _counted(node, count, esc)
        if count is not None:
            out.append((*rest, ("s", node, count, nxt)))


def _counted(node: Str, count: int, esc: str | tuple) -> int | None:
    """The string's character count after one more byte (None: past maxLength)."""
    if not node.counts or esc:  # not counted, or inside a character
        return count
    count += 1  # a character starts here
    if node.max_len is not None:
        return count if count <= node.max_len else None
    return min(count, node.min_len)  # only a minimum: past it, the count no longer matters


def _pattern_string(rest: tuple, frame: tuple, b: int, out: list) -> None:
    """A string held to a pattern or a format (its node's matcher, which also counts its length):
    the characters it stands for, escapes decoded, go through the matcher. An escape begins only
    where some character may follow; a \\u escape of a surrogate is refused (the character may be
    written as itself)."""
    _, node, count, esc, cursor, hexa = frame
    matcher = node.matcher
    if b == ord('"') and not esc:
        if matcher.matched(cursor):
            out.append(rest)
        return
    nxt = _escape(esc, b)
    if nxt is None:
        return
    if esc == "\\":  # the escape's letter: its character, or a \\u escape begins
        cursor = matcher.step_char(cursor, JSON_ESCAPES[b]) if b != ord("u") else cursor
    elif isinstance(esc, str) and esc.startswith("u"):
        hexa += chr(b)
        if len(hexa) == 4:
            cp, hexa = int(hexa, 16), ""
            cursor = None if 0xD800 <= cp <= 0xDFFF else matcher.step_char(cursor, cp)
    elif b != ord("\\") or esc:
        cursor = matcher.step_byte(cursor, b)  # a byte of the text itself
    if cursor is None:
        return
    if nxt == "\\" or (isinstance(nxt, str) and nxt.startswith("u")):  # inside an escape: some character must be able to follow
        unit = 16 ** (4 - len(hexa)) if hexa else 0x10000
        lo = int(hexa, 16) * unit if hexa else 0
        if not matcher.takes_some(cursor[0], lo, lo + unit - 1):
            return
    out.append((*rest, ("s", node, count, nxt, cursor, hexa)))


def _advance(stack: tuple, b: int, out: list) -> None:
    """Add to `out` every stack that one more byte b can lead to from `stack`."""
    frame, rest = stack[-1], stack[:-1]
    kind = frame[0]
    if kind == "s":
        _string(rest, frame, b, out)
    elif kind == "n":
        _, node, part, text = frame
        nxt = _number_part(part, b, node)
        if nxt is not None:
            if node.bounded:
                text += chr(b)
            if not node.bounded or node.viable(text):
                out.append((*rest, ("n", node, nxt, text)))
        elif part in NUMBER_ENDS and rest and (not node.bounded or node.holds(text)):
            _advance(rest, b, out)  # the number ended: b is its container's
    elif kind == "l":
        _literal_step(rest, frame[1], b, out)
    elif kind == "k":
        _key(rest, frame, b, out)
    elif kind == "o":
        _object(rest, frame, b, out)
    elif kind == "a":
        _array(rest, frame, b, out)
    elif kind == "v" and b in WHITESPACE:
        out.append(stack)
    else:  # "v" or "r": a value starts (the root's first byte is the value's own)
        _start(rest, frame[1], b, out, set())


def step(state: tuple, b: int) -> tuple | None:
    """The state after one more byte, or None when no allowed answer starts with the text."""
    if len(state) == 1 and state[0]:  # fast path: a plain character inside a string leaves one state as it is
        frame = state[0][-1]
        if frame[0] == "s" and not frame[3] and 0x20 <= b < 0x80 and b != 0x22 and b != 0x5C and frame[1].plain:
            return state
    out: list = []
    for stack in state:
        if stack:
            _advance(stack, b, out)
    if not out:
        return None
    if len(out) == 1:
        return (out[0],)
    # overlapping options (anyOf of objects sharing fields, nested) could double the readings at
    # each level: past MAX_STACKS the first are followed; each is a valid prefix, so the answer stays valid
    return tuple(dict.fromkeys(out))[:MAX_STACKS]


def is_done(state: tuple) -> bool:
    """The answer is complete and nothing may follow it."""
    return all(not stack for stack in state)


def may_end(state: tuple) -> bool:
    """The answer could end here (a root number may also go on: its end is the model's to choose)."""
    return any(not s or (len(s) == 1 and _number_may_end(s[0])) for s in state)


def _number_may_end(frame: tuple) -> bool:
    return frame[0] == "n" and frame[2] in NUMBER_ENDS and (not frame[1].bounded or frame[1].holds(frame[3]))


def in_text(state: tuple) -> bool:
    """Inside a string or a key, where whitespace is the text's own (no cap on it)."""
    return all(stack and stack[-1][0] in ("s", "k") for stack in state)


def automaton(node: Any) -> Automaton:
    return Automaton(((("r", node),),), step, is_done, may_end, in_text=in_text)


def schema_automaton(schema: Any) -> Automaton:
    """The answers that are JSON documents valid under `schema` (a dict, or its JSON text)."""
    return automaton(compile_schema(schema))


def choice_automaton(choices: Sequence[str]) -> Automaton:
    """The answers that are exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    try:
        return automaton(literals(c.encode() for c in choices))
    except UnicodeEncodeError:
        raise ValueError("a choice holds a lone surrogate, which no UTF-8 answer can hold") from None


JSON_OBJECT = automaton(ANY_OBJECT)
