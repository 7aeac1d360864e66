"""A regular expression as a byte-level automaton: vLLM's guided_regex (the whole answer matches)
and JSON schema's `pattern` (the string contains a match, unless anchored).

The pattern's tree (engine/regex_parse.py) becomes a Thompson NFA over code points; its sets of
states are found as they are reached (a lazy DFA, each step remembered), so an answer costs a dict
lookup per character. Bytes are read as UTF-8: a character's first bytes are allowed only if the
pattern can take some character that starts with them.
"""

from __future__ import annotations

from collections.abc import Hashable

from cachedattention.engine.code_points import CodePointRecognizer, Conjunction
from cachedattention.engine.guided import Automaton
from cachedattention.engine.regex_parse import contains, meets, negate, parse

MAX_NFA_STATES = 20_000
ANY_CHAR = negate(())  # every character

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

    def finishing(self, accept: int) -> set[int]:
        """The states from which the accept state can be reached (by moves on sets that hold some
        character)."""
        back: list[list[int]] = [[] for _ in self.eps]
        for s, targets in enumerate(self.eps):
            for t in targets:
                back[t].append(s)
        for s, moves in enumerate(self.moves):
            for ranges, t in moves:
                if ranges:
                    back[t].append(s)
        seen, todo = {accept}, [accept]
        while todo:
            for s in back[todo.pop()]:
                if s not in seen:
                    seen.add(s)
                    todo.append(s)
        return seen

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


class Regex(CodePointRecognizer):
    """A compiled pattern; a cursor's states are the set of NFA states reached, less those that
    cannot reach the end (a class that holds nothing): every state set reached can finish."""

    always_finishes = True

    def __init__(self, pattern: str, search: bool = False) -> None:
        super().__init__()
        self.pattern, self.search = pattern, search
        self._nfa = _NFA()
        try:
            first, self._accept = self._nfa.build(_strip_anchors(parse(pattern), search))
        except RecursionError:
            raise ValueError(f"the pattern {pattern!r} is nested too deeply") from None
        self._interned: dict = {}  # one object per state set: less memory, and equal ones are identical
        self._finishing = self._nfa.finishing(self._accept)
        start = self._closure([first])
        if not start:
            raise ValueError(f"the pattern {pattern!r} matches no text")
        self.start = (start, b"")

    def _memos(self) -> list[dict]:
        return [*super()._memos(), self._interned]

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r}, search={self.search})"

    def _closure(self, states: list[int]) -> frozenset[int]:
        """The states reachable by epsilon moves that matter: those with moves, and the accept state."""
        seen, todo = set(states), list(states)
        while todo:
            for t in self._nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        states = frozenset(s for s in seen if (self._nfa.moves[s] or s == self._accept) and s in self._finishing)
        if states not in self._interned:
            self._remember(self._interned, states, states)
        return self._interned[states]

    def _char(self, states: Hashable, cp: int) -> frozenset[int] | None:
        targets = [t for s in states for ranges, t in self._nfa.moves[s] if contains(ranges, cp)]
        return (self._closure(targets) or None) if targets else None

    def _takes_some_now(self, states: Hashable, lo: int, hi: int) -> bool:
        return any(meets(ranges, lo, hi) for s in states for ranges, _ in self._nfa.moves[s])

    def accepting(self, states: Hashable) -> bool:
        return self._accept in states

    def has_moves(self, states: Hashable) -> bool:
        return any(self._nfa.moves[s] for s in states)

    def move_ranges(self, states: Hashable) -> list[tuple]:
        return [ranges for s in states for ranges, _ in self._nfa.moves[s]]


def regex_automaton(pattern: str) -> Automaton:
    """The answers that `pattern` matches whole (vLLM's guided_regex); a prefix is kept only if some
    answer goes on from it (a class that holds nothing can make a branch a dead end)."""
    return Conjunction((Regex(pattern),), nothing=f"the pattern {pattern!r} matches no text").automaton()
