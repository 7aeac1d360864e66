"""A JSON schema (draft 2020-12 / OpenAPI subset) compiled to nodes; whatever would constrain the
answer but is not enforced is refused with its place and keyword named."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

from cachedattention.engine.code_points import Conjunction
from cachedattention.engine.regex import Regex
from cachedattention.engine.schema_nodes import (
    ANY,
    ANY_STRING,
    BOOLEAN,
    INTEGER,
    LITERALS,
    NUMBER,
    Arr,
    Lit,
    Num,
    Obj,
    Ref,
    Str,
    Union,
    json_literals,
)  # fmt: skip
from cachedattention.engine.string_formats import FORMATS

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "format", "discriminator", "$defs", "definitions", "strict",
                         "contentMediaType", "contentEncoding"))  # fmt: skip
NUMBER_BOUNDS = frozenset(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"))
KEYWORDS = {
    "object": frozenset(("properties", "required", "additionalProperties", "minProperties", "maxProperties")),
    "array": frozenset(("items", "prefixItems", "additionalItems", "minItems", "maxItems")),
    "string": frozenset(("minLength", "maxLength", "pattern")),
    "integer": NUMBER_BOUNDS, "number": NUMBER_BOUNDS, "boolean": frozenset(), "null": frozenset(),
}  # fmt: skip
MAX_SCHEMA_NODES = 10_000


def compile_schema(schema: Any) -> Any:
    """The node of a JSON schema (draft 2020-12 / OpenAPI subset): type (or a list of types), enum,
    const, anyOf / oneOf (held as anyOf), allOf of one schema, $ref within the document; objects'
    properties, required and additionalProperties (not allowed unless given, where properties are
    listed: OpenAI's strict mode), minProperties, maxProperties; arrays' prefixItems (or draft 7's
    list of items), items (additionalItems), minItems, maxItems; strings' minLength, maxLength,
    pattern and the formats of engine/string_formats.py; numbers' bounds and multipleOf.
    Raises ValueError naming the place and keyword of anything else that constrains."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply") from None
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
        except UnicodeError:  # (a ValueError too) a lone surrogate: no UTF-8 answer can hold it
            raise ValueError(f"{where}: an enum or const string holds a lone surrogate, which UTF-8 cannot write") from None
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
            return self._array(s, where)
        if kind == "string":
            lo, hi = self._range(s, "minLength", "maxLength", where)
            patterns = self._patterns(s, where)
            if patterns:
                try:
                    return Str(lo, hi, Conjunction(patterns, lo, hi))
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            return Str(lo, hi) if lo or hi is not None else ANY_STRING
        if kind in ("integer", "number"):
            return self._number(s, kind == "integer", where)
        if kind == "boolean":
            return BOOLEAN
        return LITERALS[ord("n")]

    def _array(self, s: dict, where: str) -> Arr:
        """An array: prefixItems (or draft 7's list of items) one by one, then items (or draft 7's
        additionalItems); false there: no more items."""
        lo, hi = self._range(s, "minItems", "maxItems", where)
        items, rest_key = s.get("items", True), "items"
        prefix_key = "prefixItems"
        if isinstance(items, list):  # draft 7's tuple
            prefix_key, rest_key = "items", "additionalItems"
            prefix, items = items, s.get("additionalItems", True)
        else:
            prefix = s.get("prefixItems", [])
            if not isinstance(prefix, list):
                raise ValueError(f"{where}.prefixItems must be a list of schemas")
        nodes = tuple(self.compile(x, f"{where}.{prefix_key}[{i}]") for i, x in enumerate(prefix))
        node = None if items is False else self.compile(items, f"{where}.{rest_key}")
        most = len(nodes) if node is None else None  # no items past the prefix: at most its length
        if most is not None and lo > most:
            raise ValueError(f"{where}: minItems {lo} is above the {most} items that may stand there")
        hi = most if hi is None else hi if most is None else min(hi, most)
        return Arr(node, lo, hi, nodes)

    @staticmethod
    def _number(s: dict, integer: bool, where: str) -> Num:
        """A number's or an integer's bounds, from minimum, maximum, exclusiveMinimum, exclusiveMaximum
        (an integer's made inclusive: exclusiveMinimum 2.5 is minimum 3), and multipleOf."""
        given = {}
        for key in NUMBER_BOUNDS:
            v = s.get(key)
            # (an int is finite however long: math.isfinite would overflow past a float's range)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)):
                raise ValueError(f"{where}.{key} must be a finite number, got {v!r}")
            if v is not None:
                given[key] = Fraction(Decimal(str(v)))  # exactly the number as JSON wrote it
        if not given:
            return INTEGER if integer else NUMBER
        # the tighter of each pair; at a tie the exclusive one
        lows = [(v, k == "exclusiveMinimum") for k, v in given.items() if k in ("minimum", "exclusiveMinimum")]
        highs = [(v, k == "exclusiveMaximum") for k, v in given.items() if k in ("maximum", "exclusiveMaximum")]
        lo = max(lows, default=(None, False), key=lambda x: (x[0], x[1]))
        hi = min(highs, default=(None, False), key=lambda x: (x[0], not x[1]))
        multiple = given.get("multipleOf")
        if multiple is not None and multiple <= 0:
            raise ValueError(f"{where}.multipleOf must be a number > 0, got {s['multipleOf']!r}")
        if integer:  # inclusive integer bounds; the integer multiples of p/q are those of p
            lo = (None if lo[0] is None else Fraction(math.floor(lo[0]) + 1 if lo[1] else math.ceil(lo[0])), False)
            hi = (None if hi[0] is None else Fraction(math.ceil(hi[0]) - 1 if hi[1] else math.floor(hi[0])), False)
            multiple = None if multiple is None else Fraction(multiple.numerator)
        node = Num(integer, lo[0], hi[0], lo[1], hi[1], multiple)
        if not (node.viable("") or node.viable("-")):  # neither a number >= 0 nor one below
            raise ValueError(f"{where}: no {'integer' if integer else 'number'} lies within its bounds"
                             + (" that is a multiple of its multipleOf" if multiple is not None else ""))  # fmt: skip
        return node

    @staticmethod
    def _patterns(s: dict, where: str) -> tuple[Regex, ...]:
        """A string's pattern (a match anywhere in it, as JSON schema says, unless anchored) and its
        format's, where the format is one held to (engine/string_formats.py)."""
        out = []
        pattern = s.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"{where}.pattern must be a string, got {type(pattern).__name__}")
            try:
                out.append(Regex(pattern, search=True))
            except ValueError as e:
                raise ValueError(f"{where}.pattern: {e}") from None
        fmt = s.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise ValueError(f"{where}.format must be a string, got {type(fmt).__name__}")
        if fmt in FORMATS:
            out.append(Regex(FORMATS[fmt]))
        return tuple(out)

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
        lo, hi = self._range(s, "minProperties", "maxProperties", where)
        required = list(dict.fromkeys(required))
        if hi is not None and len(required) > hi:
            raise ValueError(f"{where}: {len(required)} required properties are above maxProperties {hi}")
        if extra is None and lo > len(props):
            raise ValueError(f"{where}: minProperties {lo} is above the {len(props)} properties allowed")
        return Obj(keys, nodes, frozenset(required), extra, lo, hi)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":  # 1.0 is an integer too (written "1.0", as json.dumps writes it)
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "array": list}
    return value is None if kind == "null" else isinstance(value, types[kind])
