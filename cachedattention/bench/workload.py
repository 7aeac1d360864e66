"""Multi-turn conversation workloads: synthetic (ShareGPT-like) or loaded from ShareGPT JSON.

A workload is a list of sessions; each session arrives once (Poisson process) and then
sends its turns one after another, pausing `think_time_s` after each answer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Turn:
    """One user message and the answer to it.

    `user_tokens` counts only this turn's new message; the engine prepends the history.
    `think_time_s` is the pause between the previous answer and this message (0 for turn 0).
    With ShareGPT text, the token counts are estimates unless a tokenizer was given.
    """

    user_tokens: int
    answer_tokens: int
    think_time_s: float
    user_text: str | None = None
    answer_text: str | None = None

    def __post_init__(self) -> None:
        if self.user_tokens < 1 or self.answer_tokens < 1:
            raise ValueError(
                f"turn needs >= 1 user and answer token, got {self.user_tokens}/{self.answer_tokens}"
            )
        if not self.think_time_s >= 0:  # also rejects NaN
            raise ValueError(f"think_time_s must be >= 0, got {self.think_time_s}")


@dataclass(frozen=True)
class Session:
    session_id: str
    arrival_s: float
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so sessions stay immutable and hashable.
        object.__setattr__(self, "turns", tuple(self.turns))
        if not self.turns:
            raise ValueError(f"session {self.session_id!r} has no turns")
        if not self.arrival_s >= 0:
            raise ValueError(
                f"session {self.session_id!r}: arrival_s must be >= 0, got {self.arrival_s}"
            )


@dataclass(frozen=True)
class Workload:
    sessions: tuple[Session, ...]
    seed: int | None
    source: str
    skipped: int = 0  # malformed source entries dropped while loading

    def __post_init__(self) -> None:
        object.__setattr__(self, "sessions", tuple(self.sessions))
        ids = [s.session_id for s in self.sessions]
        if len(set(ids)) != len(ids):
            raise ValueError("workload has duplicate session ids")

    @property
    def num_sessions(self) -> int:
        return len(self.sessions)

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    @property
    def mean_turns(self) -> float:
        return self.num_turns / self.num_sessions if self.sessions else 0.0

    @property
    def total_user_tokens(self) -> int:
        return sum(t.user_tokens for s in self.sessions for t in s.turns)

    @property
    def total_answer_tokens(self) -> int:
        return sum(t.answer_tokens for s in self.sessions for t in s.turns)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        try:
            sessions = tuple(
                Session(
                    s["session_id"],
                    s["arrival_s"],
                    tuple(Turn(**t) for t in s["turns"]),
                )
                for s in data["sessions"]
            )
            return cls(sessions, data["seed"], data["source"], data.get("skipped", 0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a serialized Workload: {e!r}") from e

    def to_json(self, path: str | Path) -> None:
        # json writes floats with repr(), so from_json gives back the identical workload.
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> Workload:
        return cls.from_dict(_read_json(path, dict, "a JSON object with 'sessions'"))


@dataclass(frozen=True)
class WorkloadSpec:
    """Synthetic workload parameters. Defaults approximate ShareGPT conversations.

    Lengths are log-normal (given by median and sigma of the log), then multiplied by
    `scale`, rounded and clipped to [min, max]. Turns per session are geometric on
    {1, 2, ...} with mean `mean_turns`. Use `scale`/`max_*_tokens` for short CPU runs.
    """

    num_sessions: int = 100
    mean_turns: float = 5.75
    max_turns: int = 64
    user_median_tokens: float = 70.0
    user_sigma: float = 1.0
    answer_median_tokens: float = 180.0
    answer_sigma: float = 0.8
    min_user_tokens: int = 1
    max_user_tokens: int = 2048
    min_answer_tokens: int = 1
    max_answer_tokens: int = 2048
    scale: float = 1.0
    session_rate: float = 1.0  # sessions per second (Poisson arrivals)
    mean_think_time_s: float = 10.0  # exponential; 0 means no pause
    seed: int | None = 0
    with_text: bool = False  # attach synthetic_text() so a real model can be driven

    def __post_init__(self) -> None:
        checks = [
            (self.num_sessions >= 1, "num_sessions must be >= 1"),
            (
                self.mean_turns >= 1,
                "mean_turns must be >= 1 (every session has a turn)",
            ),
            (self.max_turns >= 1, "max_turns must be >= 1"),
            (
                self.user_median_tokens > 0 and self.answer_median_tokens > 0,
                "medians must be > 0",
            ),
            (self.user_sigma >= 0 and self.answer_sigma >= 0, "sigmas must be >= 0"),
            (
                1 <= self.min_user_tokens <= self.max_user_tokens,
                "need 1 <= min_user_tokens <= max_user_tokens",
            ),
            (
                1 <= self.min_answer_tokens <= self.max_answer_tokens,
                "need 1 <= min_answer_tokens <= max_answer_tokens",
            ),
            (self.scale > 0, "scale must be > 0"),
            (self.session_rate > 0, "session_rate must be > 0 sessions/s"),
            (self.mean_think_time_s >= 0, "mean_think_time_s must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"WorkloadSpec: {message} ({self})")

    @classmethod
    def quick(cls, num_sessions: int = 8, seed: int | None = 0) -> WorkloadSpec:
        """Short turns and pauses for a CPU smoke run."""
        return cls(
            num_sessions=num_sessions,
            scale=0.2,
            max_user_tokens=32,
            max_answer_tokens=16,
            session_rate=4.0,
            mean_think_time_s=0.2,
            seed=seed,
            with_text=True,
        )


def generate_workload(spec: WorkloadSpec) -> Workload:
    """Draw a reproducible synthetic workload (same spec and seed, same workload)."""
    rng = random.Random(spec.seed)
    # Text gets its own stream so with_text=True does not change any token count or time.
    text_rng = random.Random(None if spec.seed is None else f"text:{spec.seed}")
    arrival = 0.0
    sessions = []
    for i in range(spec.num_sessions):
        arrival += rng.expovariate(spec.session_rate)
        turns = []
        for j in range(_geometric(rng, spec.mean_turns, spec.max_turns)):
            user = _lognormal_tokens(
                rng,
                spec.user_median_tokens * spec.scale,
                spec.user_sigma,
                spec.min_user_tokens,
                spec.max_user_tokens,
            )
            answer = _lognormal_tokens(
                rng,
                spec.answer_median_tokens * spec.scale,
                spec.answer_sigma,
                spec.min_answer_tokens,
                spec.max_answer_tokens,
            )
            think = 0.0 if j == 0 else _think_time(rng, spec.mean_think_time_s)
            user_text = synthetic_text(user, text_rng) if spec.with_text else None
            answer_text = synthetic_text(answer, text_rng) if spec.with_text else None
            turns.append(Turn(user, answer, think, user_text, answer_text))
        sessions.append(Session(f"s{i:06d}", arrival, tuple(turns)))
    return Workload(tuple(sessions), spec.seed, "synthetic")


def load_sharegpt(
    path: str | Path,
    max_sessions: int | None = None,
    tokens_per_char: float = 0.25,
    tokenizer: Callable[[str], int | Sequence[int]] | None = None,
    spec: WorkloadSpec | None = None,
) -> Workload:
    """Read ShareGPT JSON (`[{"id", "conversations": [{"from", "value"}, ...]}, ...]`).

    Each human message followed by a gpt message becomes a turn; system messages are
    folded into the next human message. Entries without a usable pair are skipped and
    counted in `Workload.skipped`. Token counts use `tokenizer` (returning a count or a
    list of ids) if given, else `len(text) * tokens_per_char`. Arrivals and think times
    come from `spec` (seeded), as for synthetic workloads.
    """
    if max_sessions is not None and max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1 or None, got {max_sessions}")
    if tokenizer is None and not tokens_per_char > 0:
        raise ValueError(f"tokens_per_char must be > 0, got {tokens_per_char}")
    spec = spec or WorkloadSpec()
    data = _read_json(path, list, "a JSON list of ShareGPT conversations")

    def count(text: str) -> int:
        if tokenizer is None:
            return max(1, round(len(text) * tokens_per_char))
        out = tokenizer(text)
        return max(1, out if isinstance(out, int) else len(out))

    conversations: list[tuple[str, list[tuple[str, str]]]] = []
    skipped = 0
    seen: set[str] = set()
    for index, entry in enumerate(data):
        if max_sessions is not None and len(conversations) >= max_sessions:
            break
        pairs = _sharegpt_pairs(entry)
        if not pairs:
            skipped += 1
            continue
        raw_id = entry.get("id")
        session_id = (
            raw_id if isinstance(raw_id, str) and raw_id else f"sharegpt-{index}"
        )
        while session_id in seen:  # real dumps repeat ids
            session_id += "+"
        seen.add(session_id)
        conversations.append((session_id, pairs))

    rng = random.Random(spec.seed)
    arrival = 0.0
    sessions = []
    for session_id, pairs in conversations:
        arrival += rng.expovariate(spec.session_rate)
        turns = tuple(
            Turn(
                count(user),
                count(answer),
                0.0 if j == 0 else _think_time(rng, spec.mean_think_time_s),
                user,
                answer,
            )
            for j, (user, answer) in enumerate(pairs)
        )
        sessions.append(Session(session_id, arrival, turns))
    return Workload(tuple(sessions), spec.seed, f"sharegpt:{Path(path).name}", skipped)


# Common short English words; most are a single token (with leading space) in BPE vocabularies.
_WORD_LIST = (
    "the of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very"
)
_WORDS = tuple(_WORD_LIST.split())


def synthetic_text(num_tokens: int, rng: random.Random) -> str:
    """Deterministic filler of about `num_tokens` tokens (one common word per token)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return " ".join(rng.choice(_WORDS) for _ in range(num_tokens))


def _sharegpt_pairs(entry: Any) -> list[tuple[str, str]]:
    """(user, answer) texts of one ShareGPT entry; [] if it is malformed or has no pair."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return []
    pairs: list[tuple[str, str]] = []
    pending: list[str] = []  # system/human text waiting for an answer
    for message in entry["conversations"]:
        if not isinstance(message, dict):
            return []
        role, text = message.get("from"), message.get("value")
        if not isinstance(text, str):
            return []
        if role in ("system", "human", "user"):
            pending.append(text)
        elif role in ("gpt", "assistant", "chatgpt"):
            if pending:  # an answer with nothing to answer (e.g. a leading gpt message) is dropped
                pairs.append(("\n".join(pending), text))
                pending = []
        else:
            return []
    return pairs


def _read_json(path: str | Path, expected: type, what: str) -> Any:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(data, expected):
        # A malformed file, not a wrong argument type: ValueError like the decode error above.
        raise ValueError(f"{path}: expected {what}, got JSON {type(data).__name__}")  # noqa: TRY004
    return data


def _geometric(rng: random.Random, mean: float, cap: int) -> int:
    """Geometric on {1, 2, ...} with the given mean (inverse CDF), capped at `cap`."""
    if mean == 1:
        return 1
    u = 1.0 - rng.random()  # in (0, 1], so log is finite
    return min(cap, 1 + int(math.log(u) / math.log(1.0 - 1.0 / mean)))


def _lognormal_tokens(
    rng: random.Random, median: float, sigma: float, lo: int, hi: int
) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def _think_time(rng: random.Random, mean_s: float) -> float:
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0
