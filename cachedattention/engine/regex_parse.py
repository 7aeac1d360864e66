"""A regular expression (the common subset of Python's and JavaScript's syntax, as JSON schema's
`pattern` and vLLM's guided_regex write them) parsed into a small tree over sets of code points.

Character sets are tuples of disjoint, sorted, inclusive (low, high) code point ranges. Where the two
syntaxes disagree on what a class holds (\\d, \\w, \\s, "."), the positive classes take what both
agree on and their negations leave out what either would match, so an answer held to the tree
matches under both. Anything the tree cannot hold to (backreferences, lookarounds, inline flags,
word boundaries, anchors inside the pattern) is refused with a ValueError saying what and where.
"""

from __future__ import annotations

import bisect
import functools
import sys
from dataclasses import dataclass

MAX_CODE_POINT = sys.maxunicode
SURROGATES = (0xD800, 0xDFFF)  # no character of a valid string
MAX_REPEAT = 1000  # the largest {n,m} bound taken

# tree nodes: ("set", ranges) one character of a set; ("cat", nodes) one after another; ("alt",
# nodes) one of them; ("rep", node, low, high or None) repeated; ("bol",) / ("eol",) the start / end


# -- character sets ---------------------------------------------------------------------------------
def union(*sets: tuple) -> tuple:
    """The union of character sets, merged into disjoint sorted ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(r for s in sets for r in s):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def negate(ranges: tuple) -> tuple:
    """Every character (surrogates are none) not in the set."""
    out, nxt = [], 0
    for lo, hi in union(ranges, (SURROGATES,)):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return tuple(out)


def _chars(text: str) -> tuple:
    return union(*(((ord(c), ord(c)),) for c in text))


@functools.cache
def _unicode_class(kind: str) -> tuple:
    """The code points Python's str patterns put in \\d, \\w or \\s (Unicode classes), as ranges
    (one scan of all code points, remembered)."""
    test = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}[kind]
    ranges: list[tuple[int, int]] = []
    start = None
    for cp in range(MAX_CODE_POINT + 2):
        inside = cp <= MAX_CODE_POINT and test(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return tuple(ranges)


DIGIT = ((0x30, 0x39),)
WORD = union(DIGIT, ((0x41, 0x5A), (0x61, 0x7A)), _chars("_"))
SPACE = _chars(" \t\n\r\f\v")
LINE_ENDS = _chars("\n\r\u2028\u2029")  # what "." leaves out (JavaScript's; Python's is "\n" only)
JS_SPACE = _chars("\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff")


def shorthand(letter: str, wide: bool = False) -> tuple:
    """\\d \\w \\s: ASCII (what both syntaxes match); \\D \\W \\S: what neither syntax's class
    holds. `wide`: the other way round, what either syntax may take (for a negated class)."""
    narrow = {"d": DIGIT, "w": WORD, "s": SPACE}[letter.lower()]
    if letter.islower() != wide:
        return narrow if letter.islower() else negate(narrow)
    widest = {"d": lambda: union(DIGIT, _unicode_class("d")), "w": lambda: union(WORD, _unicode_class("w")),
              "s": lambda: union(SPACE, JS_SPACE, _unicode_class("s"))}[letter.lower()]()  # fmt: skip
    return widest if letter.islower() else negate(widest)


ANY_BUT_LINE_END = negate(LINE_ENDS)
# escapes one syntax reads as a letter and the other does not (JavaScript without the u flag)
AMBIGUOUS_ESCAPES = {
    "A": "(the start) reads differently in Python and JavaScript: write ^",
    "Z": "(the end) reads differently in Python and JavaScript: write $",
    "z": "(the end) reads differently in Python and JavaScript: write $",
    "a": "reads differently in Python and JavaScript: write \\x07",
    "U": "reads differently in Python and JavaScript: write the character itself",
}
SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0", "a": "\a"}


# -- the parser --------------------------------------------------------------------------------------
@dataclass
class PatternParser:
    """A pattern's parser; its classes and escapes also read a grammar's (engine/grammar.py)."""

    text: str
    pos: int = 0
    kind: str = "pattern"

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what} at position {self.pos} of the {self.kind} {self.text!r}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def take(self) -> str:
        if self.pos >= len(self.text):
            raise self.error(f"the {self.kind} ends too early")
        c = self.text[self.pos]
        self.pos += 1
        return c

    def alternation(self, depth: int) -> tuple:
        options = [self.sequence(depth)]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence(depth))
        return options[0] if len(options) == 1 else ("alt", tuple(options))

    def sequence(self, depth: int) -> tuple:
        items: list[tuple] = []
        while self.pos < len(self.text) and self.peek() not in "|)":
            atom = self.atom(depth)
            items.append(self.quantified(atom))
        return ("cat", tuple(items))

    def quantified(self, atom: tuple) -> tuple:
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] in ("bol", "eol"):
            raise self.error("an anchor cannot be repeated")
        if self.peek() == "+":
            raise self.error("possessive quantifiers are not supported")
        if self.peek() == "?":  # lazy: the same answers
            self.pos += 1
        if self.quantifier() is not None:  # Python and JavaScript refuse "a**" and "a{2}{3}" too
            raise self.error("a quantifier cannot follow another (multiple repeat)")
        return ("rep", atom, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?") and c:
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        end = self.text.find("}", self.pos)
        body = self.text[self.pos + 1 : end] if end > 0 else ""
        low, comma, high = body.partition(",")
        if not low and comma and ascii_digits(high):
            raise self.error(f"{{{body}}} reads differently in Python and JavaScript: write {{0{body}}}")
        if not ascii_digits(low) or not (ascii_digits(high) or not high):  # not a quantifier: a literal "{"
            return None
        lo, hi = int(low), (int(high) if high else None if comma else int(low))
        if hi is not None and hi < lo:
            raise self.error(f"{{{body}}} has its bounds out of order")
        if max(lo, hi or 0) > MAX_REPEAT:
            raise self.error(f"a repetition bound above {MAX_REPEAT} is not supported")
        self.pos = end + 1
        return lo, hi

    def atom(self, depth: int) -> tuple:
        c = self.take()
        if c == "(":
            return self.group(depth)
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", ANY_BUT_LINE_END)
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return self.escape()
        if c in "*+?" or (c == "{" and self._quantifier_at(self.pos - 1)):
            raise self.error(f"nothing to repeat before {c!r}")
        return _char(self._code_point(c))

    def _code_point(self, c: str) -> int:
        if SURROGATES[0] <= ord(c) <= SURROGATES[1]:  # a lone surrogate (JSON's "\\ud800") is no character
            raise self.error("a lone surrogate is not a character")
        return ord(c)

    def _quantifier_at(self, pos: int) -> bool:
        here, self.pos = self.pos, pos
        try:
            return self.quantifier() is not None
        finally:
            self.pos = here

    def group(self, depth: int) -> tuple:
        if depth > 100:
            raise self.error("groups are nested too deeply")
        if self.peek() == "?":
            self.pos += 1
            kind = self.take()
            if kind == "P" and self.peek() == "<" or kind == "<" and self.peek() not in ("=", "!"):
                if kind == "P":
                    self.pos += 1
                end = self.text.find(">", self.pos)
                if end < 0:
                    raise self.error("a group's name is not closed")
                self.pos = end + 1
            elif kind != ":":
                what = {"=": "lookahead", "!": "lookahead", "<": "lookbehind", "P": "a named backreference"}
                raise self.error(f"{what.get(kind, 'an inline flag or group extension')} '(?{kind}' is not supported")
        inner = self.alternation(depth + 1)
        if self.peek() != ")":
            raise self.error("a group is not closed")
        self.pos += 1
        return inner

    def escape(self, in_class: bool = False, negated: bool = False) -> tuple:
        """The node of an escape (the backslash taken). In a negated class each shorthand takes its
        widest reading, so that the class's complement is the narrowest."""
        c = self.take()
        if c in "dwsDWS":
            return ("set", shorthand(c, wide=negated))
        if self.kind == "pattern" and c in AMBIGUOUS_ESCAPES:
            raise self.error(f"\\{c} {AMBIGUOUS_ESCAPES[c]}")
        if c in SIMPLE_ESCAPES and not (c == "0" and self.peek().isdigit()):
            return _char(ord(SIMPLE_ESCAPES[c]))
        if c == "b" and in_class:
            return _char(8)
        if c in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[c]
            hexa = self.text[self.pos : self.pos + digits]
            if len(hexa) != digits or any(h not in "0123456789abcdefABCDEF" for h in hexa):
                raise self.error(f"\\{c} needs {digits} hex digits")
            self.pos += digits
            cp = int(hexa, 16)
            if cp > MAX_CODE_POINT or SURROGATES[0] <= cp <= SURROGATES[1]:
                raise self.error(f"\\{c}{hexa} is not a character")
            return _char(cp)
        if c.isdigit():
            raise self.error("backreferences are not supported")
        if c.isalnum():
            what = {"b": "word boundaries", "B": "word boundaries", "p": "Unicode properties", "P": "Unicode properties"}
            raise self.error(f"\\{c} ({what.get(c, 'an unknown escape')}) is not supported")
        return _char(self._code_point(c))  # an escaped punctuation mark is itself

    def char_class(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        if self.peek() == "]":
            differs = "reads differently in Python and JavaScript" if self.kind == "pattern" else "is ambiguous"
            raise self.error(f"a class that begins with ']' {differs}: write \\]")
        parts: list[tuple] = []
        while True:
            c = self.take()
            if c == "]":
                break
            if c == "[" and self.peek() == ":":
                raise self.error("POSIX classes ([:alpha:]) are not supported")
            low = self._class_item(c, negated)
            if self.peek() == "-" and self.peek(2) not in ("-]", "-"):  # a range (a "-" before "]" is itself)
                self.pos += 1
                high = self._class_item(self.take(), negated)
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1]:
                    raise self.error("a range's ends must be single characters")
                if high[0][0] < low[0][0]:
                    raise self.error("a range's ends are out of order")
                low = ((low[0][0], high[0][0]),)
            parts.append(low)
        ranges = union(*parts)
        return negate(ranges) if negated else _without_surrogates(ranges)


    def _class_item(self, c: str, negated: bool = False) -> tuple:
        return self.escape(True, negated)[1] if c == "\\" else _char(self._code_point(c))[1]


def contains(ranges: tuple, cp: int) -> bool:
    """Whether the set holds the character."""
    i = bisect.bisect_right(ranges, (cp, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


def meets(ranges: tuple, lo: int, hi: int) -> bool:
    """Whether the set holds some character in [lo, hi]."""
    i = bisect.bisect_right(ranges, (lo, MAX_CODE_POINT + 1)) - 1
    if i >= 0 and ranges[i][1] >= lo:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] <= hi


def ascii_digits(text: str) -> bool:
    return bool(text) and all("0" <= c <= "9" for c in text)


def _without_surrogates(ranges: tuple) -> tuple:
    return negate(negate(ranges))


def _char(cp: int) -> tuple:
    return ("set", ((cp, cp),))


def parse(pattern: str) -> tuple:
    """The tree of a pattern. Anchors (^ $ \\A \\Z) are kept as nodes; where they may stand is the
    compiler's to check."""
    if not isinstance(pattern, str):
        raise ValueError(f"a pattern must be a string, got {type(pattern).__name__}")
    parser = PatternParser(pattern)
    try:
        tree = parser.alternation(0)
    except RecursionError:
        raise ValueError(f"the pattern {pattern!r} is nested too deeply") from None
    if parser.pos < len(pattern):  # a ")" with no "("
        raise parser.error("unbalanced parenthesis")
    return tree
