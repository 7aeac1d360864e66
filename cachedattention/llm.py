"""The offline API: LLM(...).generate(prompts, params) and LLM(...).chat(messages, params, session_id=...)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from cachedattention.beam_search import BeamSearchOutput, BeamSearchParams, beam_search, check_width
from cachedattention.cli_vllm import check_load_format
from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig, StoreConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.errors import InvalidRequest
from cachedattention.interrupts import interrupts_between_steps
from cachedattention.llm_args import local_model_args, lora_config, offloaded_host_bytes, sort_options
from cachedattention.lora.request import LoRARequest
from cachedattention.model.hf_overrides import check_hf_overrides
from cachedattention.model.loader import LoadedModel
from cachedattention.model.messages import ChatOptions, validate_messages, validate_tools
from cachedattention.model.quant_config import check_quantization
from cachedattention.model.tokenizer import Kept
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import MAX_LOGPROBS, SamplingParams, choice_params

Prompt = str | Sequence[int]
Message = dict[str, str]


class _Item(NamedTuple):
    """One prompt to complete: what the engine runs, its params and session, what truncation keeps
    whole, its text (vLLM's out.prompt), its cache salt and its LoRA adapter."""

    prompt: Prompt
    params: SamplingParams | None
    session_id: str | None
    kept: Kept
    text: str | None
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, int) for t in value)


def _one_prompt(prompt: Any) -> Prompt:
    """A text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids} (with its
    "cache_salt", read by _cache_salt), as the engine takes it."""
    if isinstance(prompt, Mapping):
        keys = set(prompt) - {"cache_salt"}
        if keys not in ({"prompt"}, {"prompt_token_ids"}):
            raise InvalidRequest(f'a prompt given as a dict holds "prompt" (a text) or "prompt_token_ids" (token '
                                 f'ids), one of them only, and may hold a "cache_salt"; got the keys '
                                 f"{sorted(map(str, set(prompt)))}", "prompt")  # fmt: skip
        key = keys.pop()
        prompt = prompt[key]
        if (key == "prompt") != isinstance(prompt, str):
            raise InvalidRequest(f'a dict prompt\'s "prompt" is a text and its "prompt_token_ids" a list of token '
                                 f"ids; got {key!r}: {type(prompt).__name__}", "prompt")  # fmt: skip
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and not isinstance(prompt, (bytes, bytearray))):
        return prompt
    raise InvalidRequest(f"a prompt is a text, a list of token ids (ints), or a dict of either; got a "
                         f"{type(prompt).__name__} (an array or tensor of ids: pass .tolist())", "prompt")  # fmt: skip


def _cache_salt(prompt: Any) -> str | None:
    """vLLM's cache_salt of a dict prompt: only prompts of the same salt share cached KV."""
    return prompt.get("cache_salt") if isinstance(prompt, Mapping) else None


def _prompt_list(prompts: Any) -> list[Any]:
    """One prompt, or a list of them, as a list."""
    if isinstance(prompts, (str, Mapping)) or _is_token_ids(prompts) or not isinstance(prompts, (list, tuple)):
        prompts = [prompts]  # (one prompt; anything else is refused with what a prompt may be)
    if not prompts:
        raise InvalidRequest("generate() needs at least one prompt", "prompt")
    for p in prompts:
        _one_prompt(p)  # (each checked before any runs)
    return list(prompts)


def _one_each(value: Any, n: int, name: str) -> list[Any]:
    """One value (SamplingParams, session id) for each of n requests, from one for all or a list of n."""
    each = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(each) != n:
        raise ValueError(f"{name} must be one for all or one per prompt ({n}), got {len(each)}")
    return each


def _as_one(prompt: str | None, choices: list[RequestOutput]) -> RequestOutput:
    """A prompt's output: its first choice's, with its text prompt, and every choice when n > 1."""
    out = choices[0]
    out.prompt = prompt
    if len(choices) > 1:
        out.completions = [c.completion(i) for i, c in enumerate(choices)]
    return out


def _decode_logprobs(out: RequestOutput, tokenizer: Any, texts: dict[int, str]) -> None:
    """vLLM's decoded_token in an output's logprobs: each listed token's own text (`texts`: those
    decoded so far)."""
    if tokenizer is None:
        return
    for name in ("logprobs", "prompt_logprobs"):
        entries = getattr(out, name)
        if not entries:
            continue
        for entry in entries:
            for token in entry or ():
                if token not in texts:
                    texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        setattr(out, name, [None if e is None else replace(e, decoded={t: texts[t] for t in e}) for e in entries])


def _sampling_params(sampling_params: Any, params: Any) -> Any:
    """vLLM's `sampling_params`, or this engine's older name for it, `params`: one of them."""
    if sampling_params is not None and params is not None:
        raise ValueError("give sampling_params or params (its older name), not both")
    return params if sampling_params is None else sampling_params


def _vllm_positional(session_id: Any, use_tqdm: bool | Callable[..., Any]) -> tuple[Any, bool | Callable[..., Any]]:
    """vLLM's generate and chat take use_tqdm third, where these take session_id: a bool there (never
    a session id) is a script written for vLLM saying whether to show the bar."""
    return (None, session_id) if isinstance(session_id, bool) else (session_id, use_tqdm)


def _lora_requests(lora_request: Any, n: int) -> list[LoRARequest | None]:
    """vLLM's `lora_request`: one LoRARequest (or None) for all prompts, or a list of one per prompt."""
    each = _one_each(lora_request, n, "lora_request")
    for r in each:
        if r is not None and not isinstance(r, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest (cachedattention.LoRARequest), a list of one per "
                             f"prompt, or None; got {type(r).__name__}")  # fmt: skip
    return each


def _priorities(priority: Sequence[int] | None, n: int) -> list[int]:
    """vLLM's `priority`: one per prompt (the engine checks each, and the scheduling policy)."""
    if priority is None:
        return [0] * n
    if not isinstance(priority, (list, tuple)) or len(priority) != n:
        raise ValueError(f"priority must be a list of one integer per prompt ({n}), got {priority!r:.80}")
    return list(priority)


def _progress_bar(use_tqdm: bool | Callable[..., Any], total: int) -> Any:
    """vLLM's progress bar over the prompts (tqdm, or the tqdm-like class given), or None."""
    if use_tqdm is False or use_tqdm is None:
        return None
    if use_tqdm is True:
        from tqdm.auto import tqdm as use_tqdm
    elif not callable(use_tqdm):
        raise ValueError(f"use_tqdm must be true, false or a tqdm-like class, got {use_tqdm!r}")
    return use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def _check_distinct(sessions: list[str | None], what: str) -> None:
    named = [s for s in sessions if s is not None]
    if len(set(named)) < len(named):  # (two turns of one session at once: which would be its next?)
        raise InvalidRequest(f"{what} run together need distinct session ids (or none)", "session_id")


class LLM:
    """Run prompts or chat turns to completion in this process.

    LLM() loads the embedded SmolLM2-135M-Instruct on the CPU in float32. Pass store options
    (store_dir, host_bytes, disk_bytes, or any other StoreConfig field by name) or enable_store=True
    to keep every session's KV across turns; enable_store=False runs without the store whatever
    else is given. As vLLM's: `seed` seeds the sampling of requests without their own seed;
    `max_logprobs` bounds the logprobs a request may ask for (-1: no bound); vLLM's engine
    arguments (gpu_memory_utilization, enable_prefix_caching, block_size, max_num_seqs,
    max_num_batched_tokens, scheduling_policy...) and the cache's and scheduler's fields by name
    set those configs (llm_args.py); vLLM's `kv_offloading_size` (GiB) is the store's host_bytes;
    vLLM's `hf_overrides` dict is laid over the model's config.json before its shape is read;
    vLLM's `speculative_config={"method": "ngram", ...}` speculates answers' next tokens by n-gram
    lookup.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        max_model_len: int | None = None,
        enable_store: bool | None = None,
        store_dir: str | None = None,
        host_bytes: int | None = None,
        disk_bytes: int | None = None,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        store: StoreConfig | None = None,
        loaded: LoadedModel | None = None,
        chat_template: str | None = None,
        tokenizer: str | None = None,
        generation_config: str = "auto",
        override_generation_config: dict | None = None,
        seed: int | None = None,
        max_logprobs: int = MAX_LOGPROBS,
        reasoning_parser: str | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        download_dir: str | None = None,
        **options: Any,
    ) -> None:
        for name, value, kind in (("cache", cache, CacheConfig), ("scheduler", scheduler, SchedulerConfig),
                                  ("store", store, StoreConfig)):  # fmt: skip
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        lora = lora_config(options)
        speculative = SpeculativeConfig.of(options.pop("speculative_config", None))  # vLLM's dict
        hf_overrides = check_hf_overrides(options.pop("hf_overrides", None))
        disable_sliding_window = options.pop("disable_sliding_window", False)  # (vLLM's; a bool: EngineConfig checks)
        offloading = options.get("kv_offloading_size") is not None
        host_bytes = offloaded_host_bytes(options, host_bytes)  # (vLLM's kv_offloading_size, in GiB)
        if offloading and enable_store is False:
            raise ValueError("kv_offloading_size keeps KV in the store's host tier, which enable_store=False switches off")
        cache, scheduler, store_options = sort_options(options, cache or CacheConfig(), scheduler or SchedulerConfig())
        # a Hugging Face id from the local hub cache (at vLLM's revision), vLLM's dtype names as ours
        given = model
        model, tokenizer, dtype = local_model_args(model, tokenizer, dtype, device, revision, tokenizer_revision,
                                                   download_dir, hf_overrides)  # fmt: skip
        check_load_format(options.get("load_format"), model)
        check_quantization(options.get("quantization"), model)
        store_options.update((k, v) for k, v in (("store_dir", store_dir), ("host_bytes", host_bytes),
                                                 ("disk_bytes", disk_bytes)) if v is not None)  # fmt: skip
        if enable_store is not None and not isinstance(enable_store, bool):
            raise ValueError(f"enable_store must be true or false, got {enable_store!r}")
        base = store or StoreConfig(enable=False)
        enable = enable_store if enable_store is not None else (base.enable or any(v is not None for v in store_options.values()))
        store_cfg = replace(base, enable=enable, **store_options)
        self.config = EngineConfig(
            model=model,
            model_given=given,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            cache=cache,
            scheduler=scheduler,
            store=store_cfg,
            lora=lora,
            speculative=speculative,
            chat_template=chat_template,
            tokenizer=tokenizer,
            generation_config=generation_config,
            override_generation_config=override_generation_config,
            hf_overrides=hf_overrides,
            disable_sliding_window=disable_sliding_window,
            reasoning_parser=reasoning_parser,
            seed=seed,
            max_logprobs=max_logprobs,
        )
        self.engine = LLMEngine(self.config, loaded=loaded)

    @classmethod
    def from_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> LLM:
        """An LLM over an explicit EngineConfig (the CLI and benchmarks build one from flags)."""
        llm = cls.__new__(cls)
        llm.config = config
        llm.engine = LLMEngine(config, loaded=loaded)
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """vLLM's: the model's tokenizer (None for a model without one)."""
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's: drop the device prefix cache's blocks no request holds (the store's tiers keep
        every session's KV: forget_session drops those). True, as vLLM when it could."""
        self.engine.pages.clear_cache()
        return True

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without SamplingParams samples with: their defaults, with the model's own
        generation config over them (as vLLM's)."""
        return self.engine.default_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        session_id: str | Sequence[str | None] | None = None,
        *,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in prompt order. As vLLM's:
        `sampling_params` (or `params`) and `session_id` are one for all prompts or one per prompt;
        `use_tqdm` shows a progress bar over the prompts (or is tqdm's class, or false); `priority`
        gives each prompt's place under the priority scheduling policy (lower first); `lora_request`
        the LoRA adapter each runs with, one for all or one per prompt (with enable_lora). A request whose own step failed (logged) comes back finished with finish_reason
        "error". As vLLM's, `out.outputs` lists a prompt's completions (SamplingParams.n of them,
        seeded choices with seeds seed, seed + 1, ...); `out.text` and `out.token_ids` are the first's.
        A bool in session_id's place is vLLM's third positional argument, use_tqdm."""
        session_id, use_tqdm = _vllm_positional(session_id, use_tqdm)
        given = _prompt_list(prompts)
        sessions = _one_each(session_id, len(given), "session_id")
        _check_distinct(sessions, "prompts")
        each = _one_each(_sampling_params(sampling_params, params), len(given), "sampling_params")
        loras = _lora_requests(lora_request, len(given))
        items = []
        for g, sp, s, lora in zip(given, each, sessions, loras):
            p = _one_prompt(g)
            items.append(_Item(p, sp, s, Kept(0, 0), p if isinstance(p, str) else None, _cache_salt(g), lora))
        return self._complete(items, _priorities(priority, len(items)), use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        session_id: str | Sequence[str | None] | None = None,
        tools: list[dict] | None = None,
        *,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One assistant turn for each conversation, as vLLM's chat: one output per conversation, in
        a list (one conversation: a list of one). With a session_id a conversation's KV is reused
        next turn. `sampling_params` (or `params`) and `session_id` are one for all or one per
        conversation (ids must differ). `tools`: OpenAI-style function definitions, for chat
        templates that describe them to the model. As vLLM's: `continue_final_message` (with
        add_generation_prompt False) has the model go on with the last message, the assistant's;
        `chat_template_kwargs` are extra template variables; `chat_template` (a Jinja template or
        the file holding one) renders this call's messages; `chat_template_content_format`: a message's
        content reaches the template as one string ("string", its text parts joined a line each), as
        OpenAI's list of text parts ("openai"), or as the template reads it ("auto"); `use_tqdm` and `lora_request` as generate's
        (a bool in session_id's place is vLLM's third positional argument, use_tqdm)."""
        session_id, use_tqdm = _vllm_positional(session_id, use_tqdm)
        options = ChatOptions(add_generation_prompt, continue_final_message, chat_template_kwargs or {})
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat() cannot render messages")
        if chat_template is not None:
            tokenizer = tokenizer.with_chat_template(chat_template)
        tokenizer = tokenizer.with_content_format(chat_template_content_format)  # (a ValueError naming it)
        batch = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batch else [messages]
        sessions = _one_each(session_id, len(convs), "session_id")
        _check_distinct(sessions, "conversations")
        loras = _lora_requests(lora_request, len(convs))
        tools = validate_tools(tools)
        items = []
        each = _one_each(_sampling_params(sampling_params, params), len(convs), "sampling_params")
        for n, (conv, sp, sid, lora) in enumerate(zip(convs, each, sessions, loras)):
            try:
                conv = validate_messages(conv)
            except InvalidRequest as e:
                if not batch:
                    raise
                raise InvalidRequest(f"conversation {n}: {e}", e.param) from None
            prompt = tokenizer.encode_chat(conv, tools=tools, options=options)
            kept = tokenizer.kept_lengths(conv, prompt, tools, options) if sid is not None else Kept(0, 0)
            items.append(_Item(prompt, sp, sid, kept, tokenizer.decode(prompt, skip_special_tokens=False), None, lora))
        return self._complete(items, [0] * len(items), use_tqdm)

    def _complete(self, items: list[_Item], priorities: list[int],
                  use_tqdm: bool | Callable[..., Any] = False) -> list[RequestOutput]:  # fmt: skip
        """Add every request (n of each: one per choice) and step the engine until each has
        finished; one output per item, in their order. If one is refused, or anything stops the run
        (Ctrl-C, between steps), the requests added are withdrawn: they would run unasked later."""
        ids: list[list[str]] = []
        done: dict[str, RequestOutput] = {}
        bar = _progress_bar(use_tqdm, len(items))
        try:
            with interrupts_between_steps() as raise_held:
                for (prompt, sp, sid, (head, tail, starts), _, salt, lora), priority in zip(items, priorities,
                                                                                            strict=True):  # fmt: skip
                    ids.append([])
                    sp = self.engine.default_params() if sp is None else sp
                    if isinstance(sp, SamplingParams) and sp.n > 1 and sid is not None:
                        raise InvalidRequest("n > 1 cannot continue a session: which choice would be its next "
                                             "turn?", "n")  # fmt: skip
                    for i in range(sp.n if isinstance(sp, SamplingParams) else 1):  # (else the engine refuses it)
                        choice = choice_params(sp, i) if isinstance(sp, SamplingParams) else sp
                        ids[-1].append(self.engine.add_request(prompt, choice, session_id=sid, head_tokens=head,
                                                               tail_tokens=tail, turn_starts=starts,
                                                               save_to_store=i == 0, priority=priority,
                                                               cache_salt=salt, lora_request=lora))  # fmt: skip
                        raise_held()
                item_of = {rid: k for k, each in enumerate(ids) for rid in each}
                left = [len(each) for each in ids]  # choices still running, per item
                while len(done) < len(item_of):
                    for out in self.engine.step():
                        if out.finished and out.request_id in item_of:
                            done[out.request_id] = out
                            left[item_of[out.request_id]] -= 1
                            if bar is not None and not left[item_of[out.request_id]]:
                                bar.update(1)
                    raise_held()
        except BaseException:
            for rid in (rid for each in ids for rid in each):
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        texts: dict[int, str] = {}
        for item, each in zip(items, ids):
            # as vLLM: detokenize=False leaves the logprobs' decoded_token None too
            tokenizer = None if item.params is not None and not item.params.detokenize else self.engine.tokenizer
            for rid in each:
                _decode_logprobs(done[rid], tokenizer, texts)
        return [_as_one(items[k].text, [done[rid] for rid in each]) for k, each in enumerate(ids)]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:  # fmt: skip
        """vLLM's: the `params.beam_width` best continuations of each prompt (a text, token ids, or
        vLLM's {"prompt": ...} / {"prompt_token_ids": ...}), best first, each as a
        BeamSearchSequence (its tokens and text include the prompt, as vLLM's). Each step runs every
        beam one token further; their shared prefixes come from the device prefix cache.
        `lora_request`: one adapter for all prompts or one each; `use_tqdm` and `concurrency_limit`
        are accepted (every prompt's beams run together)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
        check_width(params, self.engine.max_logprobs)
        given = _prompt_list(prompts)
        loras = _lora_requests(lora_request, len(given))
        ids = [self.engine.tokenize(_one_prompt(p), True) for p in given]
        results: list[BeamSearchOutput] = []
        tokenizer = self.engine.tokenizer
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        for lora in dict.fromkeys(loras):  # (each adapter's prompts in a search of their own)
            mine = [k for k, r in enumerate(loras) if r == lora]
            found = beam_search([ids[k] for k in mine], params, eos,
                                lambda beams, sp, lora=lora: self.generate(beams, sp, use_tqdm=False, lora_request=lora),
                                lambda tokens: tokenizer.decode(tokens) if tokenizer is not None else "")  # fmt: skip
            results.extend(zip(mine, found))
        return [out for _, out in sorted(results, key=lambda pair: pair[0])]

    def stats(self) -> dict:
        return self.engine.stats()

    def forget_session(self, session_id: str, cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None) -> bool:  # fmt: skip
        """Forget a conversation's KV everywhere it is kept (device pages, host, disk, the remote
        server): its next turn is computed whole. Whether the store held it. `cache_salt` and
        `lora_request`: the salt and adapter its turns had, if any (a session of each salt and
        adapter is a conversation of its own)."""
        return self.engine.forget_session(session_id, cache_salt, lora_request)

    def close(self) -> None:
        self.engine.close()
