"""Replay a multi-turn workload against an in-process engine, on a wall clock, one record per turn.

Sessions arrive at `arrival_s` (x time_scale); a session's next turn arrives `think_time_s`
(x time_scale) after its previous answer finished. Each prompt is the chat-template rendering of
the whole conversation so far, with the model's actual answers as assistant messages, so the
KV reuse measured is real. One loop admits due turns and runs `engine.step()`: no threads.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cachedattention.bench.metrics import TIERS, TurnRecord
from cachedattention.bench.workload import Session, Workload, synthetic_text
from cachedattention.engine.engine import LLMEngine
from cachedattention.model.tokenizer import Tokenizer
from cachedattention.outputs import RequestOutput
from cachedattention.router.affinity import bounded_load_order, rendezvous_order
from cachedattention.router.replicas import DEFAULT_LOAD_FACTOR as ROUTER_LOAD_FACTOR
from cachedattention.sampling import SamplingParams

Messages = list[dict[str, str]]


@dataclass
class ReplayResult:
    system: str
    records: list[TurnRecord]
    wall_s: float
    compute_s: float | None  # summed engine.step() time ("GPU busy"); None when unknown (HTTP)
    failed_turns: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    remote_bytes: int = 0  # what the run's sessions take on a remote tier's server (billed as DRAM)


@dataclass
class _Conversation:
    index: int
    session: Session
    messages: Messages = field(default_factory=list)
    turn: int = 0
    due_s: float = 0.0  # when the next turn arrives, seconds after the replay started


def user_text(session: Session, index: int, seed: int | None) -> str:
    """The user message of a turn: its own text (ShareGPT), else filler seeded per (session, turn)."""
    turn = session.turns[index]
    if turn.user_text is not None:
        return turn.user_text
    # the same words for every system and every rerun of this workload
    return synthetic_text(turn.user_tokens, random.Random(f"{seed}:{session.session_id}:{index}"))


def template_overhead(tokenizer: Tokenizer) -> tuple[int, int]:
    """(tokens before the first user message, extra template tokens per user+assistant turn)."""
    one = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids1 = tokenizer.encode_chat(one, add_generation_prompt=False)
    ids2 = tokenizer.encode_chat(one + one, add_generation_prompt=False)
    per_turn = max(len(ids2) - len(ids1) - 2, 0)
    head = max(len(ids1) - 2 - per_turn, 0)
    return head, per_turn


def fit_prompt(tokenizer: Tokenizer, messages: Messages, budget: int, drop_history: bool) -> tuple[list[int], Messages]:
    """Render `messages` within `budget` tokens; returns the ids and the messages actually rendered.

    Systems without the store have no context truncation of their own, so with `drop_history`
    the oldest user/assistant pairs go (at least half of them at once, like the store's default
    drop fraction, so a long session does not re-truncate every turn). Any system: if the newest
    message alone is too long, only its end is kept.
    """
    msgs = list(messages)
    ids = tokenizer.encode_chat(msgs)
    if len(ids) <= budget:
        return ids, msgs
    first = 1 if msgs[0]["role"] == "system" else 0
    if drop_history:
        pairs = (len(msgs) - first - 1) // 2
        drop = math.ceil(pairs / 2)
        while drop <= pairs and len(ids) > budget:
            candidate = msgs[:first] + msgs[first + 2 * drop :]
            ids = tokenizer.encode_chat(candidate)
            if len(ids) <= budget or drop == pairs:
                msgs = candidate
            drop += 1
        if len(ids) <= budget:
            return ids, msgs
    # the newest message must fit on its own (the store keeps whatever history fits before it)
    alone = msgs[:first] + msgs[-1:]
    for _ in range(4):
        alone_ids = tokenizer.encode_chat(alone)
        if len(alone_ids) <= budget:
            break
        content = tokenizer.encode(alone[-1]["content"])
        keep = len(content) - (len(alone_ids) - budget) - 1
        if keep < 1:
            raise ValueError(
                f"a prompt does not fit the window even without history (budget {budget} tokens); raise --max-model-len"
            )
        alone[-1] = {"role": "user", "content": tokenizer.decode(content[-keep:])}
    msgs = msgs[:-1] + alone[-1:] if not drop_history else alone
    return tokenizer.encode_chat(msgs), msgs


def prompt_budget(max_model_len: int, answer_tokens: int) -> int:
    """Prompt tokens allowed so the answer fits; like the store, reserve at most a quarter of the window."""
    return max_model_len - min(answer_tokens, max_model_len // 4) - 1


def clamp_tiers(cached: dict[str, int], prompt_tokens: int) -> dict[str, int]:
    """Cached tokens per tier, at most the prompt in total.

    A preempted request is re-admitted with its generated tokens as part of its sequence, and the
    engine's counts then describe that re-admission; only prompt tokens count as prompt hits here.
    """
    out, room = {}, prompt_tokens
    for tier in TIERS:
        n = min(max(int(cached.get(tier, 0)), 0), room)
        out[tier] = n
        room -= n
    return out


def replay(
    engine: LLMEngine | Sequence[LLMEngine],
    workload: Workload,
    system: str,
    time_scale: float = 1.0,
    text_seed: int | None = 0,
    progress: bool = True,
    routing: str = "random",
) -> ReplayResult:
    """Run every turn of `workload` through `engine` in real time; returns one TurnRecord per turn.

    Given several engines (replicas), each turn goes to one drawn at random (`routing` "random":
    seeded, the same for every system; a load balancer that does not keep a conversation on one
    replica), or, with "affinity", to its session's replica as `cachedattention router` places it.
    They step in turn on this one machine."""
    engines = [engine] if isinstance(engine, LLMEngine) else list(engine)
    if any(e.tokenizer is None for e in engines):
        raise ValueError("the workload benchmark renders chat messages, so the model needs a tokenizer")
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    drop_history = engines[0].store is None  # store systems truncate by themselves (and reuse the KV)
    arrivals = [
        (s.arrival_s * time_scale, i, _Conversation(i, s, due_s=s.arrival_s * time_scale))
        for i, s in enumerate(workload.sessions)
    ]
    heapq.heapify(arrivals)
    active: dict[tuple[int, str], tuple[_Conversation, float]] = {}  # (replica, request id) -> turn
    records: list[TurnRecord] = []
    compute_s = 0.0
    bar = tqdm(total=workload.num_turns, desc=system, unit="turn", file=sys.stderr, disable=not progress)
    t0 = time.perf_counter()
    try:
        while arrivals or active:
            now = time.perf_counter() - t0
            while arrivals and arrivals[0][0] <= now:
                _, _, conv = heapq.heappop(arrivals)
                replica = _route(conv, len(engines), text_seed, routing, [sum(1 for r, _ in active if r == i)
                                                                          for i in range(len(engines))])
                rid = _submit(engines[replica], conv, text_seed, drop_history)
                active[replica, rid] = (conv, t0 + conv.due_s)
            if not active:
                time.sleep(max(arrivals[0][0] - (time.perf_counter() - t0), 0.0))
                continue
            stepped = [(replica, eng) for replica, eng in enumerate(engines) if eng.has_unfinished()]
            idle_before = sum(eng.idle_steps for _, eng in stepped)
            for replica, eng in stepped:
                start = time.perf_counter()
                outputs = eng.step(wait_when_idle=False)  # a replica waiting for KV must not hold up the others
                compute_s += time.perf_counter() - start
                for out in outputs:
                    if out.finished and (replica, out.request_id) in active:
                        if out.finish_reason == "error":  # a benchmark measures answers: never count a failed one
                            raise RuntimeError(f"request {out.request_id} failed in the engine (logged above)")
                        conv, arrival = active.pop((replica, out.request_id))
                        records.append(_record(conv, out, arrival, t0))
                        bar.update(1)
                        if _advance(conv, out, time_scale, t0):
                            heapq.heappush(arrivals, (conv.due_s, conv.index, conv))
            if stepped and sum(eng.idle_steps for _, eng in stepped) - idle_before == len(stepped):
                stepped[0][1].wait_idle()  # no replica could schedule anything: wait for a fetch, not in a spin
    finally:
        bar.close()
        for replica, rid in active:
            engines[replica].abort(rid)
    wall_s = max((r.arrival_s + r.latency_s for r in records), default=0.0)
    stats = engines[0].stats() if len(engines) == 1 else {"replicas": [e.stats() for e in engines]}
    return ReplayResult(system, records, wall_s, compute_s, stats=stats)


def _route(conv: _Conversation, replicas: int, seed: int | None, routing: str, in_flight: list[int]) -> int:
    """The replica a turn goes to: drawn per (session, turn), so every system sees the same routing;
    or the router's choice for its session id, given each replica's turns in flight."""
    if replicas == 1:
        return 0
    if routing == "affinity":
        names = [str(i) for i in range(replicas)]
        order = rendezvous_order(conv.session.session_id, names)
        return int(bounded_load_order(order, dict(zip(names, in_flight)), ROUTER_LOAD_FACTOR)[0])
    return random.Random(f"{seed}:route:{conv.session.session_id}:{conv.turn}").randrange(replicas)


def _submit(engine: LLMEngine, conv: _Conversation, text_seed: int | None, drop_history: bool) -> str:
    turn = conv.session.turns[conv.turn]
    conv.messages.append({"role": "user", "content": user_text(conv.session, conv.turn, text_seed)})
    budget = prompt_budget(engine.max_model_len, turn.answer_tokens)
    ids, conv.messages = fit_prompt(engine.tokenizer, conv.messages, budget, drop_history)
    head, tail, starts = engine.tokenizer.kept_lengths(conv.messages, ids)
    params = SamplingParams(max_tokens=turn.answer_tokens, temperature=0.0, ignore_eos=True)
    return engine.add_request(ids, params, session_id=conv.session.session_id, head_tokens=head, tail_tokens=tail,
                              turn_starts=starts)


def _record(conv: _Conversation, out: RequestOutput, arrival: float, t0: float) -> TurnRecord:
    m = out.metrics
    # TTFT from the turn's scheduled arrival: waiting for the current step to end is queueing delay too
    first = m.first_token_s if m.first_token_s is not None else m.finish_s
    return TurnRecord(
        session_id=conv.session.session_id,
        turn_index=conv.turn,
        prompt_tokens=m.prompt_tokens,
        cached_tokens=clamp_tiers(m.cached_tokens, m.prompt_tokens),
        generated_tokens=len(out.token_ids),
        ttft_s=max(first - arrival, 0.0),
        latency_s=max(m.finish_s - arrival, first - arrival, 0.0),
        arrival_s=arrival - t0,
        queue_s=None if m.scheduled_s is None else min(max(m.scheduled_s - arrival, 0.0), max(first - arrival, 0.0)),
    )


def _advance(conv: _Conversation, out: RequestOutput, time_scale: float, t0: float) -> bool:
    """Append the answer; schedule the next turn. False when the session has no turns left."""
    conv.messages.append({"role": "assistant", "content": out.text})
    conv.turn += 1
    if conv.turn >= len(conv.session.turns):
        return False
    conv.due_s = out.metrics.finish_s - t0 + conv.session.turns[conv.turn].think_time_s * time_scale
    return True
