"""JSON mode (OpenAI's `response_format: {"type": "json_object"}`): the answer is one JSON object.

A byte-level pushdown automaton follows the answer as it is written and tells which next tokens keep
it a prefix of a valid JSON object; the sampler picks among those of the most likely tokens. The
request finishes ("stop") when the object closes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# (mode, stack of open containers "{" / "[", detail): immutable, so trying a token copies nothing
State = tuple[str, str, str]
START: State = ("start", "", "")
WHITESPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): "rue", ord("f"): "alse", ord("n"): "ull"}
NUMBER_ENDS = frozenset(("0", "int", "frac", "exp"))  # number states where the number may end
CANDIDATES = 256  # most likely tokens tried first; the whole vocabulary only when none of them fits
MAX_WHITESPACE = 24  # whitespace bytes in a row before whitespace-only tokens are refused (no endless padding)


def _close(stack: str) -> State:
    """A value just ended: the root object is done, or its container wants a comma or its end."""
    return ("done", "", "") if not stack else ("after", stack, "")


def _value(stack: str, b: int) -> State | None:
    if b == ord("{"):
        return ("key_or_end", stack + "{", "")
    if b == ord("["):
        return ("value_or_end", stack + "[", "")
    if b == ord('"'):
        return ("str", stack, "v")
    if b == ord("-"):
        return ("num", stack, "-")
    if b in DIGITS:
        return ("num", stack, "0" if b == ord("0") else "int")
    if b in LITERALS:
        return ("lit", stack, LITERALS[b])
    return None


def _string(stack: str, detail: str, b: int) -> State | None:
    kind, escape = detail[0], detail[1:]
    if escape == "\\":
        if b in ESCAPES:
            return ("str", stack, kind)
        return ("str", stack, kind + "u4") if b == ord("u") else None
    if escape:  # "uN": N hex digits of a \u escape still to come
        left = int(escape[1]) - 1
        return ("str", stack, kind + (f"u{left}" if left else "")) if b in HEX else None
    if b == ord('"'):
        return ("colon", stack, "") if kind == "k" else _close(stack)
    if b == ord("\\"):
        return ("str", stack, kind + "\\")
    return None if b < 0x20 else ("str", stack, detail)  # raw control characters are not allowed


def _number(stack: str, part: str, b: int) -> State | None:
    digit, exp = b in DIGITS, b in b"eE"
    nxt = {
        "-": "0" if b == ord("0") else "int" if digit else None,
        "0": "." if b == ord(".") else "e" if exp else None,
        "int": "int" if digit else "." if b == ord(".") else "e" if exp else None,
        ".": "frac" if digit else None,
        "frac": "frac" if digit else "e" if exp else None,
        "e": "es" if b in b"+-" else "exp" if digit else None,
        "es": "exp" if digit else None,
        "exp": "exp" if digit else None,
    }[part]
    if nxt is not None:
        return ("num", stack, nxt)
    return step(_close(stack), b) if part in NUMBER_ENDS else None  # the byte after a number is the next thing


def step(state: State, b: int) -> State | None:
    """The state after one more byte, or None when the text can no longer be valid JSON."""
    mode, stack, detail = state
    if mode == "str":
        return _string(stack, detail, b)
    if mode == "num":
        return _number(stack, detail, b)
    if mode == "lit":
        if b != ord(detail[0]):
            return None
        return ("lit", stack, detail[1:]) if len(detail) > 1 else _close(stack)
    if mode == "start":  # json_object: the answer is an object, from its first byte
        return ("key_or_end", "{", "") if b == ord("{") else None
    if b in WHITESPACE:
        return state
    if mode in ("value", "value_or_end"):
        if mode == "value_or_end" and b == ord("]"):
            return _close(stack[:-1])
        return _value(stack, b)
    if mode in ("key_or_end", "key"):
        if b == ord('"'):
            return ("str", stack, "k")
        return _close(stack[:-1]) if mode == "key_or_end" and b == ord("}") else None
    if mode == "colon":
        return ("value", stack, "") if b == ord(":") else None
    if mode == "after":
        top = stack[-1]
        if b == ord(","):
            return ("key", stack, "") if top == "{" else ("value", stack, "")
        return _close(stack[:-1]) if b == ord("}" if top == "{" else "]") else None
    return None  # "done": nothing but whitespace may follow


def advance(state: State, data: bytes) -> State | None:
    return JSON_OBJECT.advance(state, data)


@dataclass(frozen=True)
class Automaton:
    """A byte-level recognizer of the answers allowed: a start state, one step per byte (None: the
    answer can no longer be allowed), and which states are a complete answer."""

    start: Any
    step: Callable[[Any, int], Any]
    is_done: Callable[[Any], bool]

    def advance(self, state: Any, data: bytes) -> Any:
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state


JSON_OBJECT = Automaton(START, step, lambda state: state[0] == "done")


class JsonConstraint:
    """One request's guided answer (a JSON object, or a tool call holding one): which tokens may
    come next, and where the answer stands."""

    def __init__(
        self, token_bytes: Callable[[int], bytes], is_special: Callable[[int], bool], enders: Iterable[int] = (),
        automaton: Automaton = JSON_OBJECT, by_first_byte: Callable[[], dict[int, list[int]]] | None = None,
    ) -> None:  # fmt: skip
        self._bytes = token_bytes
        self._special = is_special
        self._by_first_byte = by_first_byte  # the vocabulary grouped by first byte, for the fallback
        self._enders = frozenset(enders)  # end-of-sequence and stop token ids: they would end the answer mid-object
        self.automaton = automaton
        self.state = automaton.start
        self._whitespace = 0  # whitespace bytes written in a row

    @property
    def done(self) -> bool:
        return self.automaton.is_done(self.state)

    def _fits(self, token: int) -> bool:
        if token in self._enders or self._special(token):
            return False
        data = self._bytes(token)
        if not data or (self._whitespace + len(data) > MAX_WHITESPACE and all(b in WHITESPACE for b in data)):
            return False
        return self.automaton.advance(self.state, data) is not None

    def mask(self, row: torch.Tensor) -> torch.Tensor:
        """A copy of one row of logits with every token that would break the JSON at -inf. Only the
        CANDIDATES most likely tokens are tried (the rest keep too little mass to matter), unless none
        of them fits."""
        order = torch.topk(row, min(CANDIDATES, row.numel())).indices.tolist()
        fits = [t for t in order if self._fits(t)]
        if not fits:
            fits = self._fallback(row)
        if not fits:  # a vocabulary without JSON's characters: nothing to steer (accept() ends the answer)
            return row
        index = torch.tensor(fits, device=row.device)
        out = torch.full_like(row, float("-inf"))
        out[index] = row[index]
        return out

    def _fallback(self, row: torch.Tensor) -> list[int]:
        """The most likely CANDIDATES tokens that fit, out of the whole vocabulary: only those whose
        first byte the automaton takes now are tried (in a call's fixed text, one byte: a few hundred
        tokens, where trying all 49k took 60-180 ms a step)."""
        if self._by_first_byte is None:
            ranked = torch.argsort(row, descending=True).tolist()
            return list(itertools.islice((t for t in ranked if self._fits(t)), CANDIDATES))
        groups = self._by_first_byte()
        firsts = [b for b in range(256) if self.automaton.step(self.state, b) is not None]
        fits = [t for b in firsts for t in groups.get(b, ()) if self._fits(t)]
        if len(fits) > CANDIDATES:
            index = torch.tensor(fits, device=row.device)
            fits = index[torch.topk(row[index], CANDIDATES).indices].tolist()
        return fits

    def accept(self, token: int) -> None:
        """Follow the sampled token (one mask() allowed); one that breaks the JSON ends the answer."""
        data = self._bytes(token)
        state = self.automaton.advance(self.state, data) if not self._special(token) else None
        if state is None:
            log.warning("token %d does not continue the guided answer; ending it", token)
            self.automaton = JSON_OBJECT  # whose "done" state ends the request
            state = ("done", "", "")
        self.state = state
        self._whitespace = self._whitespace + len(data) if all(b in WHITESPACE for b in data) else 0
