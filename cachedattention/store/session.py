"""A conversation's record in the store: its tokens, which of them truncation dropped, and where their KV lives.

The record keeps the conversation's *logical* tokens (as the client renders it) and a
truncation state: logical tokens [head, dropped_until) were dropped on context overflow.
The *effective* tokens (what the model attends to) are logical[:head] + logical[dropped_until:],
and `spans` hold the pre-RoPE KV of every effective token, in order, as slices of segments.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ANON_PREFIX = "anon-"  # keys of records of requests without a session id (clients may not use it)
# an earlier branch of a session, kept beside its record: SESSION + BRANCH_SEP + a suffix (a session
# id may not hold the separator, a control character)
BRANCH_SEP = "\x1f"


# a session (or an anonymous prefix) of requests with a cache salt (vLLM's cache_salt): KEY + SALT_SEP +
# the salt's digest, so that another salt's requests never reuse (or learn of) its KV
SALT_SEP = "\x1e"


def salt_tag(cache_salt: str | None) -> str:
    """What the keys of a salt's sessions and anonymous prefixes end with: SALT_SEP and the salt's
    digest ("" without a salt)."""
    return "" if cache_salt is None else f"{SALT_SEP}{hashlib.sha256(cache_salt.encode()).hexdigest()[:32]}"


def key_salt_tag(key: str) -> str:
    """The salt tag a record's key carries ("" for an unsalted one's)."""
    at = key.find(SALT_SEP)
    return key[at:] if at >= 0 else ""


def session_key(session_id: str | None, cache_salt: str | None) -> str | None:
    """The key the store and the device prefix cache know a session by: its id, salted if it has a salt."""
    return None if session_id is None else session_id + salt_tag(cache_salt)


def branch_of(key: str) -> str | None:
    """The session a branch record's key belongs to; None for a session's (or a prefix's) own key."""
    return key.split(BRANCH_SEP, 1)[0] if BRANCH_SEP in key and not key.startswith(ANON_PREFIX) else None


@dataclass(frozen=True)
class Span:
    """Tokens [lo, hi) of one stored segment."""

    seg_id: str
    lo: int
    hi: int

    @property
    def length(self) -> int:
        return self.hi - self.lo


@dataclass
class SessionRecord:
    key: str
    logical: list[int]
    spans: list[Span] = field(default_factory=list)
    head: int = 0
    dropped_until: int = 0  # == head when nothing was dropped
    stamp: float = field(default_factory=time.time)  # wall time of the turn that wrote it (newest wins remotely)

    @property
    def effective(self) -> list[int]:
        return self.logical[: self.head] + self.logical[self.dropped_until :]

    @property
    def num_kv(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def truncated(self) -> bool:
        return self.dropped_until > self.head

    def segment_ids(self) -> list[str]:
        return list(dict.fromkeys(s.seg_id for s in self.spans))

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "logical": self.logical,
            "head": self.head,
            "dropped_until": self.dropped_until,
            "spans": [[s.seg_id, s.lo, s.hi] for s in self.spans],
            "stamp": self.stamp,
        }

    @classmethod
    def from_json(cls, d: dict) -> SessionRecord:
        """A record from `to_json`'s form; ValueError if it is not one (a remote store's values are
        shared with other processes: nothing in them is taken on trust)."""
        try:
            logical, spans = d["logical"], d["spans"]
            head, dropped, stamp = d["head"], d["dropped_until"], d.get("stamp", 0.0)
            ok = (
                isinstance(d["key"], str) and isinstance(logical, list) and isinstance(spans, list)
                and all(type(t) is int and t >= 0 for t in logical)
                and type(head) is int and type(dropped) is int and 0 <= head <= dropped <= len(logical)
                and isinstance(stamp, (int, float))
                and all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], str)
                        and type(s[1]) is int and type(s[2]) is int and 0 <= s[1] < s[2] for s in spans)
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a session record ({e!r})") from e
        if not ok:
            raise ValueError("not a session record (a field has the wrong type or is out of range)")
        rec = cls(d["key"], logical, [Span(*s) for s in spans], head, dropped, float(stamp))
        if rec.num_kv > len(rec.effective):
            raise ValueError(f"not a session record: KV of {rec.num_kv} tokens for {len(rec.effective)} tokens")
        return rec


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def spans_while(spans: Sequence[Span], held: Callable[[str], bool]) -> list[Span]:
    """The spans up to the first whose segment is not `held` (what can still be served, in order)."""
    out = []
    for s in spans:
        if not held(s.seg_id):
            break
        out.append(s)
    return out


def slice_spans(spans: Sequence[Span], lo: int, hi: int) -> list[Span]:
    """The spans covering effective tokens [lo, hi)."""
    out, pos = [], 0
    for s in spans:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Span(s.seg_id, s.lo + a - pos, s.lo + b - pos))
        pos += s.length
    return out


def drop_range(spans: Sequence[Span], lo: int, hi: int) -> list[Span]:
    """Spans without effective tokens [lo, hi): what truncation keeps."""
    total = sum(s.length for s in spans)
    return slice_spans(spans, 0, lo) + slice_spans(spans, hi, total)


@dataclass(frozen=True)
class TurnPlan:
    """How one request relates to its session's record."""

    effective_prompt: list[int]  # what the model computes over
    reuse: list[Span]  # stored KV of effective tokens [0, hit)
    head: int
    dropped_until: int
    truncated_now: int  # history tokens dropped by this turn's truncation
    # the first effective position whose KV may differ from a computation of the effective prompt
    # alone (after a cut whose kept history's KV is reused, computed before it); None if none may
    inexact_from: int | None = None
    # when the turn was planned: its record's stamp, so that a turn begun before a forgetting (or
    # before another replica's later turn) never replaces it, however late it ends
    planned_at: float = field(default_factory=time.time)
    source: str | None = None  # the key of the record the reused KV comes from (the look-ahead fetches it)

    @property
    def hit(self) -> int:
        return sum(s.length for s in self.reuse)


def plan_turn(
    record: SessionRecord | None,
    prompt: list[int],
    window: int,
    reserve: int,
    head_hint: int,
    drop_fraction: float,
    mode: str,
    tail: int = 0,
    turn_starts: Sequence[int] = (),
) -> TurnPlan:
    """Match the new prompt against the record and truncate if it overflows the window: drop
    history after the head, never the prompt's last `tail` tokens (the newest turn) nor its last token.
    The cut ends at the turn start (`turn_starts`: where the prompt's user messages begin, their
    content) nearest to the share of the history it would drop, among those that make the prompt
    fit, so that what it keeps reads as a conversation; at a token if none does (a plain prompt).

    mode: "reuse" keeps the retained pre-RoPE KV at its new positions; "recompute" is the
    baseline that truncates tokens but recomputes the shifted history; "off" never truncates
    (a record's earlier truncation still applies to the history it dropped); "whole" serves the
    prompt whole: no truncation, a record's earlier one neither. In every mode an edited (or
    regenerated) prompt that fits the window whole is served whole, as a plain server would.
    """
    head, dropped = head_hint, head_hint
    reuse: list[Span] = []
    eff_lcp = 0  # effective tokens shared with the record: the history part of this prompt
    limit = window - reserve
    if record is not None:
        lcp = common_prefix(record.logical, prompt)
        if lcp < max(record.head, head_hint):
            # the prompt differs inside the recorded head or its own (a new system prompt): its own head
            # applies; a cut record's KV past its head sits at other positions, so none of it is reused
            eff_lcp = min(lcp, record.head) if record.truncated else lcp
        elif record.truncated and (lcp < record.dropped_until or mode == "whole" or record.dropped_until > len(prompt) - tail
                                   or (lcp < len(record.logical) and len(prompt) <= limit)):  # fmt: skip
            # the client edited history inside the dropped part (or wants it whole, or the cut reaches
            # into this prompt's newest turn: an answer regenerated, or edited the conversation so that
            # it fits whole now): only the head still matches
            head = dropped = record.head
            eff_lcp = head
        elif record.truncated:
            head, dropped = record.head, record.dropped_until
            eff_lcp = lcp if lcp <= head else head + lcp - dropped
        else:  # nothing was cut: a longer head of this prompt's own is kept whole too
            head = dropped = max(record.head, head_hint)
            eff_lcp = lcp
        reuse = slice_spans(record.spans, 0, min(eff_lcp, record.num_kv))
    effective = prompt[:head] + prompt[dropped:]
    truncated_now = 0
    droppable = len(effective) - head - max(tail, 1)
    if mode not in ("off", "whole") and len(effective) > limit and droppable > 0:
        history = max(eff_lcp - head, 0)
        need = len(effective) - limit
        # drop a share of the history (not just what overflows) so the next turns do not re-truncate
        drop = min(droppable, max(need, int(history * drop_fraction + 0.5)))
        new_dropped = _turn_start_near(turn_starts, dropped + need, dropped + drop, dropped + droppable)
        drop = truncated_now = new_dropped - dropped
        hit = sum(s.length for s in reuse)
        if mode == "reuse":
            reuse = drop_range(reuse, head, min(head + drop, hit)) if hit > head else reuse
        else:  # recompute baseline: positions shift, so nothing after the head is reusable
            reuse = slice_spans(reuse, 0, min(head, hit))
        dropped = new_dropped
        effective = prompt[:head] + prompt[dropped:]
    # (the recompute baseline's cut now recomputes all after the head; a cut record continued may hold
    # KV from before its cut, whichever mode cut it)
    inexact = head if dropped > head and not (mode == "recompute" and truncated_now) else None
    return TurnPlan(effective, reuse, head, dropped, truncated_now, inexact,
                    source=record.key if record is not None else None)  # fmt: skip


def _turn_start_near(turn_starts: Sequence[int], lowest: int, target: int, highest: int) -> int:
    """Where a cut ends: the turn start in [lowest, highest] nearest to `target` (the later one of
    two as near); `target` if there is none."""
    fits = [t for t in turn_starts if lowest <= t <= highest]
    return min(fits, key=lambda t: (abs(t - target), -t)) if fits else target
