"""The step loop: admit requests, schedule a batch, run the model, sample, stop, hand out outputs."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from cachedattention.config import EngineConfig
from cachedattention.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.ngram import propose
from cachedattention.engine.reasoning_gate import ReasoningGate
from cachedattention.engine.request import Request, Status
from cachedattention.engine.runner import ModelRunner
from cachedattention.engine.scheduler import Scheduler
from cachedattention.errors import InvalidRequest, SessionBusy
from cachedattention.kvcache.kv_pool import (
    DEFAULT_CPU_BYTES,
    KVPool,
    activation_bytes,
    default_pool_bytes,
    kv_storage_dtype,
    pool_bytes_for_utilization,
)
from cachedattention.kvcache.page_pool import PagePool
from cachedattention.lora.adapter import LoRAAdapter
from cachedattention.lora.registry import LoRARegistry, kv_salt
from cachedattention.lora.request import LoRARequest
from cachedattention.model.generation_defaults import EOS_KEY, generation_defaults
from cachedattention.model.loader import LoadedModel, load_model, load_tokenizer, resolve_dtype
from cachedattention.model.spec import ModelSpec
from cachedattention.outputs import RequestMetrics, RequestOutput
from cachedattention.reasoning_parser import ReasoningParser, reasoning_parser, reasoning_tags
from cachedattention.sampling import SamplingParams, make_generator, sample_batch, token_logprob, token_logprobs
from cachedattention.store.session import ANON_PREFIX, BRANCH_SEP, SALT_SEP, session_key

log = logging.getLogger(__name__)
# set to 1 to serve a window past the model's max_position_embeddings anyway (vLLM's name works too)
ALLOW_LONG_ENV = ("CACHEDATTENTION_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN")


def _long_allowed() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true") for name in ALLOW_LONG_ENV)


def _check_window(max_model_len: int, trained: int) -> None:
    """As vLLM: a window past what the model's positions were trained for is refused unless asked for."""
    if max_model_len <= trained:
        return
    if _long_allowed():
        log.warning("max_model_len %d is past the model's trained positions (%d): answers there may degrade",
                    max_model_len, trained)  # fmt: skip
        return
    raise ValueError(f"max_model_len {max_model_len} is past the model's max_position_embeddings ({trained}, "
                     f"RoPE scaling included): its positions were not trained that far; set {ALLOW_LONG_ENV[0]}=1 "
                     f"(or {ALLOW_LONG_ENV[1]}=1) to serve it anyway")  # fmt: skip


def _window(config: EngineConfig, spec: ModelSpec) -> int:
    """The window served: the one asked for, else the model's; with vLLM's --disable-sliding-window,
    no longer than the model's sliding window (a longer one asked for is refused)."""
    cap = spec.any_window if config.disable_sliding_window else None
    if cap is None:
        return config.window_given or spec.default_context()
    if config.window_given is not None and config.window_given > cap:
        if _long_allowed():  # (as vLLM, which lets that variable take a window past the cap too)
            log.warning("max_model_len %d is past the sliding window (%d) that disable_sliding_window caps it "
                        "at: attention past it is windowed", config.window_given, cap)  # fmt: skip
            return config.window_given
        raise ValueError(f"max_model_len {config.window_given} is past the sliding window ({cap} tokens) that "
                         f"disable_sliding_window (--disable-sliding-window) caps the window at; set "
                         f"{ALLOW_LONG_ENV[0]}=1 to serve it anyway")  # fmt: skip
    return config.window_given or min(spec.default_context(), cap)


def _token_positions(positions: Sequence[int]) -> tuple[int, ...]:
    """turn_starts as a tuple, each a position in the prompt (a ValueError for anything else)."""
    if not all(type(t) is int and t >= 0 for t in positions):
        raise ValueError(f"turn_starts must be token positions (integers >= 0), got {list(positions)[:5]!r}")
    return tuple(positions)


def _check_cache_salt(cache_salt: object) -> None:
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise InvalidRequest(f"cache_salt must be a non-empty string, got {cache_salt!r:.60}", "cache_salt")
    if cache_salt is not None and "\0" in cache_salt:  # (the keys of LoRA adapters' KV use it: lora.registry.kv_salt)
        raise InvalidRequest("cache_salt may not hold a NUL character", "cache_salt")


def _truncation_hint(req: Request, window: int) -> str:
    """What to add to a session's prompt past the window with the store's truncation off: turn it on,
    where dropping older turns could make the prompt fit. Its system prompt and newest turn, which
    truncation keeps, may fill the window alone (a long last message): then the hint would mislead."""
    kept = req.head_tokens + min(req.tail_tokens, len(req.prompt_token_ids))
    if req.tail_tokens and kept >= window:
        return (f" (its system prompt and newest turn alone, {kept} tokens, are past the window: dropping "
                "older turns would not make it fit)")
    return " (or let the store truncate the session's history: the store on, truncation reuse)"


def _keep_last(ids: list[int], k: int, head: int) -> list[int]:
    """The first `head` ids (a BOS) and the last of the others, k in all."""
    tail, keep = ids[head:], max(k - head, 0)
    return ids[: min(head, k)] + (tail[len(tail) - keep :] if keep else [])


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} asked for but CUDA is not available")
        self.device = torch.device(config.device)

        def check_window(spec: ModelSpec) -> None:  # before any weight is read: a refused window costs no loading
            _check_window(_window(config, spec), spec.trained_context())

        if loaded is not None:
            check_window(loaded.spec)
        self.loaded = loaded or load_model(config.model, config.device, config.dtype, config.tokenizer, check_window,
                                           config.hf_overrides)  # fmt: skip
        self.spec = self.loaded.spec
        self.tokenizer = self.loaded.tokenizer
        if loaded is not None and config.tokenizer is not None:  # a model loaded before: its tokenizer replaced
            self.tokenizer = load_tokenizer(config.tokenizer, self.spec.vocab_size)
        if config.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError("a chat template needs the model's tokenizer, and this model has none")
            self.tokenizer = self.tokenizer.with_chat_template(config.chat_template)
        if self.tokenizer is not None:
            self.tokenizer = self.tokenizer.with_content_format(config.chat_template_content_format)
        folder = Path(config.model).expanduser() if config.model is not None else None
        # the request fields the model's generation config sets: where a request sets none
        self.sampling_defaults = generation_defaults(
            config.generation_config, folder if folder and folder.is_dir() else None, config.override_generation_config
        )
        self.max_model_len = _window(config, self.spec)
        self.dtype = resolve_dtype(config.dtype)
        self.model = self.loaded.model
        self.pool = self._make_pool()
        self._fit_window_to_pool()
        self.model.init_rotary(self.max_model_len)  # (tables as long as the window: once it is settled)
        if self.spec.rope_short_window and self.max_model_len > self.spec.rope_short_window:
            log.info("longrope: a window of %d, past the pretraining %d, rotates every token with the long factors",
                     self.max_model_len, self.spec.rope_short_window)
        self.pages = PagePool(self.pool.num_pages)
        self.pool.prefault_start()  # the first requests' pages, at start-up rather than in their TTFT
        self.scheduler = Scheduler(
            config.scheduler, self.pages, config.cache.page_size, config.cache.enable_prefix_cache,
            window=self.spec.any_window, max_loras=config.lora.max_loras if config.lora.enable else None,
        )
        self.runner = ModelRunner(self.model, self.pool, self.device)
        self.loras: LoRARegistry | None = None  # vLLM's --enable-lora
        if config.lora.enable:
            self.loras = LoRARegistry(config.lora, self.spec, self.model.enable_lora(), self.dtype, self.device)
        self.store = None
        if config.store.enable:
            from cachedattention.store.connector import StoreConnector

            self.store = StoreConnector(config.store, self)
            self.scheduler.store_lookup = self.store.lookup
            self.scheduler.store_ready = self.store.ready
            self.scheduler.on_unstage = self.store.unstage
        self.requests: dict[str, Request] = {}
        self.closed = False
        self.idle_s = 0.0  # time step() spent waiting with nothing to schedule (not compute)
        self.idle_steps = 0  # steps that scheduled nothing
        # n-gram speculation (vLLM's speculative_config; None: off, which a benchmark may set between requests)
        self.speculative = config.speculative
        # proposals made, tokens proposed, tokens the model wrote alike
        self.spec_counts = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self._ids = itertools.count()
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        eos.update(self.sampling_defaults.pop(EOS_KEY, ()))
        beyond = sorted(i for i in eos if i >= self.spec.vocab_size)
        if beyond:  # (no answer could end on them)
            log.warning("end-of-answer ids %s are past the vocabulary (%d tokens): ignored", beyond, self.spec.vocab_size)
        self.eos_token_ids = tuple(sorted(i for i in eos if i < self.spec.vocab_size))
        # the tokenizer's own EOS, the end the model itself writes (Llama 3's <|eot_id|>): an answer
        # it ends has vLLM's stop_reason None; the other end ids act as vLLM's stop_token_ids
        own = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.own_eos_token_id: int | None = own if own in self.eos_token_ids else None
        # the most logprobs / prompt_logprobs a request may ask for (-1: any, up to the vocabulary)
        self.max_logprobs = self.spec.vocab_size if config.max_logprobs == -1 else config.max_logprobs
        # vLLM's --seed: sampled requests without their own seed draw from this engine's generator,
        # seeded at start, so they repeat from one start to the next (None: torch's global state)
        self.rng = None if config.seed is None else torch.Generator(device=config.device).manual_seed(config.seed)
        self.reasoning_parser: ReasoningParser | None = None
        self.use_reasoning_parser(config.reasoning_parser)

    def use_reasoning_parser(self, name: str | None) -> None:
        """How the model writes its reasoning (None: it does not): guided answers reason first when
        the tokenizer has the tags as single tokens (the server sets the one it parses with)."""
        self.reasoning_parser = reasoning_parser(name)
        # the ids of <think> and </think> when each is one token (None: no parser, or not single tokens)
        self.reasoning_tags = (reasoning_tags(self.tokenizer, self.reasoning_parser)
                               if self.reasoning_parser is not None else None)  # fmt: skip

    @property
    def guided_after_reasoning(self) -> bool:
        """Whether a guided answer is held to its shape only after the model's reasoning."""
        return self.reasoning_tags is not None

    def _make_pool(self) -> KVPool:
        c = self.config.cache
        storage = kv_storage_dtype(c.kv_cache_dtype, self.dtype)
        elt = storage.itemsize
        num_pages = c.num_pages or self._budget_pages(elt)
        if storage != self.dtype:  # (said at start, as vLLM says it: the accuracy traded is the user's to judge)
            limit = f", with a scale of 1: values past ±{torch.finfo(storage).max:g} saturate" if storage.itemsize == 1 else ""
            log.info("the KV pages hold %s values (kv_cache_dtype %s), read back as %s%s", str(storage)[6:],
                     c.kv_cache_dtype, str(self.dtype)[6:], limit)  # fmt: skip
        try:
            return KVPool(self.spec, num_pages, c.page_size, self.device, self.dtype, storage)
        except (MemoryError, RuntimeError) as e:  # (torch's out-of-memory errors are RuntimeErrors)
            if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" not in str(e):
                raise
            nbytes = num_pages * c.page_size * self.spec.kv_bytes_per_token(elt)
            raise ValueError(f"the KV pool of {num_pages} pages of {c.page_size} tokens ({nbytes / 2**30:.1f} GiB) "
                             f"cannot be allocated on {self.device}: lower num_pages, or size the pool by memory "
                             "(kv_pool_bytes, --kv-pool-bytes)") from None  # fmt: skip

    def _budget_pages(self, elt: int) -> int:
        """The pages the pool's budget holds; at least two, so a budget that holds fewer is refused
        (else a page size of 10**8 would allocate two such pages, whatever the budget)."""
        budget, page_size = self._pool_budget(elt), self.config.cache.page_size
        page_bytes = self.spec.kv_bytes_per_token(elt) * page_size
        if budget < 2 * page_bytes:
            raise ValueError(f"a KV page of {page_size} tokens (page_size, --page-size or --block-size) takes "
                             f"{page_bytes} bytes, more than half the KV pool's {budget} bytes: lower the page size, or "
                             "give the pool more memory (kv_pool_bytes, --kv-pool-bytes)")  # fmt: skip
        return KVPool.pages_for_budget(self.spec, page_size, budget, elt)

    def _fit_window_to_pool(self) -> None:
        """A request as long as the window must fit in the pool, or it would wait for pages for ever.
        A default-sized pool lowers a default window to what it holds (a large model's window on a
        CPU), any pool an auto window (vLLM's max_model_len -1); a pool or a window the user sized is
        refused, as vLLM refuses it."""
        c = self.config.cache
        held = self.pool.num_pages * c.page_size
        if held >= self.max_model_len:
            return
        sized = c.memory_bytes or c.num_pages or (c.gpu_memory_utilization is not None and self.device.type == "cuda")
        auto = self.config.max_model_len == -1
        if (sized and not auto) or self.config.window_given is not None:
            more = ("more pages (num_pages)" if c.num_pages else "more memory (kv_pool_bytes, --kv-pool-bytes; "
                    "gpu_memory_utilization on CUDA)")  # fmt: skip
            raise ValueError(
                f"the KV pool holds {held} tokens, fewer than the window (max_model_len {self.max_model_len}): a request "
                f"that long could never run; give the pool {more}, or lower max_model_len (--max-model-len) to at "
                f"most {held}"
            )
        log.warning("the %sKV pool holds %d tokens: max_model_len lowered from %d to %d (give --kv-pool-bytes "
                    "for a longer window)", "" if auto else "default ", held, self.max_model_len, held)  # fmt: skip
        self.max_model_len = held

    def _pool_budget(self, elt: int) -> int:
        """The pool's bytes (when no num_pages is given): memory_bytes if given, else on CUDA what
        gpu_memory_utilization leaves (measured now, after the weights are loaded), else the default size."""
        c, s = self.config.cache, self.config.scheduler
        util = c.gpu_memory_utilization
        if c.memory_bytes:
            if util is not None:
                log.info("the KV pool is sized by kv_pool_bytes (%d bytes); gpu_memory_utilization is not used", c.memory_bytes)
            return c.memory_bytes
        if util is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the loader's freed temporaries are not this engine's use
            free, total = torch.cuda.mem_get_info(self.device)
            ours = torch.cuda.memory_reserved(self.device)  # the weights: this process's, not other processes'
            if util * total > free + ours:  # as vLLM: the share asked for must be free at start
                raise ValueError(f"gpu_memory_utilization {util} asks for {util * total / 2**30:.2f} GiB of the device, "
                                 f"but only {(free + ours) / 2**30:.2f} GiB is free for this engine (other processes "
                                 f"use the rest); lower --gpu-memory-utilization")  # fmt: skip
            headroom = activation_bytes(self.spec, s.max_num_batched_tokens, s.max_num_seqs, self.max_model_len,
                                        self.dtype.itemsize)  # fmt: skip
            page_bytes = self.spec.kv_bytes_per_token(elt) * c.page_size
            return pool_bytes_for_utilization(util, total, ours, headroom, min_bytes=2 * page_bytes)
        if util is not None and self.device.type != "cuda":
            log.warning("gpu_memory_utilization (--gpu-memory-utilization) applies on CUDA only: the %s KV pool is "
                        "sized by kv_pool_bytes (--kv-pool-bytes; by default at most %d MiB)", self.device.type,
                        DEFAULT_CPU_BYTES >> 20)  # fmt: skip
        return min(default_pool_bytes(self.device), self._useful_bytes(elt))

    def _useful_bytes(self, elt: int) -> int:
        """No more than the running requests can use at full window: tiny models get tiny pools."""
        return self.config.scheduler.max_num_seqs * self.max_model_len * self.spec.kv_bytes_per_token(elt)

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        """A text prompt's ids, with what the tokenizer adds around a text (Llama's BOS) unless told
        not to, as vLLM encodes a prompt; token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer; pass token ids instead of text", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidRequest("a prompt must be a string or a list of token ids (ints)", "prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        self._check_in_vocabulary(ids, "prompt", "token ids")
        return ids

    def _check_in_vocabulary(self, ids: Sequence[int], param: str, what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequest(f"{what} out of the vocabulary (0..{self.spec.vocab_size - 1}): {bad[:5]}", param)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
        stream_text: bool = False,
        head_tokens: int = 0,
        tail_tokens: int = 0,
        turn_starts: Sequence[int] = (),
        save_to_store: bool = True,
        add_special_tokens: bool = True,
        truncate: bool = True,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | LoRAAdapter | None = None,
    ) -> str:
        """Queue a prompt. With a session, the store reuses its history and, when the conversation
        outgrows the window, drops its oldest turns, between its first `head_tokens` (the system prompt)
        and its last `tail_tokens` (the newest turn), which it keeps, the cut ending at one of
        `turn_starts` (where its user messages begin) where one fits; `truncate=False` serves the prompt
        whole instead (not cut now, nor by an earlier turn's cut): it must then fit the window.
        `priority`: its place under the priority scheduling policy (lower first). `cache_salt` (vLLM's):
        it shares cached KV only with requests of the same salt (device blocks, a session's turns, the
        store's anonymous prefixes). `lora_request` (vLLM's): the LoRA adapter it runs with (with
        LoRA enabled), or the adapter itself, read already (a server's, read off the engine's thread;
        a beam search's later steps, which keep their first one's); its KV is shared only with
        requests of the same adapter's files."""
        self._check_open()
        params = self.default_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if params.n != 1:  # (each choice is a request of its own: sampling.choice_params)
            raise InvalidRequest("an engine request is one completion: LLM.generate and chat run n of them", "n")
        if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) >= 2**63:
            raise InvalidRequest(f"priority must be an integer, got {priority!r}", "priority")
        if priority and self.config.scheduler.policy != "priority":  # as vLLM
            raise InvalidRequest("priority needs the priority scheduling policy (--scheduling-policy priority)",
                                 "priority")  # fmt: skip
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError("session_id must be a non-empty string")
        if session_id is not None and session_id.startswith(ANON_PREFIX):  # the store's own keys: never a client's
            raise InvalidRequest(f"session_id may not start with {ANON_PREFIX!r}: such keys name the store's "
                                 "anonymous prefixes", "session_id")  # fmt: skip
        if session_id is not None and (BRANCH_SEP in session_id or SALT_SEP in session_id):
            raise InvalidRequest("session_id may not hold the control characters U+001E and U+001F: the store's "
                                 "keys of a session's salted turns and branches use them", "session_id")  # fmt: skip
        _check_cache_salt(cache_salt)
        for name, value in (("head_tokens", head_tokens), ("tail_tokens", tail_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"{name} must be a whole number of tokens (>= 0), got {value!r:.40}", name)
        adapter = self._adapter(lora_request)
        ids = self.tokenize(prompt, add_special_tokens)
        # what the tokenizer put before a text prompt (a BOS) stays through truncation of either kind
        cut = session_id is not None or params.truncate_prompt_tokens is not None
        added = self.tokenizer.added_prefix(prompt, ids) if cut and add_special_tokens and isinstance(prompt, str) else 0
        head_tokens = max(head_tokens, added) if session_id is not None else head_tokens
        if params.truncate_prompt_tokens is not None:  # vLLM's: the prompt's last k tokens
            if session_id is not None:
                raise InvalidRequest("truncate_prompt_tokens cannot cut a session's prompt (its history is kept "
                                     "whole, or truncated by the store's own rule)", "truncate_prompt_tokens")  # fmt: skip
            ids = _keep_last(ids, params.truncate_prompt_tokens, added)
        self._check_in_vocabulary(params.stop_token_ids, "stop_token_ids", "stop_token_ids")
        self._check_in_vocabulary(params.allowed_token_ids, "allowed_token_ids", "allowed_token_ids")
        self._check_in_vocabulary([t for t, _ in params.logit_bias], "logit_bias", "logit_bias names token ids")
        self._check_logprobs(params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = replace(params, eos_token_ids=() if params.ignore_eos else self.eos_token_ids,
                         bad_words_ids=self._bad_words_ids(params.bad_words) or params.bad_words_ids)  # fmt: skip
        self._check_in_vocabulary([t for w in params.bad_words_ids for t in w], "bad_words", "bad_words_ids")
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            metrics=RequestMetrics(arrival_s=time.perf_counter(), prompt_tokens=len(ids)),
            session_id=session_id,
            logical_prompt=list(ids),
            generator=make_generator(params, self.config.device) or self.rng,  # unseeded: the engine's (--seed)
            stream_text=stream_text,
            detokenizer=IncrementalDetokenizer(partial(self._decode, skip_special_tokens=params.skip_special_tokens)),
            head_tokens=head_tokens,
            tail_tokens=tail_tokens,
            turn_starts=_token_positions(turn_starts),
            logprobs=None if params.logprobs is None else [],
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
            json=self._guided_constraint(params, ids),
            save_to_store=save_to_store,
            truncate=truncate,
            priority=priority,
            cache_salt=kv_salt(cache_salt, adapter.fingerprint if adapter is not None else None),
            lora=adapter,
        )
        if self.store is not None:
            self.store.prepare(req)  # may truncate an overflowing conversation
        try:
            self._check_window(req)
        except ValueError:
            if self.store is not None:  # the plan holds its history's segments: let them go
                self.store.request_finished(req, saved=False)
            raise
        req.metrics.prompt_tokens = len(req.prompt_token_ids)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _adapter(self, lora_request: LoRARequest | LoRAAdapter | None) -> LoRAAdapter | None:
        """The adapter a request names (None: the base model), or the one given, read already (by this
        engine's registry); refused with LoRA off."""
        if lora_request is None:
            return None
        if self.loras is None:
            raise InvalidRequest("LoRA adapters need LoRA enabled (LLM(enable_lora=True), --enable-lora)", "lora_request")
        if isinstance(lora_request, LoRAAdapter):
            return lora_request
        try:
            return self.loras.adapter(lora_request)
        except ValueError as e:
            raise InvalidRequest(str(e), "lora_request") from None

    def _check_window(self, req: Request) -> None:
        """ValueError if the prompt, as the store planned it, does not fit the window. A session's
        system prompt and newest turn, which truncation keeps whole, say so."""
        n, window, store = len(req.prompt_token_ids), self.max_model_len, self.config.store
        if n < window:
            return
        truncating = self.store is not None and store.truncation != "off"
        if req.session_id is not None and truncating and req.truncate and req.tail_tokens:
            raise ValueError(
                f"the prompt has {n} tokens but the model's window is {window}: truncation drops only older "
                f"turns, keeping the system prompt and the newest turn ({req.store_state.plan.head} and "
                f"{min(req.tail_tokens, n)} tokens) whole; shorten them"
            )
        raise ValueError(f"the prompt has {n} tokens but the model's window is {window}; shorten it"
                         f"{'' if req.session_id is None or truncating else _truncation_hint(req, window)}")

    def _bad_words_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token ids as the tokenizer writes it alone and after a space (a word of its
        own mid-sentence), as vLLM: the second only when it differs from the first."""
        if not words:
            return ()
        if self.tokenizer is None:
            raise InvalidRequest("bad_words needs the model's tokenizer", "bad_words")
        out: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            out.append(bare)
            if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):  # a token of its own, not a space's
                out.append(spaced)
        return tuple(w for w in out if w)

    def _check_logprobs(self, params: SamplingParams) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.max_logprobs:
                raise InvalidRequest(f"{name} asks for {v} alternatives per token, more than this engine's "
                                     f"max_logprobs of {self.max_logprobs} (--max-logprobs)", name)  # fmt: skip

    def default_params(self) -> SamplingParams:
        """A request's params when none are given: SamplingParams' defaults, with the model's own
        (its generation config) over them, as vLLM's get_default_sampling_params."""
        return SamplingParams(**self.sampling_defaults)

    def _guided_constraint(self, params: SamplingParams, prompt_ids: list[int]) -> GuidedConstraint | None:
        """JSON mode, a JSON schema, a choice, a pattern, a grammar or a forced tool call: the tokens
        each step may take (after the model's reasoning, with a reasoning parser)."""
        automaton = params.guided_automaton()
        if automaton is None:
            return None
        if self.tokenizer is None:
            field = params.guided_field
            param = {"tool_call_names": "tool_choice", "json_schema": "response_format", "json_object": "response_format"}.get(field, field)
            raise InvalidRequest("a guided answer needs the model's tokenizer (each token's bytes)", param)
        enders = (*params.eos_token_ids, *params.stop_token_ids)
        tok = self.tokenizer
        # the end the model itself writes (Llama-3's <|eot_id|>, not the smallest of its end ids)
        end = self.own_eos_token_id if self.own_eos_token_id is not None else min(self.eos_token_ids, default=None)
        gate = None
        if self.reasoning_tags is not None:
            gate = ReasoningGate.for_prompt(self.reasoning_parser, self.reasoning_tags, tok, prompt_ids)
        return GuidedConstraint(automaton, tok.token_bytes, tok.is_special, enders, tok.tokens_by_first_byte, end,
                                gate)  # fmt: skip

    def forget_session(self, session_id: str, cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None) -> bool:  # fmt: skip
        """Forget a conversation (the one of that cache salt and LoRA adapter, if its turns had them):
        its device blocks and its KV in the store's tiers (host, disk, the remote server); whether
        anything was held.
        SessionBusy (a ValueError) while a turn of it runs (that turn would save it again); OSError
        when the remote server cannot be read."""
        self._check_open()
        if (not isinstance(session_id, str) or not session_id or session_id.startswith(ANON_PREFIX)
                or BRANCH_SEP in session_id or SALT_SEP in session_id):  # fmt: skip
            raise InvalidRequest("session_id must be a non-empty string naming a client's session", "session_id")
        _check_cache_salt(cache_salt)
        keys = [session_key(session_id, kv_salt(cache_salt, fp)) for fp in self._fingerprints(lora_request)]
        if any(r.cache_key in keys and not r.is_finished for r in self.requests.values()):
            raise SessionBusy(f"session {session_id!r} has a turn in progress; forget it once that turn has finished",
                              "session_id")  # fmt: skip
        held = False
        for key in keys:
            on_device = self.pages.forget_owner(key) > 0  # every device block its requests wrote
            held = (self.store is not None and self.store.store.forget(key)) or on_device or held
        return held

    def _fingerprints(self, lora_request: LoRARequest | None) -> list[str | None]:
        """The fingerprints a session's KV may be keyed by under this adapter name (None: the base
        model's): its files' now and every earlier version this engine served under the name (an
        adapter replaced or taken away since); its folder need not be readable if it served any."""
        if lora_request is None:
            return [None]
        try:
            now = {self._adapter(lora_request).fingerprint}
        except InvalidRequest:
            if self.loras is None or not self.loras.fingerprints(lora_request.lora_name):
                raise
            now = set()
        return sorted(now | self.loras.fingerprints(lora_request.lora_name))

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None or req.is_finished:
            return None
        self._finish(req, "abort")
        return self._output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def wait_idle(self) -> None:
        """Nothing to schedule: wait a little for KV on its way from the remote tier (not compute)."""
        if self.store is not None:
            start = time.perf_counter()
            self.store.idle()
            self.idle_s += time.perf_counter() - start

    # -- the step -----------------------------------------------------------------------------
    def step(self, wait_when_idle: bool = True) -> list[RequestOutput]:
        """One scheduled forward pass and its sampled tokens. When nothing can be scheduled (every
        queued turn waits for KV from the remote tier), waits a little for a fetch to land unless
        `wait_when_idle` is False (a caller with other engines to step: see `wait_idle`)."""
        if self.store is not None:
            self.store.publish_queue(self.scheduler.waiting)
        if self.speculative is not None:
            self._propose_drafts()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            self.idle_steps += 1
            if wait_when_idle:
                self.wait_idle()
            return []
        hooks = self.store.begin_step(scheduled) if self.store is not None else None
        if self.store is not None and self.store.config.preload:
            staged = self.scheduler.stage_head()  # after this step's own loads: they go first
            if staged is not None:
                self.store.preload(staged)
        batch, wants, prompt_rows, draft_rows = self.runner.build_batch(scheduled, hooks)
        logits = self.runner.run(batch)
        broken: set = set()  # requests whose prompt logprobs failed: they end alone below
        counted = len(wants) + sum(count for _, _, count in prompt_rows)
        if prompt_rows:  # rows after the sampled ones: prompt positions whose logprobs were asked for
            broken = self._add_prompt_logprobs(scheduled, prompt_rows, logits[len(wants) : counted])
        # a speculating decoder's rows (those checking its speculated tokens, then its last): checked apart
        checks = self._draft_rows(scheduled, wants, draft_rows, logits[: len(wants)], logits[counted:])
        failed = self.store.end_step(scheduled) if self.store is not None else []
        for s in scheduled:
            if s.request not in failed and s.request not in checks:  # (a speculating one: once checked)
                s.request.num_computed += s.num_new
                self.scheduler.register_full_pages(s.request)
        for req in failed:  # a stored segment failed its check mid-load: recompute, never emit its logits
            req.record_reuse = True  # (what it reuses then, not what the failed load would have)
            self.scheduler.requeue(req)
        outputs = [self._fail_request(req) for req in broken if req not in failed]
        for req, rows in checks.items():
            outputs.append(self._check_draft(req, rows))
        # sampled: the rows of neither a speculating request (checked above) nor one that recomputes (a
        # failed load) or has ended: a seeded request's random state (or the engine's --seed one) must
        # not move for a token never kept
        skip = set(checks) | set(failed) | broken
        sampled = [k for k, i in enumerate(wants) if scheduled[i].request not in skip]
        logits = logits[sampled] if len(sampled) != len(wants) else logits[: len(wants)]
        wants = [wants[k] for k in sampled]
        reqs = [scheduled[i].request for i in wants]
        histories = [(r.prompt_token_ids, r.output_token_ids) for r in reqs]
        params, generators, rules = [r.params for r in reqs], [r.generator for r in reqs], [r.json for r in reqs]
        tokens = self._sample(logits, params, generators, histories, rules) if reqs else []
        for row, req, token in zip(logits, reqs, tokens):
            try:  # what fails here fails for this request alone: its batch mates go on
                if isinstance(token, Exception):
                    raise token
                if req.logprobs is not None:
                    req.logprobs.append(token_logprob(row, token, req.params.logprobs))
                self._append_token(req, token)
                outputs.append(self._output(req))
            except Exception:
                log.exception("request %s failed after its forward pass; ending it alone", req.request_id)
                outputs.append(self._fail_request(req))
        return outputs

    # -- n-gram speculation --------------------------------------------------------------------------
    def _propose_drafts(self) -> None:
        """Each decoder's speculated next tokens (n-gram lookup over its prompt and output), as many as
        its answer and the window still take."""
        spec = self.speculative
        for req in self.scheduler.running:
            if req.num_to_compute != 1 or req.json is not None or req.is_finished:
                continue  # (guided answers, and prompts still computing, go one token a step)
            room = self.max_model_len - req.num_tokens - 1
            if req.params.max_tokens is not None:
                room = min(room, req.params.max_tokens - len(req.output_token_ids) - 1)
            k = min(req.spec_len or spec.num_speculative_tokens, room)
            if k > 0:
                req.draft = propose(req.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)

    @staticmethod
    def _draft_rows(scheduled: list, wants: list[int], spans: list[tuple[int, int]], last: torch.Tensor,
                    rows: torch.Tensor) -> dict[Request, torch.Tensor]:  # fmt: skip
        """Each speculating request's logits rows: those before its last (`rows`, span by span), then its last."""
        out, at = {}, 0
        for i, count in spans:
            out[scheduled[i].request] = torch.cat([rows[at : at + count], last[wants.index(i)][None]])
            at += count
        return out

    def _check_draft(self, req: Request, rows: torch.Tensor) -> RequestOutput:
        """The tokens the model writes after a speculating step: its speculated ones while each is the
        one it would have written (its processors over the history so far, then greedy or its
        sampler), then its own. Each is added as a decode step adds its token (stop conditions,
        logprobs), its row's KV kept in the pages, the prefix cache and the store's capture, the rest
        of the step's rows dropped. A sampled answer draws row by row, each after the token before it
        is added, and stops where the answer ends or the draw differs from the proposal: its random
        state (its seed's, or the engine's --seed one) moves once per token, as decoding a token a
        step moves it, so a seeded answer is the one it has without speculation. A speculated token
        is then kept with the probability the model gives it, else the model's token is drawn from
        the rest: speculative sampling's rejection rule for a proposal that is one token for certain."""
        draft, base = list(req.draft), req.num_computed
        req.draft.clear()
        try:
            n = len(draft) + 1
            histories = [(req.prompt_token_ids, req.output_token_ids + draft[:j]) for j in range(n)]
            greedy = self._sample(rows, [req.params] * n, [None] * n, histories, [None] * n) if req.params.greedy else None
            keep = self.store.draft_capture(req) if self.store is not None else None
            accepted = 0
            for j in range(n):
                if greedy is not None:
                    token = greedy[j]
                else:
                    token = self._sample(rows[j : j + 1], [req.params], [req.generator], histories[j : j + 1], [None])[0]
                if isinstance(token, Exception):
                    raise token
                req.num_computed = base + j + 1  # (the rows of the tokens before this one, and of the last token)
                if keep is not None:
                    keep(j + 1)
                self.scheduler.register_full_pages(req)
                if req.logprobs is not None:
                    req.logprobs.append(token_logprob(rows[j], token, req.params.logprobs))
                self._append_token(req, token)
                if j == len(draft) or token != draft[j]:
                    break
                accepted += 1
                if req.is_finished:
                    break
            self.spec_counts["drafts"] += 1
            self.spec_counts["draft_tokens"] += len(draft)
            self.spec_counts["accepted_tokens"] += accepted
            # a step checking speculated tokens costs more the more it checks (on a CPU, 5 of them about
            # 2.2 plain steps: bench/spec_ab.py): after a miss a request proposes less, after a run kept more
            longest = self.speculative.num_speculative_tokens if self.speculative is not None else len(draft)
            req.spec_len = min(longest, 2 * len(draft)) if accepted == len(draft) else accepted + 1
            return self._output(req)
        except Exception:
            log.exception("request %s failed after its forward pass; ending it alone", req.request_id)
            return self._fail_request(req)

    @staticmethod
    def _sample(logits: torch.Tensor, params: list, generators: list, histories: list, rules: list) -> list:
        """The step's tokens; if sampling fails, or a row's logits are NaN, each row again alone
        (seeded rows from the random state they had before), so a row that fails gets its exception
        in place of a token and the others the tokens they would have had."""
        nan = logits.isnan().any(dim=-1).tolist()  # (greedy would pick a token all the same: garbage)
        states = [g.get_state() if g is not None else None for g in generators]
        try:
            if not any(nan):
                return sample_batch(logits, params, generators, histories, rules)
        except Exception:
            pass
        for g, state in zip(generators, states):
            if g is not None:
                g.set_state(state)
        out: list = []
        for i in range(len(params)):
            if nan[i]:
                out.append(FloatingPointError("the model's logits are NaN: its weights or config hold a value "
                                              "that is not finite"))  # fmt: skip
                continue
            try:
                out += sample_batch(logits[i : i + 1], params[i : i + 1], generators[i : i + 1], histories[i : i + 1],
                                    rules[i : i + 1])  # fmt: skip
            except Exception as e:
                out.append(e)
        return out

    def _fail_request(self, req: Request) -> RequestOutput:
        """End a request whose own step failed (finish reason "error"): nothing of it is saved, what
        it wrote so far stays its text where it can still be decoded."""
        try:
            req.text = self._decode(req.output_token_ids)
        except Exception:
            req.text = ""
        self._end(req, "error", saved=False)
        return self._output(req)

    @staticmethod
    def _add_prompt_logprobs(scheduled: list, spans: list[tuple[int, int, int]], logits: torch.Tensor) -> set:
        """Each span (scheduled index, first prompt token, count) owns the next `count` rows: the
        logits that predicted those prompt tokens. (No store load runs for these requests, so no
        step of theirs fails midway.) The requests whose logprobs failed (logged): they end alone."""
        row, broken = 0, set()
        for i, first, count in spans:
            req = scheduled[i].request
            tokens = req.prompt_token_ids[first : first + count]
            try:
                req.prompt_logprobs.extend(token_logprobs(logits[row : row + count], tokens, req.params.prompt_logprobs))
            except Exception:
                log.exception("request %s: its prompt logprobs failed; ending it alone", req.request_id)
                broken.add(req)
            row += count
        return broken

    def _append_token(self, req: Request, token: int) -> None:
        m, now = req.metrics, time.perf_counter()
        if m.first_token_s is None:
            m.first_token_s = now
        m.token_gap_s = None if m.last_token_s is None else now - m.last_token_s  # (vLLM's inter-token latency)
        m.last_token_s = now
        req.output_token_ids.append(token)
        p = req.params
        reason = None
        if req.json is not None:
            req.json.accept(token)
        if token in p.stop_token_ids or token in p.eos_token_ids:
            reason, req.stopped_by_token = "stop", True
            # vLLM's stop_reason: the stop token's id; None for the tokenizer's own EOS, but the
            # generation config's other end ids are stop tokens there (so is the EOS with ignore_eos)
            own_eos = token == self.own_eos_token_id and token in p.eos_token_ids
            req.stop_reason = None if own_eos else token
        # a stop string before a guided answer's completion: the token that completes it may also hold
        # one, and as vLLM (whose grammar ends the answer only with the end token after it) it cuts the text
        elif p.stop and self._hit_stop_string(req):
            reason = "stop"
        elif req.json is not None and req.json.done:
            reason = "stop"  # a guided answer is complete (the JSON object, the tool call)
        elif (p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens) or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(req, reason)

    def _hit_stop_string(self, req: Request) -> bool:
        """Whether the output now contains a stop string (the text is cut before it). The text held back
        for a character cut in two is searched too (a stop string may end before that character);
        text searched before is not searched again, but for a stop string's length before its end.
        As vLLM, only text from the min_tokens-th token on counts: a stop string wholly before it is kept;
        with include_stop_str_in_output the text is cut after the stop string."""
        detok = req.detokenizer
        detok.update(req.output_token_ids)
        text = detok.text + detok.pending
        if len(req.output_token_ids) < req.params.min_tokens:
            # a stop string must end after this much text (not a character still being written:
            # the min_tokens-th token may complete it)
            req.stop_text_before = len(text.rstrip(REPLACEMENT))
            return False
        start = max(req.stop_text_before, req.stop_searched_to)
        req.stop_searched_to = len(detok.text)  # the pending part may decode differently next time
        found = [(text.find(s, max(0, start - len(s) + 1)), s) for s in req.params.stop]
        hits = [(i, s) for i, s in found if i >= 0]
        if not hits:
            return False
        cut, stop = min(hits, key=lambda hit: hit[0])  # the first to start (of those, the first listed)
        end = cut + len(stop) if req.params.include_stop_str_in_output else cut
        req.text, req.stopped_by_string, req.stop_reason = text[:end], True, stop
        return True

    def _finish(self, req: Request, reason: str) -> None:
        if not req.params.detokenize:  # (vLLM's detokenize=False: token ids only)
            req.text = ""
        elif not req.stopped_by_string:  # else the text was cut before the stop string (maybe to "")
            # as vLLM: the EOS or stop token ends the answer without being part of its text (it shows
            # with skip_special_tokens false, or for a stop token that is a word) unless asked for
            hide = req.stopped_by_token and not req.params.include_stop_str_in_output
            req.detokenizer.update(req.output_token_ids[:-1] if hide else req.output_token_ids, final=True)
            req.text = req.detokenizer.text
        self._end(req, reason, saved=reason != "abort" and req.save_to_store)

    def _end(self, req: Request, reason: str, saved: bool) -> None:
        """A request's last moves, its text settled: its reason and times, its turn to the store (or
        not), its pages back to the pool."""
        req.finish_reason = reason
        req.metrics.finish_s = time.perf_counter()
        req.metrics.generated_tokens = len(req.output_token_ids)
        if self.store is not None:
            self.store.request_finished(req, saved=saved)
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens) if self.tokenizer is not None else ""

    def _output(self, req: Request) -> RequestOutput:
        new = req.output_token_ids[req.num_sent :]
        req.num_sent = len(req.output_token_ids)
        if req.is_finished:
            text = req.text
        elif req.stream_text and req.params.detokenize:
            req.detokenizer.update(req.output_token_ids)
            text = req.detokenizer.text
        else:
            text = ""
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=text,
            finished=req.status is Status.FINISHED,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            metrics=req.metrics,
            session_id=req.session_id,
            new_token_ids=new,
            logprobs=None if req.logprobs is None else list(req.logprobs),
            # complete before the first output (sampling waits for the whole prompt) and never changed
            # after: shared, not copied at every step
            prompt_logprobs=req.prompt_logprobs,
        )

    # -- introspection ------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {
            "pages_total": self.pages.num_pages,
            "pages_free": self.pages.num_available(),
            "pages_cached": self.pages.num_cached(),
            "device_evictions": self.pages.evictions,
            "preemptions": self.scheduler.num_preemptions,
            "steps_blocked_on_pages": self.scheduler.steps_blocked["pages"],
            "steps_blocked_on_max_seqs": self.scheduler.steps_blocked["seqs"],
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
        }
        if self.loras is not None:  # (vLLM's lora_requests_info: the adapters of running and waiting requests)
            out["lora_max"] = self.config.lora.max_loras
            for state, queue in (("running", self.scheduler.running), ("waiting", self.scheduler.waiting)):
                out[f"lora_{state}"] = sorted({r.lora.name for r in queue if r.lora is not None})
        if self.config.speculative is not None:  # (vLLM's spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens)
            out.update({f"spec_{name}": count for name, count in self.spec_counts.items()})
        if self.store is not None:
            out.update(self.store.stats())
        return out

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this engine (LLM) is closed; make a new one")

    def close(self) -> None:
        self.closed = True
        if self.store is not None:
            self.store.close()
