"""The nodes a JSON schema compiles to: what a value must be (an object's properties, an array's
items, a string's length, a number's bounds, literal texts as a trie, alternatives, references)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from cachedattention.engine.code_points import Conjunction

# -- nodes: what a value must be ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # identity hash: states hold nodes
class Obj:
    keys: dict[bytes, str]  # each property's name as written between its quotes -> the name
    props: dict[str, Any]  # name -> node
    required: frozenset[str]
    extra: Any  # the node of properties not listed, or None: not allowed
    min_props: int = 0  # minProperties
    max_props: int | None = None  # maxProperties

    @property
    def counts(self) -> bool:
        """Whether the properties written are counted (else states stay shared)."""
        return self.min_props > 0 or self.max_props is not None


@dataclass(frozen=True, eq=False)
class Arr:
    items: Any  # the node of the items after the prefix; None: none may follow it
    min_items: int = 0
    max_items: int | None = None
    prefix: tuple[Any, ...] = ()  # prefixItems: the first items' nodes, one each

    def item(self, index: int) -> Any:
        """The node of the item at `index` (None: no item may stand there)."""
        return self.prefix[index] if index < len(self.prefix) else self.items

    @property
    def counted(self) -> int:
        """How far the items are counted (past it, unbounded, the count no longer matters)."""
        return max(self.min_items, len(self.prefix))


@dataclass(frozen=True, eq=False)
class Str:
    min_len: int = 0
    max_len: int | None = None
    # with a pattern or a format: the string's characters (escapes decoded) go through this, which
    # also holds its length (engine/code_points.py)
    matcher: Conjunction | None = None

    @property
    def counts(self) -> bool:
        return self.min_len > 0 or self.max_len is not None

    @property
    def plain(self) -> bool:
        """Any string: no character is counted or checked."""
        return not self.counts and self.matcher is None


@dataclass(frozen=True, eq=False)
class Num:
    """A number, or an integer; bounded, the digits written so far are kept and each next one is
    allowed only if some number within the bounds starts so (no exponent then). Exact arithmetic
    (Fraction): a bound or a number of any length is never rounded."""

    integer: bool = False
    lo: Fraction | None = None  # None: no bound
    hi: Fraction | None = None
    lo_open: bool = False  # exclusiveMinimum: the bound itself is out
    hi_open: bool = False
    multiple: Fraction | None = None  # multipleOf (an integer's: the integer multiples' step)

    @property
    def bounded(self) -> bool:
        """Bounds or a multipleOf: the text is kept and each digit checked (no exponent then)."""
        return self.lo is not None or self.hi is not None or self.multiple is not None

    def holds(self, text: str) -> bool:
        """Whether the number written is within the bounds (and a multiple)."""
        v = Fraction(text)
        return self._meets((v, True, v, True), self.bounds())

    def viable(self, text: str) -> bool:
        """Whether some number within the bounds is written starting with `text` (a sign, digits, a
        point, digits). After "-" the magnitude x is what is written, within the bounds negated; x
        after digits p lies in [p, p+1), [10p, 10p+10), [100p, 100p+100), ...; after a point and k more
        digits v, in [v, v + 10^-k)."""
        negative = text.startswith("-")
        body = text[1:] if negative else text
        lo, lo_closed, hi, hi_closed = self.bounds()
        if negative:  # the magnitude's bounds
            lo, lo_closed, hi, hi_closed = (None if hi is None else -hi), hi_closed, (None if lo is None else -lo), lo_closed
        limits = (lo, lo_closed, hi, hi_closed)
        if not body:  # a sign alone: any magnitude
            return self._meets((Fraction(0), True, None, True), limits)
        if body == "0":  # nothing but a point may follow a leading 0
            return self._meets((Fraction(0), True, Fraction(0 if self.integer else 1), self.integer), limits)
        if "." in body:
            point = body.index(".")
            a = Fraction(body.rstrip("."))
            return self._meets((a, True, a + Fraction(1, 10 ** (len(body) - point - 1)), False), limits)
        p, d = int(body), len(body)
        # below lo's own number of digits, (p + 1) * 10^j <= lo: start where the spans may reach it
        j = max(0, len(str(math.floor(lo))) - d - 1) if lo is not None and lo > 0 else 0
        while True:
            a, b = p * 10**j, (p + 1) * 10**j
            span = (Fraction(a), True, Fraction(b - 1 if self.integer else b), self.integer)
            if self._meets(span, limits):
                return True
            if hi is not None and a > hi:  # the spans only grow past the upper bound
                return False
            j += 1

    def bounds(self) -> tuple:
        return (self.lo, not self.lo_open, self.hi, not self.hi_open)

    def _meets(self, span: tuple, limits: tuple) -> bool:
        """Whether some number of the span lies within the limits (and is a multiple). Multiples
        are symmetric around 0, so a magnitude's span and limits serve as well."""
        both = intersection(span, limits)
        if both is None or self.multiple is None:
            return both is not None
        low, low_closed, high, high_closed = both
        m = self.multiple
        first = None if low is None else math.floor(low / m) + 1 if not low_closed and (low / m).denominator == 1 else math.ceil(low / m)
        last = None if high is None else math.ceil(high / m) - 1 if not high_closed and (high / m).denominator == 1 else math.floor(high / m)
        return first is None or last is None or first <= last


def intersection(x: tuple, y: tuple) -> tuple | None:
    """The common part of two intervals (low, low closed, high, high closed; None: unbounded), or
    None when they share no point."""
    lows = [(v, c) for v, c in (x[:2], y[:2]) if v is not None]
    highs = [(v, c) for v, c in (x[2:], y[2:]) if v is not None]
    low = max(v for v, _ in lows) if lows else None
    high = min(v for v, _ in highs) if highs else None
    low_closed = all(c for v, c in lows if v == low)
    high_closed = all(c for v, c in highs if v == high)
    if low is not None and high is not None and not (low < high or (low == high and low_closed and high_closed)):
        return None
    return (low, low_closed, high, high_closed)


def intervals_meet(x: tuple, y: tuple) -> bool:
    """Whether two intervals (low, low closed, high, high closed; None: unbounded) share a point."""
    return intersection(x, y) is not None


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


LITERALS = {ord("t"): literals([b"true"]), ord("f"): literals([b"false"]), ord("n"): literals([b"null"])}
BOOLEAN = literals([b"true", b"false"])


def resolve(node: Any) -> Any:
    while isinstance(node, Ref):
        node = node.target
    return node
