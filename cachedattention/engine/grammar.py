"""vLLM's guided_grammar: an answer held to a context-free grammar written in GBNF, the EBNF of
llama.cpp and xgrammar: `root ::= ...` rules of quoted strings, character classes ([a-z], [^"]),
`.`, rule names, groups, `|`, and `* + ? {m} {m,} {m,n}`; `#` comments.

The rules compile to alternatives of symbols (groups and repetitions become rules of their own).
The answer is followed as a pushdown automaton: a state is a set of stacks of the symbols still to
match, each expanded until a character set is on top; the answer is complete where a stack is
empty. Left-recursive rules (which such an expansion would never finish) are refused.
"""

from __future__ import annotations

from collections.abc import Hashable

from cachedattention.engine.code_points import CodePointRecognizer
from cachedattention.engine.guided import Automaton
from cachedattention.engine.regex_parse import ANY_BUT_LINE_END, PatternParser, contains, meets

MAX_STACKS = 64  # readings of the text followed at once
MAX_SYMBOLS = 50_000
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# a symbol: a str (a rule's name) or a tuple of code point ranges (one character of the set)


class _GrammarParser(PatternParser):
    def __init__(self, text: str) -> None:
        super().__init__(text, kind="grammar")
        self.rules: dict[str, list[tuple]] = {}  # name -> alternatives (tuples of symbols)
        self.used: dict[str, int] = {}  # each name referenced -> where first (for errors)
        self.symbols = 0

    def error(self, what: str) -> ValueError:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        return ValueError(f"{what} at line {line}, column {column} of the grammar")

    def space(self) -> None:
        """Skip whitespace and comments (# to the end of the line)."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif c.isspace():
                self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in NAME_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def rule_starts(self) -> bool:
        """Whether `name ::=` begins here (the next rule: GBNF rules end where the next begins)."""
        start = self.pos
        found = bool(self.name())
        self.space()
        found = found and self.peek(3) == "::="
        self.pos = start
        return found

    def grammar(self) -> dict[str, list[tuple]]:
        self.space()
        if self.pos >= len(self.text):
            raise self.error("the grammar is empty")
        while self.pos < len(self.text):
            name = self.name()
            if not name:
                raise self.error("a rule's name (letters, digits, - and _) was expected")
            self.space()
            if self.peek(3) != "::=":
                raise self.error(f"'::=' was expected after the rule name {name!r}")
            self.pos += 3
            if name in self.rules:
                raise self.error(f"the rule {name!r} is defined twice")
            self.rules[name] = self.alternatives(0)
            self.space()
            if self.pos < len(self.text) and self.peek() == ")":
                raise self.error("unbalanced parenthesis")
        if "root" not in self.rules:
            raise ValueError("the grammar has no 'root' rule (the answer is a root)")
        for name, where in self.used.items():
            if name not in self.rules:
                self.pos = where
                raise self.error(f"the rule {name!r} is used but not defined")
        return self.rules

    def alternatives(self, depth: int) -> list[tuple]:
        options = [self.sequence(depth)]
        self.space()
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence(depth))
            self.space()
        return options

    def sequence(self, depth: int) -> tuple:
        items: list = []
        while True:
            self.space()
            if self.pos >= len(self.text) or self.peek() in "|)" or self.rule_starts():
                return tuple(items)
            items.extend(self.repeated(self.primary(depth)))
            if len(items) > MAX_SYMBOLS:
                raise self.error("the grammar is too large")

    def primary(self, depth: int) -> tuple:
        """A sequence of symbols: a string's characters, a class, a rule name or a group's rule."""
        c = self.take()
        if c == '"':
            chars = []
            while (c := self.take()) != '"':
                chars.append(self.escape(in_class=True)[1] if c == "\\" else ((self._code_point(c),) * 2,))
            return tuple(chars)
        if c == "[":
            return (self.char_class(),)
        if c == ".":
            return (ANY_BUT_LINE_END,)
        if c == "(":
            if depth > 100:
                raise self.error("groups are nested too deeply")
            options = self.alternatives(depth + 1)
            if self.peek() != ")":
                raise self.error("a group is not closed")
            self.pos += 1
            return options[0] if len(options) == 1 else (self.helper(options),)
        self.pos -= 1
        name = self.name()
        if not name:
            raise self.error(f"unexpected {c!r}")
        self.used.setdefault(name, self.pos - len(name))
        return (name,)

    def repeated(self, item: tuple) -> tuple:
        """The item with its quantifier (if any) applied, as symbols."""
        bounds = self.quantifier()
        if bounds is None:
            return item
        low, high = bounds
        self.symbols += len(item) * max(low, high or 1)
        if self.symbols > MAX_SYMBOLS:
            raise self.error("the grammar is too large")
        if high is None:  # item* : a rule that takes one more item, or ends
            loop = self.helper([])
            self.rules[loop].extend([(*item, loop), ()])
            return item * low + (loop,)
        tail: tuple = ()
        for _ in range(high - low):  # each optional copy may be the last
            tail = (self.helper([(*item, *tail), ()]),)
        return item * low + tail

    def helper(self, options: list[tuple]) -> str:
        """A rule of its own for a group or a repetition (names no rule of the grammar can have)."""
        name = f" {len(self.rules)}"
        self.rules[name] = options
        return name


def _left_recursive(rules: dict[str, list[tuple]]) -> str | None:
    """A rule that can begin with itself with symbols left behind it (its expansion would grow for
    ever), or None. Rules that may match nothing are seen through; a rule that only comes back to
    itself alone (a repetition of something that may be empty) is harmless."""
    nullable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, options in rules.items():
            if name not in nullable and any(all(isinstance(s, str) and s in nullable for s in o) for o in options):
                nullable.add(name)
                changed = True
    # name -> (a rule it may begin with, whether symbols may be left after that one)
    starts: dict[str, set[tuple[str, bool]]] = {name: set() for name in rules}
    for name, options in rules.items():
        for option in options:
            for i, symbol in enumerate(option):
                if not isinstance(symbol, str):
                    break
                starts[name].add((symbol, any(not (isinstance(t, str) and t in nullable) for t in option[i + 1 :])
                                  or len(option) > i + 1))  # fmt: skip
                if symbol not in nullable:
                    break
    for name in rules:  # a path back to the rule with something left on the way
        seen: set[tuple[str, bool]] = set()
        todo = list(starts[name])
        while todo:
            nxt, left = todo.pop()
            if nxt == name and left:
                return name
            if (nxt, left) not in seen:
                seen.add((nxt, left))
                todo.extend((after, left or more) for after, more in starts[nxt])
    return None


def _finishing(rules: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """The rules with only the alternatives that can finish (derive some text): every stack made
    of what is left can be completed, so no prefix the automaton keeps is a dead end."""
    done: set[str] = set()

    def finishes(option: tuple) -> bool:
        return all(s in done if isinstance(s, str) else bool(s) for s in option)

    changed = True
    while changed:
        changed = False
        for name, options in rules.items():
            if name not in done and any(finishes(o) for o in options):
                done.add(name)
                changed = True
    return {name: [o for o in options if finishes(o)] for name, options in rules.items()}


class Grammar(CodePointRecognizer):
    """A compiled GBNF grammar. A cursor's states are a tuple of stacks; a stack is a tuple of frames
    (alternative, position of its next symbol), innermost last, whose top frame is at a character
    set, or empty (complete). A frame at its alternative's last symbol is dropped when that symbol's
    rule is entered (a tail call), so a repetition does not grow the stack, nor does a long
    alternative: the depth is the nesting's."""

    always_finishes = True  # every frame's symbols can finish

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise ValueError(f"a grammar must be a string (GBNF), got {type(text).__name__}")
        try:
            rules = _GrammarParser(text).grammar()
        except RecursionError:
            raise ValueError("the grammar is nested too deeply") from None
        looped = _left_recursive(rules)
        if looped is not None:
            shown = f"the rule {looped!r}" if not looped.startswith(" ") else "a group or repetition"
            raise ValueError(f"{shown} is left-recursive (it can begin with itself): write it with * or +")
        super().__init__()
        rules = _finishing(rules)
        if not rules["root"]:
            raise ValueError("the grammar matches nothing: its root never finishes (each alternative needs itself, or a class holds nothing)")
        self._alternatives: list[tuple] = []  # every rule's alternatives, by number
        self._rules: dict[str, list[int]] = {}  # a rule -> its alternatives' numbers
        for name, options in rules.items():
            self._rules[name] = list(range(len(self._alternatives), len(self._alternatives) + len(options)))
            self._alternatives.extend(options)
        self._expanded: dict = {}
        self.start = (self._expand(self._enter((), "root")), b"")

    def _enter(self, rest: tuple, rule: str) -> tuple:
        """The stacks that begin each alternative of `rule` on top of `rest` (not yet expanded)."""
        return tuple(rest + ((a, 0),) if self._alternatives[a] else rest for a in self._rules[rule])

    def _top(self, stack: tuple) -> object:
        a, i = stack[-1]
        return self._alternatives[a][i]

    def _after_top(self, stack: tuple) -> tuple:
        """The stack once its top symbol is matched: the frame moves on, or ends."""
        a, i = stack[-1]
        return stack[:-1] + ((a, i + 1),) if i + 1 < len(self._alternatives[a]) else stack[:-1]

    def _expand(self, stacks: tuple) -> tuple:
        """Each stack expanded until a character set is on top (or it is empty), at most MAX_STACKS."""
        out: dict = {}
        for stack in stacks:
            for s in self._expand_one(stack):
                out[s] = None
        return tuple(out)[:MAX_STACKS]

    def _expand_one(self, stack: tuple) -> tuple:
        if not stack or not isinstance(self._top(stack), str):
            return (stack,)
        if stack in self._expanded:
            return self._expanded[stack]
        out: dict = {}
        todo, seen = [stack], set()
        while todo and len(out) < MAX_STACKS:
            s = todo.pop()
            if not s or not isinstance(self._top(s), str):
                out[s] = None
            elif s not in seen:
                seen.add(s)
                todo.extend(reversed(self._enter(self._after_top(s), self._top(s))))
        result = tuple(out)
        self._remember(self._expanded, stack, result)
        return result

    def _char(self, states: Hashable, cp: int) -> Hashable | None:
        moved = tuple(self._after_top(s) for s in states if s and contains(self._top(s), cp))
        return self._expand(moved) if moved else None

    def _takes_some_now(self, states: Hashable, lo: int, hi: int) -> bool:
        return any(s and meets(self._top(s), lo, hi) for s in states)

    def accepting(self, states: Hashable) -> bool:
        return any(not s for s in states)

    def has_moves(self, states: Hashable) -> bool:
        return any(states)

    def move_ranges(self, states: Hashable) -> list[tuple]:
        return [self._top(s) for s in states if s]

    def _memos(self) -> list[dict]:
        return [*super()._memos(), self._expanded]


def grammar_automaton(text: str) -> Automaton:
    """The answers the grammar's root rule derives (vLLM's guided_grammar, GBNF)."""
    return Grammar(text).automaton()
