"""A request's state as it moves waiting -> running -> finished (possibly preempted on the way)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from cachedattention.engine.detokenizer import IncrementalDetokenizer
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.lora.adapter import LoRAAdapter
from cachedattention.outputs import RequestMetrics
from cachedattention.sampling import SamplingParams, TokenLogprob
from cachedattention.store.session import session_key


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]  # what the model computes over (after any truncation)
    params: SamplingParams
    metrics: RequestMetrics
    session_id: str | None = None
    # what its KV is keyed by: vLLM's cache_salt (only requests of the same salt share cached KV), with
    # its LoRA adapter's fingerprint folded in when it has one (lora.registry.kv_salt)
    cache_salt: str | None = None
    lora: LoRAAdapter | None = None  # the LoRA adapter it runs with (None: the base model)
    logical_prompt: list[int] | None = None  # the conversation as sent, before truncation (store bookkeeping)
    head_tokens: int = 0  # leading tokens truncation always keeps (the system prompt)
    tail_tokens: int = 0  # last tokens truncation always keeps (the newest turn's messages)
    turn_starts: tuple[int, ...] = ()  # where the prompt's user messages begin: a truncation's cut ends at one
    # the first position whose KV is its session's own: past the head of a history truncation cut and
    # whose KV it reuses from before the cut (the device prefix cache serves those pages to no one else)
    private_from: int | None = None
    device_hit: int = 0  # tokens the device prefix cache served at its latest admission
    # whether its next admission records the prompt's reuse (metrics.cached_tokens): the first does, as
    # vLLM's, not one after a preemption (its output cached too); one after a failed load again
    record_reuse: bool = True
    truncate: bool = True  # False: a session's prompt is served whole (the store neither cuts it nor applies an old cut)
    priority: int = 0  # the priority scheduling policy's order: lower first (vLLM's)
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in `pages`
    staged: bool = False  # still queued, but holds pages its stored prefix is being loaded into (read buffer)
    num_registered_blocks: int = 0  # full pages published to the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    text: str = ""  # the final text (set when the request finishes)
    stream_text: bool = False
    detokenizer: IncrementalDetokenizer | None = None  # output text so far, for streaming and stop strings
    num_sent: int = 0  # output tokens already handed out (streaming deltas)
    store_state: Any = None  # the store connector's per-request bookkeeping
    logprobs: list[TokenLogprob] | None = None  # one per output token, when the params ask for them
    json: GuidedConstraint | None = None  # a guided answer: which tokens may come next
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token computed so far (the first: None)
    stop_text_before: int = 0  # output text before min_tokens: a stop string wholly inside it does not count
    stop_searched_to: int = 0  # output text already searched for stop strings
    stopped_by_string: bool = False  # `text` was cut before a stop string
    stopped_by_token: bool = False  # the last token is an EOS or stop token: not in `text` (as vLLM)
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it (None: EOS, length)
    save_to_store: bool = True  # False: reuse stored KV but save none (e.g. a second choice of one prompt)
    # speculated tokens this step checks (n-gram speculation), after the output's: computed as its
    # own, then those the model would not have written dropped (empty between steps)
    draft: list[int] = field(default_factory=list)
    # the most tokens it proposes next (0: num_speculative_tokens): a proposal the model wrote alike
    # doubles it, one it did not cuts it to what was kept and one more (rows checking tokens cost time)
    spec_len: int = 0

    @property
    def cache_key(self) -> str | None:
        """The session's key in the store and the device prefix cache (salted by its cache salt)."""
        return session_key(self.session_id, self.cache_salt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids + self.draft

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.draft)

    @property
    def num_to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
