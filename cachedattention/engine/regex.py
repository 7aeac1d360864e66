"""A regular expression as a byte-level automaton: vLLM's guided_regex (the whole answer matches)
and JSON schema's `pattern` (the string contains a match, unless anchored).

The pattern's tree (engine/regex_parse.py) becomes a Thompson NFA over code points; its sets of
states are found as they are reached (a lazy DFA, each step remembered), so an answer costs a dict
lookup per character. Bytes are read as UTF-8: a character's first bytes are allowed only if the
pattern can take some character that starts with them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from cachedattention.engine.guided import Automaton
from cachedattention.engine.regex_parse import ANY_BUT_LINE_END, MAX_CODE_POINT, parse, union

MAX_NFA_STATES = 20_000
MEMO_STEPS = 100_000  # remembered steps before the memory starts over
ANY_CHAR = union(ANY_BUT_LINE_END, ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)))

# a UTF-8 lead byte -> (its character's length, the range of the byte after it)
UTF8_LEADS = {
    **{b: (2, (0x80, 0xBF)) for b in range(0xC2, 0xE0)},
    0xE0: (3, (0xA0, 0xBF)), 0xED: (3, (0x80, 0x9F)),
    **{b: (3, (0x80, 0xBF)) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xF0: (4, (0x90, 0xBF)), 0xF4: (4, (0x80, 0x8F)),
    **{b: (4, (0x80, 0xBF)) for b in range(0xF1, 0xF4)},
}  # fmt: skip


def utf8_span(prefix: bytes) -> tuple[int, int] | None:
    """The lowest and highest code points whose UTF-8 starts with `prefix` (a lead byte and some
    continuation bytes), or None when no valid character does."""
    lead = UTF8_LEADS.get(prefix[0])
    if lead is None or len(prefix) >= lead[0]:
        return None
    size, (lo2, hi2) = lead
    for i, b in enumerate(prefix[1:], 1):
        lo, hi = (lo2, hi2) if i == 1 else (0x80, 0xBF)
        if not lo <= b <= hi:
            return None
    low = prefix + bytes([lo2] if len(prefix) == 1 else []) + b"\x80" * (size - max(len(prefix), 2))
    high = prefix + bytes([hi2] if len(prefix) == 1 else []) + b"\xbf" * (size - max(len(prefix), 2))
    return ord(low.decode()), ord(high.decode())


class _NFA:
    """Thompson's construction: each state has epsilon moves and moves on a set of characters."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[tuple, int]]] = []

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"the pattern is too large (more than {MAX_NFA_STATES} states)")
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        """A fragment (start, accept) for a tree node."""
        kind = node[0]
        start = self.new()
        if kind == "set":
            end = self.new()
            if node[1]:
                self.moves[start].append((node[1], end))
            return start, end
        if kind == "cat":
            end = start
            for child in node[1]:
                s, e = self.build(child)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            end = self.new()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        if kind == "rep":
            return self._repeat(start, node[1], node[2], node[3])
        raise ValueError("anchors (^, $) are only supported at the start and end of the pattern")

    def _repeat(self, start: int, child: tuple, low: int, high: int | None) -> tuple[int, int]:
        end = start
        for _ in range(low):
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        if high is None:  # a loop: child as often as wanted
            s, e = self.build(child)
            self.eps[end].append(s)
            self.eps[e].append(s)
            out = self.new()
            self.eps[end].append(out)
            self.eps[e].append(out)
            return start, out
        out = self.new()
        for _ in range(high - low):  # each optional copy may be the last
            self.eps[end].append(out)
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        self.eps[end].append(out)
        return start, out


def _strip_anchors(tree: tuple, search: bool) -> tuple:
    """The pattern as a whole-answer match: each alternative's leading ^ and trailing $ taken off;
    where one is missing and `search` (JSON schema's pattern: a match anywhere in the string), any
    text may stand on that side."""
    options = tree[1] if tree[0] == "alt" else (tree,)
    anything = ("rep", ("set", ANY_CHAR), 0, None)
    out = []
    for option in options:
        items = list(option[1]) if option[0] == "cat" else [option]
        head = bool(items) and items[0] == ("bol",)
        items = items[1:] if head else items
        tail = bool(items) and items[-1] == ("eol",)
        items = items[:-1] if tail else items
        if search:
            items = ([] if head else [anything]) + items + ([] if tail else [anything])
        out.append(("cat", tuple(items)))
    return out[0] if len(out) == 1 else ("alt", tuple(out))


@dataclass(eq=False)
class Regex:
    """A compiled pattern. A cursor (its state) is (set of NFA states, bytes of a character begun)."""

    pattern: str
    search: bool = False
    _nfa: _NFA = field(init=False, repr=False)
    _accept: int = field(init=False, repr=False)
    _steps: dict = field(init=False, repr=False, default_factory=dict)
    _spans: dict = field(init=False, repr=False, default_factory=dict)
    start: tuple = field(init=False)

    def __post_init__(self) -> None:
        self._nfa = _NFA()
        first, self._accept = self._nfa.build(_strip_anchors(parse(self.pattern), self.search))
        self.start = (self._closure([first]), b"")

    def _closure(self, states: list[int]) -> frozenset[int]:
        """The states reachable by epsilon moves that matter: those with moves, and the accept state."""
        seen, todo = set(states), list(states)
        while todo:
            for t in self._nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(s for s in seen if self._nfa.moves[s] or s == self._accept)

    def _remember(self, memo: dict, key: tuple, value: object) -> None:
        if len(memo) >= MEMO_STEPS:
            memo.clear()
        memo[key] = value

    def char(self, states: frozenset[int], cp: int) -> frozenset[int] | None:
        """The states after one character, or None when the pattern cannot take it."""
        key = (states, cp)
        if key in self._steps:
            return self._steps[key]
        targets = [t for s in states for ranges, t in self._nfa.moves[s] if _contains(ranges, cp)]
        nxt = self._closure(targets) if targets else None
        self._remember(self._steps, key, nxt)
        return nxt

    def takes_some(self, states: frozenset[int], lo: int, hi: int) -> bool:
        """Whether the pattern can take some character in [lo, hi] now."""
        key = (states, lo, hi)
        if key not in self._spans:
            meets = any(_meets(ranges, lo, hi) for s in states for ranges, _ in self._nfa.moves[s])
            self._remember(self._spans, key, meets)
        return self._spans[key]

    def step_char(self, cursor: tuple, cp: int) -> tuple | None:
        """The cursor after a whole character (none begun)."""
        nxt = self.char(cursor[0], cp)
        return None if nxt is None else (nxt, b"")

    def step_byte(self, cursor: tuple, b: int) -> tuple | None:
        """The cursor after one byte of UTF-8 text, or None when the text can no longer match."""
        states, begun = cursor
        if not begun and b < 0x80:
            return self.step_char(cursor, b)
        data = begun + bytes((b,))
        if begun and len(data) == UTF8_LEADS[data[0]][0]:  # the character is whole
            try:
                return self.step_char(cursor, ord(data.decode()))
            except UnicodeDecodeError:  # overlong, a surrogate, or not a continuation byte
                return None
        span = utf8_span(data)
        return None if span is None or not self.takes_some(states, *span) else (states, data)

    def matched(self, cursor: tuple) -> bool:
        """The text so far matches (and ends a character)."""
        return not cursor[1] and self._accept in cursor[0]

    def final(self, cursor: tuple) -> bool:
        """The text matches and nothing may follow it."""
        return self.matched(cursor) and not any(self._nfa.moves[s] for s in cursor[0])

    def automaton(self) -> Automaton:
        """The answers the pattern matches whole."""
        return Automaton(self.start, self.step_byte, self.final, self.matched)


def _contains(ranges: tuple, cp: int) -> bool:
    i = bisect.bisect_right(ranges, (cp, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


def _meets(ranges: tuple, lo: int, hi: int) -> bool:
    i = bisect.bisect_right(ranges, (lo, MAX_CODE_POINT + 1)) - 1
    if i >= 0 and ranges[i][1] >= lo:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] <= hi


def regex_automaton(pattern: str) -> Automaton:
    """The answers that `pattern` matches whole (vLLM's guided_regex)."""
    return Regex(pattern).automaton()
