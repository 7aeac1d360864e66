"""Multi-turn traces for the simulator, and the adapter from benchmark workloads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the simulator does not need the bench package at import time
    from cachedattention.bench.workload import Workload


@dataclass(frozen=True)
class TraceTurn:
    """One turn of one session.

    `history_tokens`: tokens the session had stored before this turn (0 for its first);
    `new_tokens`: the user input plus the answer this turn adds.
    """

    session_id: str
    arrival_s: float
    history_tokens: int
    new_tokens: int
    turn_index: int = 0
    think_s: float = 0.0  # user's pause after the previous answer (closed-loop replay)

    def __post_init__(self) -> None:
        if self.history_tokens < 0 or self.new_tokens < 1:
            raise ValueError(
                f"turn of {self.session_id!r}: need history_tokens >= 0 and new_tokens >= 1, "
                f"got {self.history_tokens}/{self.new_tokens}"
            )
        if not (self.arrival_s >= 0 and self.think_s >= 0):  # also rejects NaN
            raise ValueError(
                f"turn of {self.session_id!r}: arrival_s and think_s must be >= 0, got {self.arrival_s}/{self.think_s}"
            )


def trace_from_workload(workload: Workload, turn_latency_s: float = 1.0) -> list[TraceTurn]:
    """Flatten a workload into turns sorted by arrival.

    Turn k arrives at the session's arrival + the think times of turns 1..k + k nominal
    turn latencies (the answer time the trace assumes; used by open-loop replay). Each
    turn also keeps its think time, so a closed-loop replay can send turn k that long
    after turn k-1 actually ended. History is the user + answer tokens of earlier turns.
    """
    if not turn_latency_s >= 0:
        raise ValueError(f"turn_latency_s must be >= 0, got {turn_latency_s}")
    turns: list[TraceTurn] = []
    for session in workload.sessions:
        arrival, history = session.arrival_s, 0
        for k, turn in enumerate(session.turns):
            if k:
                arrival += turn.think_time_s + turn_latency_s
            new = turn.user_tokens + turn.answer_tokens
            turns.append(TraceTurn(session.session_id, arrival, history, new, k, turn.think_time_s))
            history += new
    return sort_trace(turns)


def sort_trace(turns: Iterable[TraceTurn]) -> list[TraceTurn]:
    """Arrival order; ties by session then turn, so replays are deterministic."""
    return sorted(turns, key=lambda t: (t.arrival_s, t.session_id, t.turn_index))


def trace_kv_bytes(trace: Iterable[TraceTurn], bytes_per_token: int) -> int:
    """KV volume of the trace: every session's final size (what an unbounded store holds)."""
    final: dict[str, int] = {}
    for t in trace:
        final[t.session_id] = max(final.get(t.session_id, 0), t.history_tokens + t.new_tokens)
    return sum(final.values()) * bytes_per_token
