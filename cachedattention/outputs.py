"""What a finished (or streaming) request hands back: tokens, text and timing metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def empty_tiers() -> dict[str, int]:
    return {"device": 0, "host": 0, "disk": 0, "remote": 0}


@dataclass
class RequestMetrics:
    arrival_s: float
    scheduled_s: float | None = None  # first admitted into a running batch (the end of its queue wait)
    first_token_s: float | None = None
    last_token_s: float | None = None  # when its newest token was sampled
    token_gap_s: float | None = None  # from the token before to the newest (None before a second token)
    finish_s: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: dict[str, int] = field(default_factory=empty_tiers)
    load_s: float = 0.0  # time the forward waited for loaded KV (0 when fully overlapped)
    load_busy_s: float = 0.0  # the load's own duration (copy + rotate into pages), overlapped or not
    save_s: float = 0.0  # time the save thread spent saving this request's KV
    truncated_tokens: int = 0  # history tokens dropped by context-overflow truncation

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())

    def cached_details(self) -> dict[str, Any]:
        """The prompt's reuse as the server's usage reports it (chat's prompt_tokens_details, the
        Responses API's input_tokens_details): cached tokens, by tier, and the history this turn
        dropped because the session outgrew the window (a later turn reports 0)."""
        tiers = dict(self.cached_tokens)
        return {"cached_tokens": sum(tiers.values()), "cached_tokens_by_tier": tiers,
                "truncated_tokens": self.truncated_tokens}  # fmt: skip


@dataclass
class CompletionOutput:
    """One completion of a prompt, as vLLM's: `index` among the prompt's n (SamplingParams.n)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # the sum of its tokens' logprobs, when they were asked for
    logprobs: list | None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it, else None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    # "stop" | "length" | "abort" | "error" (this request's own step failed; logged) | None while running
    finish_reason: str | None
    metrics: RequestMetrics
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it, else None
    session_id: str | None = None
    new_token_ids: list[int] = field(default_factory=list)  # tokens added since the last output (streaming)
    # one per token in token_ids when SamplingParams.logprobs was set (sampling.TokenLogprob), else None
    logprobs: list | None = None
    # one per prompt token when SamplingParams.prompt_logprobs was set (None for the first token), else None
    prompt_logprobs: list | None = None
    prompt: str | None = None  # the prompt's text (a chat's rendered), None for token ids: as vLLM's
    completions: list[CompletionOutput] | None = None  # with n > 1, every choice (this output is the first)

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's view of the answer: the prompt's completions (this one alone unless n > 1), so that
        `out.outputs[0].text` reads as it does there."""
        return self.completions if self.completions is not None else [self.completion(0)]

    def completion(self, index: int) -> CompletionOutput:
        """This output as choice `index` of its prompt."""
        total = None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)
        return CompletionOutput(index, self.text, self.token_ids, total, self.logprobs, self.finish_reason,
                                self.stop_reason)  # fmt: skip

    @property
    def num_cached_tokens(self) -> int:
        """vLLM's: prompt tokens whose KV was reused (from the device or the store's tiers)."""
        return self.metrics.num_cached_tokens
