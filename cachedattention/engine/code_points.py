"""A recognizer over code points (a pattern, a grammar) read as UTF-8 bytes: the part of a guided
answer's automaton that turns bytes into characters.

A cursor is (the recognizer's state, the bytes of a character begun). A character's first bytes
are taken only if the recognizer can take some character that starts with them, so a token that
ends inside a character never leads where no token can go on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable

from cachedattention.engine.guided import Automaton

MEMO_WEIGHT = 1_000_000  # remembered steps, weighed by the states' sizes, before the memory starts over
LIVE_SEARCH = 4_000  # states a liveness search visits before it gives up (and takes the state as dead)
MAX_CODE_POINT = 0x10FFFF

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


class CodePointRecognizer(ABC):
    """What a recognizer over code points gives (its states hashable), and the UTF-8 reading and
    the Automaton built on it. Subclasses call `__init__` and set `start` (a cursor)."""

    start: tuple

    def __init__(self) -> None:
        self._steps: dict = {}
        self._spans: dict = {}
        self._weight = 0

    @abstractmethod
    def _char(self, states: Hashable, cp: int) -> Hashable | None:
        """The states after one character, or None when it cannot be taken (not remembered)."""

    @abstractmethod
    def _takes_some_now(self, states: Hashable, lo: int, hi: int) -> bool:
        """Whether some character in [lo, hi] can be taken (not remembered)."""

    @abstractmethod
    def accepting(self, states: Hashable) -> bool:
        """Whether the text so far is complete."""

    @abstractmethod
    def has_moves(self, states: Hashable) -> bool:
        """Whether any character may follow."""

    always_finishes = False  # every state reached can still finish (no dead ends to search for)

    @abstractmethod
    def move_ranges(self, states: Hashable) -> list[tuple]:
        """The character sets (tuples of ranges) of the moves from these states: within each piece
        of the code points that their ends cut, every character leads to the same states."""

    def _memos(self) -> list[dict]:
        return [self._steps, self._spans]

    def _remember(self, memo: dict, key: Hashable, value: object, weight: int | None = None) -> None:
        """Remember a step; past MEMO_WEIGHT (counted in states' elements, as large NFA state sets
        weigh kilobytes each, or as `weight` says) all memories start over."""
        if weight is None:
            weight = 1 + (len(value) if isinstance(value, (frozenset, tuple)) else 0)
        self._weight += weight
        if self._weight > MEMO_WEIGHT:
            for m in self._memos():
                m.clear()
            self._weight = 0
        memo[key] = value

    def char(self, states: Hashable, cp: int) -> Hashable | None:
        key = (states, cp)
        if key not in self._steps:
            self._remember(self._steps, key, self._char(states, cp))
        return self._steps[key]

    def takes_some(self, states: Hashable, lo: int, hi: int) -> bool:
        key = (states, lo, hi)
        if key not in self._spans:
            self._remember(self._spans, key, self._takes_some_now(states, lo, hi))
        return self._spans[key]

    def step_char(self, cursor: tuple, cp: int) -> tuple | None:
        """The cursor after a whole character (none begun)."""
        nxt = self.char(cursor[0], cp)
        return None if nxt is None else (nxt, b"")

    def step_byte(self, cursor: tuple, b: int) -> tuple | None:
        """The cursor after one byte of UTF-8 text, or None when the text can no longer be taken."""
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
        """The text so far is complete (and ends a character)."""
        return not cursor[1] and self.accepting(cursor[0])

    def final(self, cursor: tuple) -> bool:
        """The text is complete and nothing may follow it."""
        return self.matched(cursor) and not self.has_moves(cursor[0])

    def automaton(self) -> Automaton:
        """The answers taken whole."""
        return Automaton(self.start, self.step_byte, self.final, self.matched, max_whitespace=None)


class Conjunction(CodePointRecognizer):
    """Texts that every part takes whole (a JSON string's pattern and format), of a length within
    [min_len, max_len] characters. A step is kept only if a complete text can still be reached from
    it, so no prefix is a dead end: the parts may not agree, or the length may not allow one. (A
    lone part whose every state can finish, with no length, needs no search.)"""

    def __init__(self, parts: tuple[CodePointRecognizer, ...], min_len: int = 0, max_len: int | None = None,
                 nothing: str = "no text matches all of the string's pattern, format and length") -> None:  # fmt: skip
        """`nothing`: the ValueError's message where no text is taken."""
        super().__init__()
        self.parts, self.min_len, self.max_len = parts, min_len, max_len
        self._search = len(parts) > 1 or min_len > 0 or max_len is not None or not parts[0].always_finishes
        self._live: dict = {}
        self._signatures: dict = {}
        start = (tuple(p.start[0] for p in parts), 0)
        self._gave_up = False
        if not self._reachable(start):
            raise ValueError(nothing if not self._gave_up else f"{nothing}, or the search for one gave up after {LIVE_SEARCH} states")
        self.start = (start, b"")

    def _memos(self) -> list[dict]:
        return [self._steps, self._spans, self._live, self._signatures]

    def _raw_step(self, states: tuple, cp: int) -> tuple | None:
        parts, count = states
        count += 1
        if self.max_len is not None and count > self.max_len:
            return None
        nxt = []
        for part, st in zip(self.parts, parts):
            st = part.char(st, cp)
            if st is None:
                return None
            nxt.append(st)
        return (tuple(nxt), count if self.max_len is not None else min(count, self.min_len))

    def _representatives(self, parts: tuple, lo: int = 0, hi: int = MAX_CODE_POINT) -> list[int]:
        """One character of [lo, hi] for each different set of moves the parts can take together
        (characters in the same moves lead to the same states): a sweep over the moves' ranges, so a
        large class (\\W: hundreds of ranges) gives one character, not one per range."""
        key = (parts, lo, hi)
        if key in self._signatures:
            return self._signatures[key]
        events = []
        for i, (part, st) in enumerate(zip(self.parts, parts)):
            for j, ranges in enumerate(part.move_ranges(st)):
                for a, b in ranges:
                    if a <= hi and b >= lo:
                        events += [(max(a, lo), 1, i, j), (min(b, hi) + 1, -1, i, j)]
        events.sort()
        active: list[set[int]] = [set() for _ in self.parts]
        found: dict = {}
        for k, (pos, delta, i, j) in enumerate(events):
            (active[i].add if delta > 0 else active[i].discard)(j)
            if k + 1 < len(events) and events[k + 1][0] == pos:
                continue  # the signature once every event at this point is applied
            signature = tuple(frozenset(a) for a in active)
            if pos <= hi and all(signature) and signature not in found:
                found[signature] = pos
        reps = list(found.values())
        self._remember(self._signatures, key, reps)
        return reps

    def _reachable(self, states: tuple) -> bool:
        """Whether a complete text can be reached (breadth first, up to LIVE_SEARCH states; every
        state on the path found is remembered as live too)."""
        if not self._search:
            return True
        if states in self._live:
            return self._live[states]
        parent: dict = {states: None}
        frontier, found = [states], None
        while frontier and found is None and len(parent) < LIVE_SEARCH:
            nxt = []
            for st in frontier:
                if self.accepting(st) or self._live.get(st):
                    found = st
                    break
                for cp in self._representatives(st[0]):
                    after = self._raw_step(st, cp)
                    if after is not None and after not in parent and self._live.get(after) is not False:
                        parent[after] = st
                        nxt.append(after)
            frontier = nxt
        if found is None:  # none, or too large to tell: taken as dead (a state on a path found is
            # kept, so a kept prefix always has a way on)
            self._gave_up = self._gave_up or len(parent) >= LIVE_SEARCH
            self._remember(self._live, states, False)
            return False
        while found is not None:
            self._remember(self._live, found, True)
            found = parent[found]
        return True

    def _char(self, states: Hashable, cp: int) -> Hashable | None:
        after = self._raw_step(states, cp)
        return after if after is not None and self._reachable(after) else None

    def _takes_some_now(self, states: Hashable, lo: int, hi: int) -> bool:
        return any(self.char(states, cp) is not None for cp in self._representatives(states[0], lo, hi))

    def accepting(self, states: Hashable) -> bool:
        parts, count = states
        return count >= self.min_len and all(p.accepting(st) for p, st in zip(self.parts, parts))

    def has_moves(self, states: Hashable) -> bool:
        return self._takes_some_now(states, 0, MAX_CODE_POINT)

    def move_ranges(self, states: Hashable) -> list[tuple]:
        return [r for part, st in zip(self.parts, states[0]) for r in part.move_ranges(st)]
