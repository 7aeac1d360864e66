"""vLLM's guided_grammar: an answer held to a context-free grammar written in GBNF, the EBNF of
llama.cpp and xgrammar: `root ::= ...` rules of quoted strings, character classes ([a-z], [^"]),
`.`, rule names, groups, `|`, and `* + ? {m} {m,} {m,n}`; `#` comments.

The rules compile to alternatives of symbols (groups and repetitions become rules of their own).
The answer is followed as a pushdown automaton whose stacks share their frames (a graph-structured
stack): a state is the set of frames at a character set, each with the frames below it; the answer
is complete where the root's frame has returned. Ambiguous grammars and nested repetitions of what
may match nothing cost one node per frame of the grammar at each position, never one stack per
reading. Left-recursive rules (whose graph would loop) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator

from cachedattention.engine.code_points import CodePointRecognizer
from cachedattention.engine.guided import Automaton
from cachedattention.engine.regex_parse import (
    ANY_BUT_LINE_END,
    MAX_REPEAT,
    PatternParser,
    ascii_digits,
    contains,
    meets,
)

MAX_SYMBOLS = 50_000
WAITING = "waiting"  # marks a node that waits for a rule to return (see _Position)
FEW_SEEDS = 8  # nodes reached by one character that are followed one by one (each remembered)
SHORTHANDS = frozenset("dwsDWS")  # class escapes: a class, not a string's character
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
                if c == "\\" and self.peek() in SHORTHANDS:
                    shown = "\\" + self.peek()
                    raise self.error(f"{shown} is a class, not a character: write it outside the string, as [{shown}]")
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

    def quantifier(self) -> tuple[int, int | None] | None:
        """As a pattern's, after any whitespace (llama.cpp takes `"a" *`), and with GBNF's {,n}."""
        self.space()
        end = self.text.find("}", self.pos) if self.peek(2) == "{," else -1  # (a search per item would be quadratic)
        if end > 0 and ascii_digits(self.text[self.pos + 2 : end]):
            high = int(self.text[self.pos + 2 : end])  # {,n} is {0,n} (no other reading to differ from)
            if high > MAX_REPEAT:
                raise self.error(f"a repetition bound above {MAX_REPEAT} is not supported")
            self.pos = end + 1
            return 0, high
        return super().quantifier()

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


def _derives(rules: dict[str, list[tuple]], class_ok: Callable[[tuple], bool]) -> set[str]:
    """The rules with an alternative whose symbols all do: the classes class_ok takes, and rules
    found so. Each alternative counts its rules not yet found, so the fixpoint is linear."""
    missing: dict[tuple[str, int], int] = {}  # (rule, alternative) -> its rule symbols not yet found
    needed_by: dict[str, list[tuple[str, int]]] = {}
    todo: list[str] = []
    for name, options in rules.items():
        for k, option in enumerate(options):
            if not all(class_ok(s) for s in option if not isinstance(s, str)):
                continue
            names = [s for s in option if isinstance(s, str)]
            missing[(name, k)] = len(names)
            for s in names:
                needed_by.setdefault(s, []).append((name, k))
            if not names:
                todo.append(name)
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for owner in needed_by.get(name, ()):
            missing[owner] -= 1
            if not missing[owner]:
                todo.append(owner[0])
    return found


def _components(roots: Iterable[Hashable], edges: Callable[[Hashable], Iterable[Hashable]]) -> list[list]:
    """The strongly connected components of what the roots reach, each after every component it
    reaches (Tarjan's algorithm, with a stack of its own: chains of rules or frames may be longer
    than Python's recursion allows)."""
    index: dict = {}
    low: dict = {}
    path: list = []
    on_path: set = set()
    found: list[list] = []
    work: list[tuple[Hashable, Iterator]] = []

    def visit(node: Hashable) -> None:
        index[node] = low[node] = len(index)
        path.append(node)
        on_path.add(node)
        work.append((node, iter(edges(node))))

    for root in roots:
        if root in index:
            continue
        visit(root)
        while work:
            node, out = work[-1]
            for nxt in out:
                if nxt not in index:
                    visit(nxt)
                    break
                if nxt in on_path:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while not component or component[-1] != node:
                        component.append(path.pop())
                        on_path.discard(component[-1])
                    found.append(component)
    return found


def _left_recursive(rules: dict[str, list[tuple]]) -> str | None:
    """A rule that can begin with itself with symbols left behind it (its expansion would grow for
    ever, and the graph of stacks would loop), or None. Rules that may match nothing are seen
    through; a rule that only comes back to itself alone (a repetition of something that may be
    empty) is harmless. Such a rule lies on a cycle of 'begins with' through an edge that leaves
    something behind: both ends of that edge in one strongly connected component."""
    nullable = _derives(rules, lambda chars: False)
    begins: dict[str, list[tuple[str, bool]]] = {name: [] for name in rules}  # (rule, something left after it)
    for name, options in rules.items():
        for option in options:
            for i, symbol in enumerate(option):
                if not isinstance(symbol, str):
                    break
                begins[name].append((symbol, i + 1 < len(option)))
                if symbol not in nullable:
                    break
    component = {}
    for number, members in enumerate(_components(rules, lambda name: [nxt for nxt, _ in begins[name]])):
        component.update(dict.fromkeys(members, number))
    for name, edges in begins.items():
        if any(left and component[nxt] == component[name] for nxt, left in edges):
            return name
    return None


def _finishing(rules: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """The rules with only the alternatives that can finish (derive some text): every stack made
    of what is left can be completed, so no prefix the automaton keeps is a dead end."""
    done = _derives(rules, bool)
    return {name: [o for o in options if all(s in done if isinstance(s, str) else bool(s) for s in o)]
            for name, options in rules.items()}  # fmt: skip


class _Node:
    """A frame of the graph of stacks (a graph-structured stack, as in GLR parsing): an alternative
    and the position of its next symbol, and the frames below it, one for each way the text read so
    far got here. Nodes are shared, so readings that differ below a frame (which copy of a repeated
    group this is, at each level) cost one node per frame, not one stack per combination."""

    __slots__ = ("frame", "below")

    def __init__(self, frame: tuple[int, int] | None, below: frozenset) -> None:
        self.frame = frame
        self.below = below


class _Position:
    """The nodes at one position of the text, found by following every way on from the frames the
    last character moved. A frame whose next symbol is a rule enters the rule's alternatives: a
    frame at its last symbol hands them its own frames below (a tail call, so a repetition does not
    grow the graph); any other puts below them a node that waits for the rule to return, to go on
    at the frame after it. An alternative that ends here returns to every node below it.

    Keys: a frame (alternative, position) reached here, or (alternative, position, WAITING) for the
    node that waits here to go on at that frame: it is not reached until the rule returns (the two
    must not be one node, or a reading would skip the rule). A key is one node whatever the ways
    it is reached by. What lies below it is kept as where it comes from (sets of earlier nodes,
    nodes here, and keys here whose sets are also its own), so each key, link and return is handled
    once: a position costs time linear in what it reaches, even where nested repetitions of what
    may match nothing give thousands of frames thousands of ways down. The sets below are built
    once, at the end."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.includes: dict[tuple, set] = {}  # key -> keys here whose sets below are its too
        self.here_below: dict[tuple, set] = {}  # key -> waiting nodes here just below it
        self.earlier_below: dict[tuple, set[frozenset]] = {}  # key -> sets of earlier nodes below it
        self.active: set[tuple[int, int]] = set()  # frames reached
        self.ended: set[tuple] = set()  # keys whose nodes below all return (an alternative ended on them)
        self.returned: set = set()  # waiting keys and earlier nodes returned to
        self.returned_sets: set[frozenset] = set()  # sets of earlier nodes returned to
        self.todo: list[tuple[str, object]] = []
        self.complete = False  # the root returned: the text may end here
        self.unions: dict[frozenset, frozenset] = {}  # sets of sets below -> their union

    def reach(self, frame: tuple[int, int]) -> None:
        if frame not in self.active:
            self.active.add(frame)
            self.todo.append(("reached", frame))

    @staticmethod
    def _link(table: dict, key: tuple, item: Hashable) -> bool:
        """Add the item to the key's links in the table; whether it is new."""
        links = table.setdefault(key, set())
        if item in links:
            return False
        links.add(item)
        return True

    def below_earlier(self, key: tuple, nodes: frozenset) -> None:
        if self._link(self.earlier_below, key, nodes) and key in self.ended:
            self.ret(nodes)

    def _below_here(self, key: tuple, waiting: tuple) -> None:
        if self._link(self.here_below, key, waiting) and key in self.ended:
            self.ret((waiting,))

    def _include(self, key: tuple, other: tuple) -> None:
        if self._link(self.includes, key, other) and key in self.ended:
            self.todo.append(("ended", other))

    def enter(self, rule: str, frame: tuple[int, int] | None = None, waiting: tuple | None = None) -> None:
        """Each alternative of the rule begins here: on top of a waiting node here, or of what lies
        below `frame` (a tail call), or of the bottom (the root)."""
        for b in self.grammar.rules[rule]:
            if not self.grammar.alternatives[b]:  # it ends at once
                if waiting is not None:
                    self.ret((waiting,))
                elif frame is not None:
                    self.todo.append(("ended", frame))
                else:
                    self.complete = True
                continue
            if waiting is not None:
                self._below_here((b, 0), waiting)
            elif frame is not None:
                self._include((b, 0), frame)
            else:
                self.below_earlier((b, 0), frozenset((self.grammar.bottom,)))
            self.reach((b, 0))

    def ret(self, nodes: Iterable) -> None:
        """Return to each of these (earlier nodes, waiting keys here, the bottom) not returned to yet.
        Sets of earlier nodes are shared by many keys and overlap: each set is looked at once, and
        only its nodes not yet returned to go on (a set difference, not a walk of every member)."""
        if isinstance(nodes, frozenset):
            if nodes in self.returned_sets:
                return
            self.returned_sets.add(nodes)
            new = nodes - self.returned
        else:
            new = {n for n in nodes if n not in self.returned}
        self.returned |= new
        self.todo.extend(("return", n) for n in new)

    def follow(self) -> None:
        alternatives = self.grammar.alternatives
        while self.todo:
            what, item = self.todo.pop()
            if what == "reached":
                a, i = item
                symbol = alternatives[a][i]
                if not isinstance(symbol, str):  # a character set: a move
                    continue
                if i + 1 == len(alternatives[a]):
                    self.enter(symbol, frame=item)
                else:
                    waiting = (a, i + 1, WAITING)
                    self._include(waiting, item)
                    self.enter(symbol, waiting=waiting)
            elif what == "ended":
                if item not in self.ended:
                    self.ended.add(item)
                    self.ret(self.here_below.get(item, ()))
                    for nodes in self.earlier_below.get(item, ()):
                        self.ret(nodes)
                    self.todo.extend(("ended", key) for key in self.includes.get(item, ()))
            else:  # a return (once each) to a waiting node here, an earlier node or the bottom
                if isinstance(item, tuple):
                    self._include(item[:2], item)
                    self.reach(item[:2])
                elif item.frame is None:
                    self.complete = True
                else:
                    self.below_earlier(item.frame, item.below)
                    self.reach(item.frame)

    def _links(self, key: tuple) -> tuple:
        """The keys here whose sets the key's set is built from."""
        return (*self.includes.get(key, ()), *self.here_below.get(key, ()))

    def _in_order(self, tops: list) -> list[list] | None:
        """Each key the tops need after those it is built from (a depth-first walk), or None where
        keys here loop through tail calls (their sets are one: strongly connected components)."""
        order: list[list] = []
        done: set = set()
        pending: set = set()
        for top in tops:
            work = [top]
            while work:
                key = work[-1]
                if key in done:
                    work.pop()
                    continue
                links = [k for k in self._links(key) if k not in done]
                if links:
                    if key in pending:
                        return None
                    pending.add(key)
                    work.extend(links)
                    continue
                work.pop()
                done.add(key)
                order.append([key])
        return order

    def _union(self, parts: frozenset) -> frozenset:
        """The sets joined: once per position for the same sets (down a chain of keys they recur, and
        joining thousands of nodes again at each key would make a position quadratic), and the
        largest set itself where it holds the others (one object, not a copy each)."""
        if parts not in self.unions:
            largest = max(parts, key=len)
            joined = largest.union(*parts)
            self.unions[parts] = largest if len(joined) == len(largest) else joined
        return self.unions[parts]

    def state(self) -> frozenset:
        """The nodes at a character set (and the bottom if the text may end here)."""
        alternatives = self.grammar.alternatives
        tops = [f for f in self.active if not isinstance(alternatives[f[0]][f[1]], str)]
        below: dict[tuple, frozenset] = {}
        nodes: dict[tuple, _Node] = {}

        def node(key: tuple) -> _Node:
            if key not in nodes:
                nodes[key] = self.grammar.node(key[:2], below[key])
            return nodes[key]

        includes, here_below, earlier_below = self.includes, self.here_below, self.earlier_below
        order = self._in_order(tops)
        for component in order if order is not None else _components(tops, self._links):
            here = {k for c in component for k in here_below.get(c, ())}
            if here.intersection(component):  # refused left recursion is what would make a loop
                raise RuntimeError("the grammar's graph of stacks loops at one position")
            parts = {nodes for c in component for nodes in earlier_below.get(c, ())}
            parts.update(below[k] for c in component for k in includes.get(c, ()) if k in below)
            if here:
                parts.add(frozenset(node(k) for k in here))
            shared = parts.pop() if len(parts) == 1 else self._union(frozenset(parts))
            for c in component:
                below[c] = shared
        found = {node(f) for f in tops}
        if self.complete:
            found.add(self.grammar.bottom)
        return frozenset(found)


class Grammar(CodePointRecognizer):
    """A compiled GBNF grammar, followed as a pushdown automaton whose stacks share their frames (a
    state is the frozenset of nodes at a character set, with the bottom node where the text may
    end). Every ambiguity and every repetition of what may match nothing costs at most one node per
    frame of the grammar at each position, so a step is polynomial in the grammar's size, and a
    deep nesting adds one node per level."""

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
        self.alternatives: list[tuple] = []  # every rule's alternatives, by number
        self.rules: dict[str, list[int]] = {}  # a rule -> its alternatives' numbers
        for name, options in rules.items():
            self.rules[name] = list(range(len(self.alternatives), len(self.alternatives) + len(options)))
            self.alternatives.extend(options)
        self._nodes: dict = {}  # (frame, frames below) -> its node: equal states are one object
        self._closures: dict = {}  # a node reached -> the state it leads to
        self.bottom = _Node(None, frozenset())  # below the root: where the text may end
        start = _Position(self)
        start.enter("root")
        start.follow()
        self.start = (start.state(), b"")

    def node(self, frame: tuple[int, int], below: frozenset) -> _Node:
        key = (frame, below)
        if key not in self._nodes:  # weighed by its set below: large sets are what fill memory
            self._remember(self._nodes, key, _Node(frame, below), weight=1 + len(below))
        return self._nodes[key]

    def _symbol(self, node: _Node) -> object:
        a, i = node.frame
        return self.alternatives[a][i]

    def _char(self, states: Hashable, cp: int) -> Hashable | None:
        moved = [node for node in states if node.frame is not None and contains(self._symbol(node), cp)]
        if not moved:
            return None
        seeds: list[_Node] = []  # the nodes reached: each moved frame's next, or the nodes below it
        for node in moved:
            a, i = node.frame
            if i + 1 < len(self.alternatives[a]):
                seeds.append(self.node((a, i + 1), node.below))
            else:
                seeds.extend(node.below)
        if len(seeds) <= FEW_SEEDS:
            return self._merged([self._closure(seed) for seed in seeds])
        here = _Position(self)  # many ways on: one walk keeps the position linear in what it reaches
        here.ret(seeds)
        here.follow()
        return here.state()

    def _closure(self, node: _Node) -> frozenset:
        """The nodes at a character set (and the bottom) that a node reached leads to: the same
        wherever the node recurs (a string's next character, a list's next item), so remembered."""
        if node.frame is None:
            return frozenset((node,))
        if node not in self._closures:
            here = _Position(self)
            here.below_earlier(node.frame, node.below)
            here.reach(node.frame)
            here.follow()
            self._remember(self._closures, node, here.state())
        return self._closures[node]

    def _merged(self, parts: list[frozenset]) -> frozenset:
        """The union of states, a frame's nodes made one (their sets below joined): a node per frame."""
        found = parts[0] if len(parts) == 1 else frozenset().union(*parts)
        by_frame: dict = {}
        for node in found:
            by_frame.setdefault(node.frame, []).append(node)
        if len(by_frame) == len(found):
            return found
        return frozenset(
            nodes[0] if len(nodes) == 1 else self.node(frame, frozenset().union(*(n.below for n in nodes)))
            for frame, nodes in by_frame.items()
        )

    def _takes_some_now(self, states: Hashable, lo: int, hi: int) -> bool:
        return any(node.frame is not None and meets(self._symbol(node), lo, hi) for node in states)

    def accepting(self, states: Hashable) -> bool:
        return self.bottom in states

    def has_moves(self, states: Hashable) -> bool:
        return any(node.frame is not None for node in states)

    def move_ranges(self, states: Hashable) -> list[tuple]:
        return [self._symbol(node) for node in states if node.frame is not None]

    def _memos(self) -> list[dict]:
        return [*super()._memos(), self._nodes, self._closures]


def grammar_automaton(text: str) -> Automaton:
    """The answers the grammar's root rule derives (vLLM's guided_grammar, GBNF)."""
    return Grammar(text).automaton()
