"""The offline API: LLM(...).generate(prompts, params) and LLM(...).chat(messages, params, session_id=...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.model.loader import LoadedModel
from cachedattention.model.tokenizer import validate_messages
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Run prompts or chat turns to completion in this process.

    LLM() loads the embedded SmolLM2-135M-Instruct on the CPU in float32. Pass enable_store=True
    (with host_bytes / store_dir / disk_bytes) to keep every session's KV across turns.
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

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        session_id: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in prompt order. `params`
        and `session_id` are one for all prompts or one per prompt (as vLLM's sampling_params)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts, Sequence) and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        sessions = list(session_id) if isinstance(session_id, (list, tuple)) else [session_id] * len(prompts)
        if len(sessions) != len(prompts):
            raise ValueError("session_id must be one id or one per prompt")
        each = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or one per prompt ({len(prompts)}), got {len(each)}")
        ids: list[str] = []
        try:
            for p, sp, s in zip(prompts, each, sessions):
                ids.append(self.engine.add_request(p, sp, session_id=s))
        except BaseException:  # one bad prompt: the ones before it must not run later, unasked
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        params: SamplingParams | None = None,
        session_id: str | None = None,
    ) -> RequestOutput:
        """One assistant turn for a conversation; with a session_id its KV is reused next turn."""
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat() cannot render messages")
        messages = validate_messages(messages)
        prompt = self.engine.tokenizer.encode_chat(messages)
        head = self.engine.tokenizer.head_length(messages, prompt)
        rid = self.engine.add_request(prompt, params, session_id=session_id, head_tokens=head)
        return self._run([rid])[0]

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

    def close(self) -> None:
        self.engine.close()
