"""Replay a multi-turn workload against an OpenAI-compatible server (`--url`), one asyncio task per session.

Each turn goes to /v1/chat/completions with the whole conversation (`api="chat"`), or to
/v1/responses with only the new message and the previous response's id (`api="responses"`: the
server keeps the conversation). TTFT is measured on the streamed response (first text); cached
tokens come from the usage (`cached_tokens_by_tier` when the server reports it, else all "host").
The chat template is the server's; compute time and tier budgets are unknown from outside.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from cachedattention.bench.metrics import TurnRecord
from cachedattention.bench.replay import ReplayResult, clamp_tiers, user_text
from cachedattention.bench.workload import Session, Turn, Workload


@dataclass(frozen=True)
class HttpTarget:
    url: str
    model: str | None = None  # a served model's name; None (or one the server lacks): its first model
    api_key: str = "EMPTY"
    timeout_s: float = 600.0
    api: str = "chat"  # "chat": /v1/chat/completions, the whole conversation; "responses": /v1/responses

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")

    @property
    def base_url(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


APIS = ("chat", "responses")


@dataclass
class _Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: dict[str, int]
    first_s: float | None
    finish_s: float
    response_id: str | None = None  # the Responses API's: the next turn continues it


def replay_http(
    target: HttpTarget,
    workload: Workload,
    system: str | None = None,
    time_scale: float = 1.0,
    text_seed: int | None = 0,
    progress: bool = True,
) -> ReplayResult:
    """Run every turn of `workload` against the server in real time; failed turns are counted, not recorded."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    try:
        import openai
    except ImportError as e:
        raise ValueError("--url needs the openai client: pip install openai") from e
    return asyncio.run(_replay(openai, target, workload, system or target.url, time_scale, text_seed, progress))


async def _replay(
    openai: Any, target: HttpTarget, workload: Workload, system: str, scale: float, seed: int | None, progress: bool
) -> ReplayResult:
    # no retries: a retried request would hide its failure and distort its latency
    client = openai.AsyncOpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0,
                                timeout=target.timeout_s)  # fmt: skip
    try:
        model = await _pick_model(client, target)
        records: list[TurnRecord] = []
        failed = [0]
        bar = tqdm(total=workload.num_turns, desc=system, unit="turn", file=sys.stderr, disable=not progress)
        t0 = time.perf_counter()
        try:
            await asyncio.gather(
                *(_session(client, model, target.api, s, t0, scale, seed, records, failed, bar) for s in workload.sessions)
            )
        finally:
            bar.close()
    finally:
        await client.close()
    wall_s = max((r.arrival_s + r.latency_s for r in records), default=0.0)
    return ReplayResult(system, records, wall_s, None, failed_turns=failed[0], stats={"model": model})


async def _pick_model(client: Any, target: HttpTarget) -> str:
    try:
        models = await client.models.list()
    except Exception as e:  # any transport or API error: the server is not usable
        raise ValueError(f"cannot list models at {target.url}: {e}") from e
    ids = [m.id for m in models.data]
    if not ids:
        raise ValueError(f"the server at {target.url} serves no model")
    if target.model in ids:
        return target.model
    if target.model is not None:  # e.g. a local path given for the in-process mode
        print(f"note: {target.url} does not serve {target.model!r}; using {ids[0]!r}", file=sys.stderr)
    return ids[0]


async def _session(
    client: Any,
    model: str,
    api: str,
    session: Session,
    t0: float,
    scale: float,
    seed: int | None,
    records: list[TurnRecord],
    failed: list[int],
    bar: tqdm,
) -> None:
    await asyncio.sleep(max(t0 + session.arrival_s * scale - time.perf_counter(), 0.0))
    messages: list[dict[str, str]] = []
    previous = None
    for index, turn in enumerate(session.turns):
        if index:
            await asyncio.sleep(turn.think_time_s * scale)
        messages.append({"role": "user", "content": user_text(session, index, seed)})
        arrival = time.perf_counter()
        try:
            if api == "responses":
                answer = await _respond(client, model, messages[-1]["content"], previous, turn)
                previous = answer.response_id
            else:
                answer = await _ask(client, model, session.session_id, messages, turn)
        except Exception as e:  # a failed turn ends its session: the rest of the conversation is unknowable
            print(f"error: session {session.session_id} turn {index}: {e}", file=sys.stderr)
            failed[0] += len(session.turns) - index
            bar.update(len(session.turns) - index)
            return
        messages.append({"role": "assistant", "content": answer.text})
        first = answer.first_s if answer.first_s is not None else answer.finish_s
        records.append(
            TurnRecord(
                session_id=session.session_id,
                turn_index=index,
                prompt_tokens=answer.prompt_tokens,
                cached_tokens=clamp_tiers(answer.cached, answer.prompt_tokens),
                generated_tokens=answer.completion_tokens,
                ttft_s=first - arrival,
                latency_s=answer.finish_s - arrival,
                arrival_s=arrival - t0,
            )
        )
        bar.update(1)


async def _ask(client: Any, model: str, session_id: str, messages: list[dict[str, str]], turn: Turn) -> _Answer:
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=turn.answer_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": session_id, "ignore_eos": True},
    )
    parts: list[str] = []
    first_s, usage = None, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
            if first_s is None:
                first_s = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    finish_s = time.perf_counter()
    if usage is None or not usage.prompt_tokens:
        raise ValueError("the server sent no usage (stream_options.include_usage); token counts are unknown")
    return _Answer("".join(parts), usage.prompt_tokens, usage.completion_tokens, _cached(usage), first_s, finish_s)


async def _respond(client: Any, model: str, text: str, previous: str | None, turn: Turn) -> _Answer:
    """One turn through the Responses API: the new message only; the server keeps the conversation."""
    stream = await client.responses.create(model=model, input=text, previous_response_id=previous,
                                           max_output_tokens=turn.answer_tokens, temperature=0.0, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    parts: list[str] = []
    first_s, final = None, None
    async for event in stream:
        if event.type == "response.output_text.delta" and event.delta:
            first_s = first_s or time.perf_counter()
            parts.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
        elif event.type in ("error", "response.failed"):
            raise ValueError(f"the server failed the response: {getattr(event, 'message', None) or event}")
    finish_s = time.perf_counter()
    if final is None or final.usage is None:
        raise ValueError("the server's response stream ended without its response and usage")
    usage = final.usage
    return _Answer("".join(parts), usage.input_tokens, usage.output_tokens,
                   _cached_details(usage.input_tokens_details), first_s, finish_s, final.id)  # fmt: skip


def _cached(usage: Any) -> dict[str, int]:
    return _cached_details(getattr(usage, "prompt_tokens_details", None))


def _cached_details(details: Any) -> dict[str, int]:
    if details is None:
        return {}
    by_tier = getattr(details, "cached_tokens_by_tier", None)  # this project's server reports the tiers
    if isinstance(by_tier, dict):
        return {k: int(v) for k, v in by_tier.items() if k in ("device", "host", "disk")}
    return {"host": int(getattr(details, "cached_tokens", 0) or 0)}  # tiers unknown: count them as host
