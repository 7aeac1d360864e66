"""Continuous batching: FCFS admission, a token budget per step (chunked prefill), preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cachedattention.config import SchedulerConfig
from cachedattention.engine.request import Request, Status
from cachedattention.kvcache.hashing import block_hashes, chain_hash, salt_seed
from cachedattention.kvcache.page_pool import PagePool

# most prompt tokens a request asking for prompt logprobs computes per step: each brings a row of
# logits, so 512 rows are 100 MB at SmolLM2's 49k vocabulary, 311 MB at Qwen2's 152k (float32)
PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class ScheduledSeq:
    request: Request
    num_new: int  # tokens computed this step
    fresh: bool  # admitted this step (its store load, if any, starts now)


# Called when a request is admitted after device-prefix matching: returns how many tokens
# (beyond `device_hit`) the store can supply. The store records its plan on the request.
StoreLookup = Callable[[Request, int], int]
# Whether a waiting request may be admitted now (False: its stored KV is still on its way; the
# scheduler admits the requests behind it meanwhile).
StoreReady = Callable[[Request], bool]
# Called before a staged request (queued, its stored prefix loading into its pages) gives its
# pages back: the store lets the load finish first, so nothing writes into pages reused elsewhere.
Unstage = Callable[[Request], None]


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PagePool, page_size: int, prefix_cache: bool,
                 window: int | None = None, max_loras: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.pages = pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        # the model's sliding window (None: no layer has one): how many pages before a device hit's end
        # its first new token reads in those layers, which must all be written there
        self.window_pages = -(-(window - 1) // page_size) if window is not None else None
        self.max_loras = max_loras  # most LoRA adapters running at once (vLLM's --max-loras; None: no LoRA)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.store_lookup: StoreLookup | None = None
        self.store_ready: StoreReady | None = None
        self.on_unstage: Unstage | None = None
        self.num_preemptions = 0
        # steps that left the queue head waiting: no pages for it, or max_num_seqs already running
        self.steps_blocked = {"pages": 0, "seqs": 0}

    def add(self, request: Request) -> None:
        if self.config.policy != "priority":
            self.waiting.append(request)
            return
        self._insert_by_priority(request)

    def _insert_by_priority(self, request: Request) -> None:
        """Into the queue ordered as vLLM's priority policy orders it: by priority (lower first), then
        arrival. A staged request it passes gives its read buffer back (only the head is staged)."""
        key = (request.priority, request.metrics.arrival_s)
        at = next((i for i, r in enumerate(self.waiting) if (r.priority, r.metrics.arrival_s) > key), len(self.waiting))
        for passed in list(self.waiting)[at:]:
            if passed.staged:
                self._release(passed)
        self.waiting.insert(at, request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        out: list[ScheduledSeq] = []
        preemptions = seen = self.num_preemptions
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if self.num_preemptions != seen:  # a request preempted this step gave its tokens back
                budget, seen = self._budget_left(out), self.num_preemptions
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted by a request ahead of it this step
            n = self._chunk(req, budget) if not req.draft else self._speculate(req, budget, out)
            if not self._grow(req, req.num_computed + n, out):
                continue
            out.append(ScheduledSeq(req, n, fresh=False))
            budget -= n
        # as vLLM's: none admitted in a step that had to preempt (pages just freed go to the running)
        if self.num_preemptions != preemptions:
            budget = 0
        not_ready: list[Request] = []  # kept in their places, ahead of whatever stays queued
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if not req.staged and self.store_ready is not None and not self.store_ready(req):
                not_ready.append(req)
                continue
            if not self._lora_fits(req):  # (as vLLM: it waits; requests behind it may run, in its read buffer too)
                if req.staged:
                    self._release(req)
                not_ready.append(req)
                continue
            if not req.staged:
                self._admit(req)
            n = self._chunk(req, budget)
            if not self._grow(req, req.num_computed + n, out, allow_preempt=False):
                if not req.staged:  # a staged head keeps its loaded prefix for the next try
                    self._release(req)
                self.waiting.appendleft(req)
                self.steps_blocked["pages"] += 1
                break
            req.staged = False
            req.record_reuse = False  # (its reuse is recorded: a preemption does not change it)
            req.status = Status.RUNNING
            if req.metrics.scheduled_s is None:
                req.metrics.scheduled_s = time.perf_counter()
            self.running.append(req)
            out.append(ScheduledSeq(req, n, fresh=True))
            budget -= n
        self.waiting.extendleft(reversed(not_ready))
        if self.waiting and len(self.running) >= self.config.max_num_seqs:
            self.steps_blocked["seqs"] += 1
        return out

    def _speculate(self, req: Request, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """A decoder's tokens this step with its speculated ones: as many of them as the budget and
        the pool's free pages take, less the pages the running requests after it need for what they
        have to compute (a proposal never makes a request be preempted); none if none fit."""
        n = self._chunk(req, budget)
        later = self.running[self.running.index(req) + 1 :]
        reserve = sum(max(0, self._pages_for(r.num_tokens - len(r.draft)) - len(r.pages)) for r in later)
        spare = max(0, self.pages.num_available() - reserve)
        fits = (len(req.pages) + spare) * self.page_size - req.num_computed  # tokens its pages could then hold
        del req.draft[max(0, min(n, fits) - 1) :]
        if req.draft and not self._grow(req, req.num_computed + 1 + len(req.draft), scheduled, allow_preempt=False):
            req.draft.clear()
        return self._chunk(req, budget)

    def _lora_fits(self, req: Request) -> bool:
        """Whether req's adapter runs already or one more adapter is allowed to."""
        if req.lora is None or self.max_loras is None:
            return True
        running = {r.lora.fingerprint for r in self.running if r.lora is not None}  # (its files: one adapter)
        return req.lora.fingerprint in running or len(running) < self.max_loras

    def _budget_left(self, scheduled: list[ScheduledSeq]) -> int:
        return self.config.max_num_batched_tokens - sum(s.num_new for s in scheduled)

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens req computes this step: what it has left, within the budget and the long-prefill
        threshold (so that a long prompt, or a preempted request's recompute, leaves room for short
        ones each step; a decoder computes one token anyway)."""
        n = min(req.num_to_compute, budget)
        limit = self.config.long_prefill_token_threshold
        if req.prompt_logprobs is not None:  # each row computed brings a row of logits [vocab]: bound them
            limit = min(limit or PROMPT_LOGPROBS_CHUNK, PROMPT_LOGPROBS_CHUNK)
        return min(n, limit) if limit else n

    def stage_head(self) -> Request | None:
        """Give the queue head pages for its stored prefix before it is admitted (the device read buffer).

        The store then loads that prefix while the current step computes; the head keeps its place
        in the queue and, once admitted, finds its KV in place. Only when the pool has room for the
        head's whole prompt besides what the running requests may take next step; None otherwise,
        or when nothing beyond the device's own prefix cache would be loaded.
        """
        if not self.waiting or self.store_lookup is None or self.waiting[0].staged:
            return None
        req = self.waiting[0]
        if self.store_ready is not None and not self.store_ready(req):
            return None
        if not self._lora_fits(req):  # (it waits: its pages would hold up the requests behind it)
            return None
        # what the running requests can take next step: the rest of their prompt and one token more
        headroom = sum(max(0, self._pages_for(r.num_tokens + 1) - len(r.pages)) for r in self.running)
        if self.pages.num_available() < self._pages_for(req.num_tokens) + headroom:
            return None
        self._admit(req)
        if req.num_computed <= req.device_hit or not self._grow(
            req, req.num_computed, [], allow_preempt=False
        ):
            self._release(req)
            return None
        req.staged = True
        return req

    def _admit(self, req: Request) -> int:
        """Match the device prefix cache, then ask the store; set num_computed to the hit."""
        tokens = req.all_token_ids
        limit = len(tokens) - 1  # at least one token must be computed to get logits
        if req.prompt_logprobs is not None:  # every prompt position's logits are wanted: compute them all
            limit = 0
        if self.prefix_cache and limit:
            hashes = block_hashes(tokens, self.page_size, limit=limit, seed=salt_seed(req.cache_salt))
            blocks = [tokens[i * self.page_size : (i + 1) * self.page_size] for i in range(len(hashes))]
            req.pages = self.pages.match_prefix(hashes, blocks, req.cache_key, self.window_pages,
                                                req.private_from is not None)  # fmt: skip
            req.block_hashes = hashes[: len(req.pages)]
            req.num_registered_blocks = len(req.pages)
        device_hit = len(req.pages) * self.page_size
        store_hit = self.store_lookup(req, device_hit) if self.store_lookup else 0
        req.num_computed = max(device_hit, min(store_hit, limit))
        req.device_hit = device_hit
        if req.record_reuse:
            req.metrics.cached_tokens["device"] = device_hit
        return req.num_computed

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _grow(self, req: Request, num_tokens: int, scheduled: list[ScheduledSeq], allow_preempt: bool = True) -> bool:
        """Give req pages for num_tokens tokens, preempting the newest running requests if needed."""
        need = self._pages_for(num_tokens) - len(req.pages)
        while need > 0:
            new = self.pages.allocate(need, after=req.pages[-1] if req.pages else None)
            if new is not None:
                req.pages.extend(new)
                return True
            if not allow_preempt:
                return False
            staged = next((r for r in self.waiting if r.staged), None)
            if staged is not None:  # a queued job's read buffer gives way before a running job does
                self._release(staged)
                continue
            victim = self._victim()
            self._preempt(victim, scheduled)
            if victim is req:
                return False
        return True

    def _victim(self) -> Request:
        """The running request that gives its pages back: the newest (fcfs), or the one of the lowest
        priority (the largest value) that arrived last."""
        if self.config.policy != "priority":
            return self.running[-1]
        return max(self.running, key=lambda r: (r.priority, r.metrics.arrival_s))  # vLLM's: the last to arrive

    def _preempt(self, victim: Request, scheduled: list[ScheduledSeq]) -> None:
        scheduled[:] = [s for s in scheduled if s.request is not victim]
        self.requeue(victim)
        self.num_preemptions += 1

    def requeue(self, req: Request) -> None:
        """Free the request's pages and put it back at the front (fcfs), or in its place by priority
        and arrival (priority, as vLLM's); it recomputes prompt + output later."""
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        if self.config.policy != "priority":
            self.waiting.appendleft(req)
            return
        self._insert_by_priority(req)

    def _unstage(self, req: Request) -> None:
        if req.staged:
            req.staged = False
            if self.on_unstage is not None:
                self.on_unstage(req)

    def _release(self, req: Request) -> None:
        self._unstage(req)
        req.draft.clear()
        self.pages.free(req.pages)
        req.pages = []
        req.num_computed = 0
        req.num_registered_blocks = 0
        req.block_hashes = []

    # -- after the step -------------------------------------------------------------------------
    def register_full_pages(self, req: Request) -> None:
        """Publish the request's newly filled pages to the device prefix cache."""
        if not self.prefix_cache:
            return
        tokens = req.all_token_ids
        ps = self.page_size
        while (req.num_registered_blocks + 1) * ps <= req.num_computed:
            i = req.num_registered_blocks
            parent = req.block_hashes[-1] if req.block_hashes else salt_seed(req.cache_salt)
            block = tokens[i * ps : (i + 1) * ps]
            h = chain_hash(parent, block)
            req.block_hashes.append(h)
            # a page reaching past the kept head of a history cut with its KV reused is this session's own
            private = req.private_from is not None and (i + 1) * ps > req.private_from
            self.pages.register(req.pages[i], h, block, req.cache_key, private)
            req.num_registered_blocks += 1

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._unstage(req)
        req.draft.clear()
        self.pages.free(req.pages)
        req.pages = []
        req.status = Status.FINISHED
