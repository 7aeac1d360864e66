"""The offline API: LLM(...).generate(prompts, params) and LLM(...).chat(messages, params, session_id=...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.model.loader import LoadedModel
from cachedattention.model.messages import ChatOptions, validate_messages, validate_tools
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import MAX_LOGPROBS, SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, str]


def _one_each(value: Any, n: int, name: str) -> list[Any]:
    """One value (SamplingParams, session id) for each of n requests, from one for all or a list of n."""
    each = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(each) != n:
        raise ValueError(f"{name} must be one for all or one per prompt ({n}), got {len(each)}")
    return each


class LLM:
    """Run prompts or chat turns to completion in this process.

    LLM() loads the embedded SmolLM2-135M-Instruct on the CPU in float32. Pass enable_store=True
    (with host_bytes / store_dir / disk_bytes) to keep every session's KV across turns. As vLLM's:
    `seed` seeds the sampling of requests without their own seed; `max_logprobs` bounds the
    logprobs a request may ask for (-1: no bound).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int | None = None,
        enable_store: bool = False,
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
        **store_options: Any,
    ) -> None:
        store_cfg = store or StoreConfig(enable=enable_store)
        overrides = {k: v for k, v in (("store_dir", store_dir), ("host_bytes", host_bytes), ("disk_bytes", disk_bytes)) if v is not None}
        overrides.update(store_options)
        if overrides:
            from dataclasses import replace

            store_cfg = replace(store_cfg, enable=enable_store or store_cfg.enable, **overrides)
        self.config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            cache=cache or CacheConfig(),
            scheduler=scheduler or SchedulerConfig(),
            store=store_cfg,
            chat_template=chat_template,
            tokenizer=tokenizer,
            generation_config=generation_config,
            override_generation_config=override_generation_config,
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

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without SamplingParams samples with: their defaults, with the model's own
        generation config over them (as vLLM's)."""
        return self.engine.default_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        session_id: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in prompt order. `params`
        and `session_id` are one for all prompts or one per prompt (as vLLM's sampling_params).
        A request whose own step failed (logged) comes back finished with finish_reason "error"."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts, Sequence) and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        sessions = _one_each(session_id, len(prompts), "session_id")
        each = _one_each(params, len(prompts), "params")
        return self._run(self._submit([(p, sp, s, 0) for p, sp, s in zip(prompts, each, sessions)]))

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        session_id: str | None = None,
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> RequestOutput: ...

    @overload
    def chat(
        self,
        messages: Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        session_id: Sequence[str | None] | None = None,
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]: ...

    def chat(self, messages, params=None, session_id=None, tools=None, *, add_generation_prompt=True,
             continue_final_message=False, chat_template_kwargs=None, chat_template=None):  # fmt: skip
        """One assistant turn for a conversation; with a session_id its KV is reused next turn.

        A list of conversations (as vLLM's chat) runs them together and returns one output each;
        `params` and `session_id` are then one for all or one per conversation (ids must differ).
        `tools`: OpenAI-style function definitions, for chat templates that describe them to the model.
        As vLLM's: `continue_final_message` (with add_generation_prompt False) has the model go on
        with the last message, the assistant's; `chat_template_kwargs` are extra template variables;
        `chat_template` (a Jinja template or the file holding one) renders this call's messages."""
        options = ChatOptions(add_generation_prompt, continue_final_message, chat_template_kwargs or {})
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat() cannot render messages")
        if chat_template is not None:
            tokenizer = tokenizer.with_chat_template(chat_template)
        batch = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batch else [messages]
        sessions = _one_each(session_id, len(convs), "session_id")
        if batch and session_id is not None and len({s for s in sessions if s is not None}) < len(convs):
            raise ValueError("conversations run together need distinct session ids (or none)")
        tools = validate_tools(tools)
        items = []
        for conv, sp, sid in zip(convs, _one_each(params, len(convs), "params"), sessions):
            conv = validate_messages(conv)
            prompt = tokenizer.encode_chat(conv, tools=tools, options=options)
            head = tokenizer.head_length(conv, prompt, tools, options) if sid is not None else 0
            items.append((prompt, sp, sid, head))
        outs = self._run(self._submit(items))
        return outs if batch else outs[0]

    def _submit(self, items: list[tuple[Prompt, SamplingParams | None, str | None, int]]) -> list[str]:
        """Add every request; if one is refused, withdraw those added before it (they would run
        unasked during a later call) and raise."""
        ids: list[str] = []
        try:
            for prompt, sp, sid, head in items:
                ids.append(self.engine.add_request(prompt, sp, session_id=sid, head_tokens=head))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return ids

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
        except BaseException:
            for rid in pending:
                self.engine.abort(rid)
            raise
        return [done[r] for r in request_ids]

    def stats(self) -> dict:
        return self.engine.stats()

    def forget_session(self, session_id: str) -> bool:
        """Forget a conversation's KV everywhere it is kept (device pages, host, disk, the remote
        server): its next turn is computed whole. Whether the store held it."""
        return self.engine.forget_session(session_id)

    def close(self) -> None:
        self.engine.close()
