"""Guided answers (JSON mode, a JSON schema, a choice, a forced tool call): a byte-level automaton
of the allowed answers follows the answer as it is written and tells which next tokens keep it a
prefix of one; the sampler picks among those of the most likely tokens. The request finishes
("stop") when the answer is complete, or at an end-of-sequence token where it may end.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from cachedattention.engine.reasoning_gate import ReasoningGate

log = logging.getLogger(__name__)

WHITESPACE = frozenset(b" \t\n\r")
CANDIDATES = 256  # most likely tokens tried first; the whole vocabulary only when none of them fits
MAX_WHITESPACE = 24  # whitespace bytes in a row before whitespace-only tokens are refused (no endless padding)
NEG_INF = float("-inf")
MEMO_STATES = 512  # answer states whose tokens' fit is remembered


@dataclass(frozen=True)
class Automaton:
    """A byte-level recognizer of the answers allowed: a start state, one step per byte (None: the
    answer can no longer be allowed), and which states are a complete answer."""

    start: Any
    step: Callable[[Any, int], Any]
    is_done: Callable[[Any], bool]
    may_end: Callable[[Any], bool] | None = None  # whether the answer may end here though it could go on
    # whitespace bytes in a row before whitespace-only tokens are refused (JSON's: no endless
    # padding); None where the answer's own form decides (a pattern, a grammar)
    max_whitespace: int | None = MAX_WHITESPACE
    # whether a state is inside text, where whitespace is content and not counted (a JSON string)
    in_text: Callable[[Any], bool] | None = None

    def counts_whitespace(self, state: Any) -> bool:
        return self.max_whitespace is not None and (self.in_text is None or not self.in_text(state))

    def advance(self, state: Any, data: bytes) -> Any:
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state


class GuidedConstraint:
    """One request's guided answer: which tokens may come next, and where the answer stands."""

    def __init__(
        self, automaton: Automaton, token_bytes: Callable[[int], bytes], is_special: Callable[[int], bool],
        enders: Iterable[int] = (), by_first_byte: Callable[[], dict[int, list[int]]] | None = None,
        end_token: int | None = None, reasoning: ReasoningGate | None = None,
    ) -> None:  # fmt: skip
        self._bytes = token_bytes
        self._special = is_special
        self._by_first_byte = by_first_byte  # the vocabulary grouped by first byte, for the fallback
        self._enders = frozenset(enders)  # end-of-sequence and stop token ids: only where the answer may end
        # the model's end-of-sequence token: taken where nothing but the end may follow, even where
        # the request ignores EOS or min_tokens holds it back (the answer is complete)
        self._end_token = end_token
        self.reasoning = reasoning  # a reasoning model's thinking first: the answer's shape holds after it
        self.automaton = automaton
        self.state = automaton.start
        self._whitespace = 0  # whitespace bytes written in a row
        self._ended = False  # an end token was taken where the answer may end, or a token broke it
        self._stuck = False  # no token of the vocabulary continues the answer: the end was forced
        # state -> {token: whether it continues the answer}: states recur (inside any string of an
        # object, after any comma), and the likely tokens there are much the same each time
        self._memo: dict[Any, dict[int, bool]] = {}
        self._known: dict[int, bool] = {}
        self._sorted: dict[int, tuple[list[bytes], list[int]]] = {}  # a first byte's tokens, by their bytes

    @property
    def done(self) -> bool:
        if self.reasoning is not None and not self.reasoning.over:
            return False
        return self._ended or self.automaton.is_done(self.state)

    def _may_end(self) -> bool:
        return self.automaton.may_end is not None and self.automaton.may_end(self.state)

    def _fits(self, token: int, remember: bool = True) -> bool:
        if token in self._enders:
            return self._may_end()
        if self._special(token):
            return False
        data = self._bytes(token)
        if not data:
            return False
        room = self._whitespace_room()
        if room is not None and len(data) > room and all(b in WHITESPACE for b in data):
            return False
        fits = self._known.get(token)
        if fits is None:
            fits = self.automaton.advance(self.state, data) is not None
            if remember:  # (not the fallback's scans of the vocabulary: memory)
                self._known[token] = fits
        return fits

    def _whitespace_room(self) -> int | None:
        """Whitespace bytes that may still come in a row here (None: not counted, as inside a string):
        a whitespace-only token longer than this is refused (no endless padding)."""
        if not self.automaton.counts_whitespace(self.state):
            return None
        return (self.automaton.max_whitespace or 0) - self._whitespace

    def _recall(self) -> None:
        """Point _known at what is known about the tokens in the current state."""
        if len(self._memo) >= MEMO_STATES:  # a long answer's states: keep the memory bounded
            self._memo.clear()
        self._known = self._memo.setdefault(self.state, {})

    def mask(self, row: torch.Tensor) -> torch.Tensor:
        """A copy of one row of logits with every token that would break the answer at -inf (none
        while the model reasons; its first token may also open the reasoning)."""
        gate = self.reasoning
        if gate is not None and not gate.over:
            return row
        out = self._mask_answer(row)
        if gate is not None and gate.may_open:
            out[gate.start] = row[gate.start]
        return out

    def _mask_answer(self, row: torch.Tensor) -> torch.Tensor:
        """The answer's mask. Only the CANDIDATES most likely tokens are tried (the rest keep too
        little mass to matter), unless none of them fits."""
        self._recall()
        values, order = torch.topk(row, min(CANDIDATES, row.numel()))
        # a token already at -inf (min_tokens holding back EOS) is not a way on
        fits = [t for v, t in zip(values.tolist(), order.tolist()) if v != NEG_INF and self._fits(t)]
        if not fits:
            fits = self._fallback(row)
        out = torch.full_like(row, NEG_INF)
        if not fits:
            end = self._end_token if self._end_token is not None else min(self._enders, default=None)
            if end is None:  # nothing to end with: any token (accept() ends the answer at it)
                return row
            if not self._may_end():  # no token of the vocabulary goes on: stop where the answer stands
                log.warning("no token continues the guided answer; ending it unfinished")
                self._stuck = True
            out[end] = 0.0  # only the end may follow: end here
            return out
        index = torch.tensor(fits, device=row.device)
        out[index] = row[index]
        return out

    def _fallback(self, row: torch.Tensor) -> list[int]:
        """The most likely CANDIDATES tokens that fit, out of the whole vocabulary: only those whose
        first byte the automaton takes now are looked at (in a call's fixed text, one byte: a few
        hundred tokens, where trying all 49k took 60-180 ms a step), walked in byte order."""
        finite = row.isfinite()
        if self._by_first_byte is None:
            ranked = torch.argsort(row, descending=True)[: int(finite.sum())].tolist()
            return list(itertools.islice((t for t in ranked if self._fits(t, False)), CANDIDATES))
        groups = self._by_first_byte()
        firsts = [b for b in range(256) if self.automaton.step(self.state, b) is not None]
        fitting = self._fitting(groups, firsts)
        may_end = self._may_end()
        fits = [t for b in firsts for t in groups.get(b, ())
                if (may_end if t in self._enders else t in fitting and not self._special(t))]  # fmt: skip
        fits += [t for t in sorted(self._enders) if self._fits(t, False)]  # outside the CANDIDATES most likely
        fits = [t for t, ok in zip(fits, finite[fits].tolist()) if ok] if fits else fits
        if len(fits) > CANDIDATES:
            index = torch.tensor(fits, device=row.device)
            fits = index[torch.topk(row[index], CANDIDATES).indices].tolist()
        return fits

    def _fitting(self, groups: dict[int, list[int]], firsts: list[int]) -> set[int]:
        """The tokens starting with one of `firsts` that continue the answer, as _fits judges them,
        found by walking each group's tokens in byte order: a byte the automaton refuses drops every
        token that goes on from it at once (after a space, tens of thousands), where trying each
        token stepped through its bytes (60 ms a step for a 49k vocabulary)."""
        room = self._whitespace_room()
        out: set[int] = set()

        def walk(keys: list[bytes], ids: list[int], lo: int, hi: int, depth: int, state: Any, blank: bool) -> None:
            # keys[lo:hi] share their first `depth` bytes, after which the automaton is at `state`;
            # `blank`: those bytes are all whitespace
            while lo < hi and len(keys[lo]) == depth:  # (the tokens that end here sort first)
                if not (blank and room is not None and depth > room):
                    out.add(ids[lo])
                lo += 1
            while lo < hi:
                b = keys[lo][depth]
                end = bisect.bisect_left(keys, keys[lo][:depth] + bytes([b + 1]), lo, hi) if b < 255 else hi
                after = self.automaton.step(state, b)
                if after is not None:
                    walk(keys, ids, lo, end, depth + 1, after, blank and b in WHITESPACE)
                lo = end

        for b in firsts:
            keys, ids = self._by_bytes(b, groups.get(b, []))
            walk(keys, ids, 0, len(keys), 1, self.automaton.step(self.state, b), b in WHITESPACE)
        return out

    def _by_bytes(self, first: int, group: list[int]) -> tuple[list[bytes], list[int]]:
        """A first byte's tokens sorted by their bytes, with the ids in the same order (built once)."""
        if first not in self._sorted:
            pairs = sorted((self._bytes(t), t) for t in group)
            self._sorted[first] = ([k for k, _ in pairs], [t for _, t in pairs])
        return self._sorted[first]

    def accept(self, token: int) -> None:
        """Follow the sampled token (one mask() allowed); one that breaks the answer ends it."""
        if self.reasoning is not None and self.reasoning.accept(token):
            return
        if (token in self._enders or token == self._end_token) and (self._may_end() or self._stuck):
            self._ended = True
            return
        data = self._bytes(token)
        state = self.automaton.advance(self.state, data) if not self._special(token) else None
        if state is None:
            log.warning("token %d does not continue the guided answer; ending it", token)
            self._ended = True
            return
        self.state = state
        spaces = all(b in WHITESPACE for b in data) and self.automaton.counts_whitespace(state)
        self._whitespace = self._whitespace + len(data) if spaces else 0
