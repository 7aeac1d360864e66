"""Per-turn records from a benchmark run and their summary per serving system.

Definitions (all sums are over turns):
  prefill throughput = prompt tokens / prefill seconds; a turn's prefill seconds is its
      measured prefill compute time if known, else its TTFT. Cached tokens count as
      prompt tokens, so reusing KV caches shows up as higher throughput.
  decode throughput  = (generated tokens - 1 per turn) / (latency - TTFT) seconds.
  hit rate           = cached prompt tokens / prompt tokens; the per-tier rates use the
      same denominator, so they add up to the hit rate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cachedattention.bench.cost import (
    DEFAULT_PRICES,
    CostBreakdown,
    Prices,
    serving_cost,
)

TIERS = ("device", "host", "disk", "remote")
# Prefill and TTFT may come from different timer reads; allow that much disagreement.
_CLOCK_SLACK_S = 1e-6


@dataclass
class TurnRecord:
    session_id: str
    turn_index: int  # 0-based position of the turn within its session
    prompt_tokens: int  # full prompt: history + new user message
    cached_tokens: dict[
        str, int
    ]  # tier -> prompt tokens whose KV was reused; missing tier = 0
    generated_tokens: int
    ttft_s: float
    latency_s: float  # arrival of the turn to its last token
    prefill_s: float | None = None  # prefill compute time; None = unknown, use ttft_s
    arrival_s: float = 0.0
    queue_s: float | None = None  # arrival to first admission (part of ttft_s); None = unknown (HTTP)

    @property
    def prefill_time_s(self) -> float:
        return self.ttft_s if self.prefill_s is None else self.prefill_s

    @property
    def decode_time_s(self) -> float:
        return self.latency_s - self.ttft_s

    @property
    def total_cached(self) -> int:
        return sum(self.cached_tokens.values())


@dataclass(frozen=True)
class SystemSummary:
    system: str
    num_sessions: int
    num_turns: int
    wall_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    # Turns >= 2 (turn_index >= 1), where history reuse matters; None if there are none.
    ttft_later_mean_s: float | None
    ttft_later_p50_s: float | None
    ttft_later_p90_s: float | None
    ttft_later_p99_s: float | None
    ttft_by_turn: dict[int, float]  # turn_index -> mean TTFT
    queue_later_mean_s: float | None  # of ttft_later_mean_s, the wait to be admitted; None if unknown
    latency_mean_s: float
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    compute_s: float
    hit_rate: float
    hit_rate_by_tier: dict[str, float]
    cost: CostBreakdown

    @property
    def cost_usd(self) -> float:
        return self.cost.total_usd

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict (turn indices become string keys)."""
        data = asdict(self)
        data["ttft_by_turn"] = {str(k): v for k, v in self.ttft_by_turn.items()}
        cost = data.pop("cost")
        data.update(
            cost_usd=self.cost_usd,
            gpu_usd=cost["gpu_usd"],
            dram_usd=cost["dram_usd"],
            ssd_usd=cost["ssd_usd"],
        )
        return data


def check_consistency(records: Sequence[TurnRecord]) -> None:
    """Raise ValueError naming the first record that cannot come from a correct run."""
    seen: set[tuple[str, int]] = set()
    for r in records:
        where = f"record {r.session_id!r} turn {r.turn_index}"
        key = (r.session_id, r.turn_index)
        if key in seen:
            raise ValueError(f"{where}: duplicate (session_id, turn_index)")
        seen.add(key)
        if r.turn_index < 0:
            raise ValueError(f"{where}: turn_index must be >= 0")
        if unknown := set(r.cached_tokens) - set(TIERS):
            raise ValueError(
                f"{where}: unknown cache tiers {sorted(unknown)}, expected {TIERS}"
            )
        if any(v < 0 for v in r.cached_tokens.values()):
            raise ValueError(f"{where}: negative cached tokens {r.cached_tokens}")
        if r.prompt_tokens < 1 or r.generated_tokens < 0:
            raise ValueError(
                f"{where}: prompt_tokens must be >= 1 and generated_tokens >= 0"
            )
        if r.queue_s is not None and not 0 <= r.queue_s <= r.ttft_s + _CLOCK_SLACK_S:
            raise ValueError(f"{where}: need 0 <= queue_s ({r.queue_s}) <= ttft_s ({r.ttft_s})")
        if r.total_cached > r.prompt_tokens:
            raise ValueError(
                f"{where}: cached {r.total_cached} > prompt {r.prompt_tokens} tokens"
            )
        if not 0 <= r.ttft_s <= r.latency_s:
            raise ValueError(
                f"{where}: need 0 <= ttft_s ({r.ttft_s}) <= latency_s ({r.latency_s})"
            )
        if not 0 <= r.prefill_time_s <= r.ttft_s + _CLOCK_SLACK_S:
            raise ValueError(
                f"{where}: need 0 <= prefill_s ({r.prefill_s}) <= ttft_s ({r.ttft_s})"
            )


def summarize(
    records: Sequence[TurnRecord],
    wall_s: float,
    system_name: str,
    *,
    compute_s: float | None = None,
    host_bytes: float = 0.0,
    disk_bytes: float = 0.0,
    prices: Prices = DEFAULT_PRICES,
) -> SystemSummary:
    """Summarize one system's run.

    `compute_s` is GPU busy time for the cost; by default the sum of per-turn prefill and
    decode time, exact for one-at-a-time serving and an upper bound under batching.
    `host_bytes`/`disk_bytes` are the provisioned cache capacities billed for `wall_s`.
    """
    if not records:
        raise ValueError(f"summarize({system_name!r}): no records")
    if not wall_s > 0:
        raise ValueError(
            f"summarize({system_name!r}): wall_s must be > 0, got {wall_s}"
        )
    check_consistency(records)

    ttft = np.array([r.ttft_s for r in records])
    later = np.array([r.ttft_s for r in records if r.turn_index >= 1])
    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in records:
        by_turn[r.turn_index].append(r.ttft_s)

    prompt = sum(r.prompt_tokens for r in records)
    tier_tokens = {t: sum(r.cached_tokens.get(t, 0) for r in records) for t in TIERS}
    cached = sum(tier_tokens.values())
    generated = sum(r.generated_tokens for r in records)
    prefill_s = sum(r.prefill_time_s for r in records)
    decode_s = sum(r.decode_time_s for r in records)
    # The first generated token is produced by prefill and counted in TTFT.
    decode_tokens = sum(max(r.generated_tokens - 1, 0) for r in records)
    compute = prefill_s + decode_s if compute_s is None else compute_s

    queued = [r.queue_s for r in records if r.turn_index >= 1 and r.queue_s is not None]
    mean, p50, p90, p99 = _stats(ttft)
    later_mean, later_p50, later_p90, later_p99 = (
        _stats(later) if later.size else (None,) * 4
    )
    return SystemSummary(
        system=system_name,
        num_sessions=len({r.session_id for r in records}),
        num_turns=len(records),
        wall_s=wall_s,
        ttft_mean_s=mean,
        ttft_p50_s=p50,
        ttft_p90_s=p90,
        ttft_p99_s=p99,
        ttft_later_mean_s=later_mean,
        ttft_later_p50_s=later_p50,
        ttft_later_p90_s=later_p90,
        ttft_later_p99_s=later_p99,
        ttft_by_turn={k: float(np.mean(v)) for k, v in sorted(by_turn.items())},
        queue_later_mean_s=float(np.mean(queued)) if queued else None,
        latency_mean_s=float(np.mean([r.latency_s for r in records])),
        prompt_tokens=prompt,
        cached_tokens=cached,
        generated_tokens=generated,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_tok_s=_rate(prompt, prefill_s),
        decode_tok_s=_rate(decode_tokens, decode_s),
        compute_s=compute,
        hit_rate=cached / prompt,
        hit_rate_by_tier={t: n / prompt for t, n in tier_tokens.items()},
        cost=serving_cost(compute, host_bytes, disk_bytes, wall_s, prices),
    )


def _stats(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, p50, p90, p99 (linear interpolation between order statistics)."""
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return float(values.mean()), float(p50), float(p90), float(p99)


def _rate(tokens: int, seconds: float) -> float:
    # 0 instead of inf/NaN keeps the JSON valid; it only happens for zero-length phases.
    return tokens / seconds if seconds > 0 else 0.0
