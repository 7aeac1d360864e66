"""Structured answers: JSON that follows a schema (OpenAI's response_format json_schema, vLLM's
guided_json), any JSON object (json_object), or one of given strings (vLLM's guided_choice).

A schema compiles to a tree of nodes; a byte-level automaton follows the answer through it. A state
is the set of stacks of open values that the text so far can be in (more than one where the schema
offers alternatives: anyOf, a list of types, enums), all immutable tuples, so trying a token copies
nothing. Keywords that would constrain the answer but are not enforced are refused with the keyword
named, so a schema is never silently loosened; annotations (title, description, format, ...) pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from cachedattention.engine.guided import WHITESPACE, Automaton

HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ESCAPES = frozenset(b'"\\/bfnrt')
NUMBER_ENDS = frozenset(("0", "int", "frac", "exp"))  # number parts after which the number may end
ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "format", "discriminator", "$defs", "definitions", "strict",
                         "contentMediaType", "contentEncoding"))  # fmt: skip
NUMBER_BOUNDS = frozenset(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
KEYWORDS = {
    "object": frozenset(("properties", "required", "additionalProperties")),
    "array": frozenset(("items", "minItems", "maxItems")),
    "string": frozenset(("minLength", "maxLength")),
    "integer": NUMBER_BOUNDS, "number": NUMBER_BOUNDS, "boolean": frozenset(), "null": frozenset(),
}  # fmt: skip
MAX_SCHEMA_NODES = 10_000
MAX_STACKS = 32  # readings of the text followed at once


# -- nodes: what a value must be ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # identity hash: states hold nodes
class Obj:
    keys: dict[bytes, str]  # each property's name as written between its quotes -> the name
    props: dict[str, Any]  # name -> node
    required: frozenset[str]
    extra: Any  # the node of properties not listed, or None: not allowed


@dataclass(frozen=True, eq=False)
class Arr:
    items: Any
    min_items: int = 0
    max_items: int | None = None


@dataclass(frozen=True, eq=False)
class Str:
    min_len: int = 0
    max_len: int | None = None

    @property
    def counts(self) -> bool:
        return self.min_len > 0 or self.max_len is not None


@dataclass(frozen=True, eq=False)
class Num:
    """A number, or an integer; bounded, the digits written so far are kept and each next one is
    allowed only if some number within the bounds starts so (no exponent then)."""

    integer: bool = False
    lo: Decimal | None = None  # None: no bound
    hi: Decimal | None = None
    lo_open: bool = False  # exclusiveMinimum: the bound itself is out
    hi_open: bool = False

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None

    def holds(self, text: str) -> bool:
        """Whether the number written is within the bounds."""
        v = Decimal(text)
        return _overlap((v, True, v, True), self._bounds())

    def viable(self, text: str) -> bool:
        """Whether some number within the bounds is written starting with `text` (a sign, digits, a
        point, digits): after digits p, p itself, then [10p, 10p + 10), [100p, 100p + 100), ...;
        after a point and k more digits v, [v, v + 10^-k); negated after "-"."""
        negative = text.startswith("-")
        body = text[1:] if negative else text
        if "." in body or body == "0" or not body:
            if not body:  # a sign alone: anything <= 0 ("-0" is 0)
                a, b, b_closed = Decimal(0), None, True
            elif body == "0":  # nothing but a point may follow a leading 0
                a, b, b_closed = Decimal(0), Decimal(0 if self.integer else 1), self.integer
            else:
                point = body.index(".")
                a = Decimal(body.rstrip(".")) if point < len(body) - 1 else Decimal(body[:point])
                b, b_closed = a + Decimal(1).scaleb(-(len(body) - point - 1)), False
            return _overlap(_signed(a, True, b, b_closed, negative), self._bounds())
        p, scale = int(body), 1
        while True:
            a, b = Decimal(p * scale), Decimal((p + 1) * scale - (1 if self.integer else 0))
            span = _signed(a, True, b, self.integer, negative)
            if _overlap(span, self._bounds()):
                return True
            if (self.hi is not None and a > self.hi) if not negative else (self.lo is not None and -a < self.lo):
                return False  # past the bound on the side these numbers move to
            scale *= 10

    def _bounds(self) -> tuple:
        return (self.lo, not self.lo_open, self.hi, not self.hi_open)


def _signed(a: Decimal, a_closed: bool, b: Decimal | None, b_closed: bool, negative: bool) -> tuple:
    """The interval (low, closed, high, closed) of [a, b] (b None: no end), negated when negative."""
    return (None if b is None else -b, b_closed, -a, a_closed) if negative else (a, a_closed, b, b_closed)


def _overlap(x: tuple, y: tuple) -> bool:
    """Whether two intervals (low, low closed, high, high closed; None: unbounded) share a point."""
    lows = [(v, c) for v, c in (x[:2], y[:2]) if v is not None]
    highs = [(v, c) for v, c in (x[2:], y[2:]) if v is not None]
    if not lows or not highs:
        return True
    low = max(v for v, _ in lows)
    high = min(v for v, _ in highs)
    closed = all(c for v, c in lows if v == low) and all(c for v, c in highs if v == high)
    return low < high or (low == high and closed)


@dataclass(frozen=True, eq=False)
class Lit:
    """Exactly one of some byte strings (a const, an enum's values, true / false / null, a choice),
    as a trie: each node's next bytes, and whether a string ends there. An enum of a thousand values
    is one state, not a thousand."""

    next: dict[int, Lit]
    end: bool = False


@dataclass(frozen=True, eq=False)
class Union:
    options: tuple[Any, ...]


@dataclass(eq=False)
class Ref:
    """A $ref, pointing at its node once that is compiled (schemas may be recursive)."""

    pointer: str
    target: Any = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class AnyValue:
    """Any JSON value."""


ANY = AnyValue()
ANY_OBJECT = Obj({}, {}, frozenset(), ANY)
ANY_ARRAY = Arr(ANY)
ANY_STRING = Str()
NUMBER = Num()
INTEGER = Num(True)


def literals(texts: Iterable[bytes]) -> Lit:
    """The trie of non-empty byte strings (built without recursion: a const may be long)."""
    trie: dict[int, Any] = {}
    for text in texts:
        node = trie
        for b in text:
            node = node.setdefault(b, {})
        node[-1] = True  # a string ends here
    order, stack = [], [trie]
    while stack:  # parents before children; frozen in the reverse order
        node = stack.pop()
        order.append(node)
        stack.extend(v for k, v in node.items() if k != -1)
    frozen: dict[int, Lit] = {}
    for node in reversed(order):
        frozen[id(node)] = Lit({k: frozen[id(v)] for k, v in node.items() if k != -1}, -1 in node)
    return frozen[id(trie)]


def json_literals(values: Iterable[Any]) -> Lit:
    """Values written as json.dumps writes them (so an enum's 1.0 is "1.0", not "1")."""
    return literals(json.dumps(v, ensure_ascii=False, allow_nan=False).encode() for v in values)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":  # 1.0 is an integer too (written "1.0", as json.dumps writes it)
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "array": list}
    return value is None if kind == "null" else isinstance(value, types[kind])


LITERALS = {ord("t"): literals([b"true"]), ord("f"): literals([b"false"]), ord("n"): literals([b"null"])}
BOOLEAN = literals([b"true", b"false"])


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
# ("o", obj, seen names, phase, name) an object (phase: first, key, colon, after),
# ("k", obj, seen, key bytes, escape) a key, ("a", arr, count, phase) an array (first, after),
# ("s", str, count, escape) a string, ("n", num, part, text of a bounded integer) a number,
# ("l", trie node) the rest of a literal


def resolve(node: Any) -> Any:
    while isinstance(node, Ref):
        node = node.target
    return node


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
            out.append((*rest, ("s", node, 0, "")))
    elif isinstance(node, Num) and (b == ord("-") or b in DIGITS):
        text = chr(b) if node.bounded else ""  # only a bounded integer keeps its text (states stay shared)
        if not node.bounded or node.viable(text):
            out.append((*rest, ("n", node, "-" if b == ord("-") else "0" if b == ord("0") else "int", text)))
    elif isinstance(node, Lit):
        _literal_step(rest, node, b, out)


def _more_keys(obj: Obj, seen: frozenset[str]) -> bool:
    return obj.extra is not None or any(name not in seen for name in obj.props)


def _object(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, obj, seen, phase, name = frame
    if b in WHITESPACE:
        out.append((*rest, frame))
    elif phase in ("first", "key"):
        if b == ord('"') and _more_keys(obj, seen):
            out.append((*rest, ("k", obj, seen, b"", "")))
        elif b == ord("}") and phase == "first" and obj.required <= seen:
            out.append(rest)
    elif phase == "colon":
        if b == ord(":"):
            value = obj.props[name] if name is not None else obj.extra
            out.append((*rest, ("o", obj, seen, "after", None), ("v", value)))
    elif b == ord(","):  # after a value
        if _more_keys(obj, seen):
            out.append((*rest, ("o", obj, seen, "key", None)))
    elif b == ord("}") and obj.required <= seen:
        out.append(rest)


def _key(rest: tuple, frame: tuple, b: int, out: list) -> None:
    """A property's name: one of the listed ones not written yet, or (where the object allows
    others) any other string."""
    _, obj, seen, text, esc = frame
    if b == ord('"') and not esc:
        name = obj.keys.get(text)
        if name is not None:
            if name not in seen:
                out.append((*rest, ("o", obj, seen | {name}, "colon", name)))
        elif obj.extra is not None:
            out.append((*rest, ("o", obj, seen, "colon", None)))
        return
    nxt = _escape(esc, b)
    if nxt is None:
        return
    text += bytes((b,))
    listed = any(k.startswith(text) and n not in seen for k, n in obj.keys.items())
    # another key may not be escaped where properties are listed: "\\u0061" would be a listed "a"
    # under another schema
    other = obj.extra is not None and not (obj.keys and b"\\" in text)
    if listed or other:
        out.append((*rest, ("k", obj, seen, text if obj.keys else b"", nxt)))


def _array(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, arr, count, phase = frame
    if b in WHITESPACE:
        out.append((*rest, frame))
    elif phase == "first":
        if b == ord("]") and arr.min_items == 0:
            out.append(rest)
        elif arr.max_items != 0:
            _start((*rest, ("a", arr, 1, "after")), arr.items, b, out, set())
    elif b == ord(","):
        if arr.max_items is None or count < arr.max_items:
            counted = count + 1 if arr.max_items is not None or count < arr.min_items else count  # unbounded: stop counting
            out.append((*rest, ("a", arr, counted, "after"), ("v", arr.items)))
    elif b == ord("]") and count >= arr.min_items:
        out.append(rest)


def _string(rest: tuple, frame: tuple, b: int, out: list) -> None:
    _, node, count, esc = frame
    if b == ord('"') and not esc:
        if count >= node.min_len:
            out.append(rest)
        return
    nxt = _escape(esc, b)
    if nxt is None:
        return
    if node.counts and not esc:  # a character starts here
        count += 1
        if node.max_len is not None and count > node.max_len:
            return
        if node.max_len is None:  # only a minimum: past it, the count no longer matters
            count = min(count, node.min_len)
    out.append((*rest, ("s", node, count, nxt)))


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
        if frame[0] == "s" and not frame[3] and 0x20 <= b < 0x80 and b != 0x22 and b != 0x5C and not frame[1].counts:
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


def automaton(node: Any) -> Automaton:
    return Automaton(((("r", node),),), step, is_done, may_end)


def schema_automaton(schema: Any) -> Automaton:
    """The answers that are JSON documents valid under `schema` (a dict, or its JSON text)."""
    return automaton(compile_schema(schema))


def choice_automaton(choices: Sequence[str]) -> Automaton:
    """The answers that are exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    return automaton(literals(c.encode() for c in choices))


JSON_OBJECT = automaton(ANY_OBJECT)


# -- the compiler --------------------------------------------------------------------------------


def compile_schema(schema: Any) -> Any:
    """The node of a JSON schema (draft 2020-12 / OpenAPI subset): type (or a list of types), enum,
    const, anyOf / oneOf (held as anyOf), allOf of one schema, $ref within the document; objects'
    properties, required and additionalProperties (not allowed unless given, where properties are
    listed: OpenAI's strict mode); arrays' items, minItems, maxItems; strings' minLength, maxLength.
    Raises ValueError naming the place and keyword of anything else that constrains."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    try:
        compiler = _Compiler(schema)
        node = compiler.compile(schema, "schema")
    except RecursionError:
        raise ValueError("the JSON schema is nested too deeply") from None
    compiler.check_refs()
    return node


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Ref] = {}
        self.nodes = 0

    def compile(self, s: Any, where: str) -> Any:
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"the JSON schema has more than {MAX_SCHEMA_NODES} subschemas")
        if s is True:
            return ANY
        if s is False:
            raise ValueError(f"{where} is false: no value is allowed there")
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be a schema (an object), got {type(s).__name__}")
        for combinator in ("$ref", "const", "enum", "anyOf", "oneOf", "allOf"):
            if combinator in s:
                self._alone(s, combinator, where)
                return self._combinator(s, combinator, where)
        types = self._types(s, where)
        if types is None:  # no type: what the keywords describe, or anything
            types = ["object"] if "properties" in s or "additionalProperties" in s else ["array"] if "items" in s else None
            if types is None:
                self._alone(s, None, where)
                return ANY
        nodes = tuple(self._typed(s, t, where) for t in types)
        return nodes[0] if len(nodes) == 1 else Union(nodes)

    @staticmethod
    def _types(s: dict, where: str) -> list[str] | None:
        """The schema's type as a list of known type names (None: no type given)."""
        kind = s.get("type")
        if kind is None:
            return None
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in KEYWORDS for k in kinds):
            raise ValueError(f"{where}.type must be one of {', '.join(KEYWORDS)} (or a list of them), got {kind!r}")
        return list(dict.fromkeys(kinds))

    def check_refs(self) -> None:
        """A chain of $refs that only points at itself describes no value (checked once all are compiled)."""
        for pointer, ref in self.refs.items():
            seen, node = set(), ref
            while isinstance(node, Ref):
                if id(node) in seen:
                    raise ValueError(f"$ref {pointer!r} refers only to itself")
                seen.add(id(node))
                node = node.target

    def _alone(self, s: dict, keyword: str | None, where: str) -> None:
        """A combinator, or a schema without a type, with other constraints beside it is refused."""
        extra = set(s) - ANNOTATIONS - {keyword} - ({"type"} if keyword in ("const", "enum") else set())
        if extra:
            raise ValueError(f"{where}: {sorted(extra)[0]!r} beside {keyword or 'no type'} is not supported")

    def _combinator(self, s: dict, keyword: str, where: str) -> Any:
        v = s[keyword]
        if keyword == "$ref":
            return self._ref(v, where)
        if keyword == "const":
            return self._values(s, [v], where)
        if not isinstance(v, list) or not v:
            raise ValueError(f"{where}.{keyword} must be a non-empty list")
        if keyword == "enum":
            return self._values(s, v, where)
        if keyword == "allOf" and len(v) > 1:
            raise ValueError(f"{where}.allOf with more than one schema is not supported")
        options = tuple(self.compile(x, f"{where}.{keyword}[{i}]") for i, x in enumerate(v))
        return options[0] if len(options) == 1 else Union(options)

    def _values(self, s: dict, values: list, where: str) -> Lit:
        """An enum's or a const's values, those of the type beside them if one is given."""
        types = self._types(s, where)
        if types is not None:
            values = [v for v in values if any(_is_type(v, t) for t in types)]
            if not values:
                raise ValueError(f"{where}: no value of the enum or const is of type {s['type']!r}")
        try:
            return json_literals(values)
        except ValueError:  # NaN or Infinity: not JSON
            raise ValueError(f"{where}: an enum or const value is NaN or infinite, which JSON cannot write") from None

    def _ref(self, pointer: Any, where: str) -> Ref:
        if not isinstance(pointer, str) or not (pointer == "#" or pointer.startswith("#/")):
            raise ValueError(f"{where}.$ref must point inside the schema ('#/$defs/Name'), got {pointer!r}")
        if pointer in self.refs:
            return self.refs[pointer]
        ref = self.refs[pointer] = Ref(pointer)
        target: Any = self.root
        for part in pointer[2:].split("/") if pointer != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise ValueError(f"{where}.$ref {pointer!r} points at nothing in the schema")
        ref.target = self.compile(target, pointer)
        return ref

    def _typed(self, s: dict, kind: str, where: str) -> Any:
        for key in s:
            if key not in ANNOTATIONS and key != "type" and key not in KEYWORDS[kind]:
                if not any(key in kw for kw in KEYWORDS.values()):
                    raise ValueError(f"{where}: {key!r} is not supported (the answer could not be held to it)")
        if kind == "object":
            return self._object(s, where)
        if kind == "array":
            items = s.get("items", True)
            lo, hi = self._range(s, "minItems", "maxItems", where)
            return Arr(self.compile(items, f"{where}.items"), lo, hi)
        if kind == "string":
            lo, hi = self._range(s, "minLength", "maxLength", where)
            return Str(lo, hi) if lo or hi is not None else ANY_STRING
        if kind in ("integer", "number"):
            return self._number(s, kind == "integer", where)
        if kind == "boolean":
            return BOOLEAN
        return LITERALS[ord("n")]

    @staticmethod
    def _number(s: dict, integer: bool, where: str) -> Num:
        """A number's or an integer's bounds, from minimum, maximum, exclusiveMinimum, exclusiveMaximum
        (an integer's made inclusive: exclusiveMinimum 2.5 is minimum 3)."""
        given = {}
        for key in NUMBER_BOUNDS:
            v = s.get(key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"{where}.{key} must be a finite number, got {v!r}")
            if v is not None:
                given[key] = Decimal(str(v))
        if not given:
            return INTEGER if integer else NUMBER
        # the tighter of each pair; at a tie the exclusive one
        lows = [(v, k == "exclusiveMinimum") for k, v in given.items() if k in ("minimum", "exclusiveMinimum")]
        highs = [(v, k == "exclusiveMaximum") for k, v in given.items() if k in ("maximum", "exclusiveMaximum")]
        lo = max(lows, default=(None, False), key=lambda x: (x[0], x[1]))
        hi = min(highs, default=(None, False), key=lambda x: (x[0], not x[1]))
        if integer:  # inclusive integer bounds
            lo = (None if lo[0] is None else (lo[0].to_integral_value(ROUND_FLOOR) + 1 if lo[1] else lo[0].to_integral_value(ROUND_CEILING)), False)
            hi = (None if hi[0] is None else (hi[0].to_integral_value(ROUND_CEILING) - 1 if hi[1] else hi[0].to_integral_value(ROUND_FLOOR)), False)
        node = Num(integer, lo[0], hi[0], lo[1], hi[1])
        if lo[0] is not None and hi[0] is not None and not _overlap(node._bounds(), node._bounds()):
            raise ValueError(f"{where}: no {'integer' if integer else 'number'} lies within its bounds")
        return node

    def _range(self, s: dict, low: str, high: str, where: str) -> tuple[int, int | None]:
        for key in (low, high):
            v = s.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{where}.{key} must be an integer >= 0, got {v!r}")
        lo, hi = s.get(low) or 0, s.get(high)
        if hi is not None and lo > hi:
            raise ValueError(f"{where}: {low} {lo} is above {high} {hi}: no value is allowed there")
        return lo, hi

    def _object(self, s: dict, where: str) -> Obj:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties must be an object of schemas")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}.required must be a list of property names")
        extra_schema = s.get("additionalProperties", not props)  # listed properties: only those (strict)
        extra = None if extra_schema is False else self.compile(extra_schema, f"{where}.additionalProperties")
        missing = [r for r in required if r not in props]
        if missing:
            raise ValueError(f"{where}.required names {missing[0]!r}, which is not among the properties")
        nodes = {name: self.compile(p, f"{where}.properties.{name}") for name, p in props.items()}
        keys = {json.dumps(name, ensure_ascii=False)[1:-1].encode(): name for name in props}
        return Obj(keys, nodes, frozenset(required), extra)
