"""Frozen configuration dataclasses for the engine, the KV cache and the store."""

from __future__ import annotations

import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields

from cachedattention.model.hf_overrides import check_hf_overrides
from cachedattention.store.remote_url import check_remote_url

_DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's, but for Gaudi's and MLA's
CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's chat template content formats
MAX_LOGPROBS = 20  # most alternatives a token's logprobs may list by default (vLLM's max_logprobs)


def _as_type(value: object, kind: object) -> tuple[bool, object]:
    """Whether `value` is of `kind`, and the value as the field keeps it: a numpy integer or float as
    Python's, a path as its str."""
    if kind is type(None):
        return value is None, value
    if isinstance(value, bool):  # (JSON's true is an int to isinstance)
        return kind is bool, value
    if kind is int:
        ok = isinstance(value, numbers.Integral)
        return ok, int(value) if ok else value
    if kind is float:  # (an int is a number too; ranges are each field's own check)
        ok = isinstance(value, numbers.Real)
        return ok, value if not ok or isinstance(value, (int, float)) else float(value)
    if kind is str and isinstance(value, os.PathLike):
        return True, os.fspath(value)
    if kind is dict or typing.get_origin(kind) is dict:
        return isinstance(value, Mapping), value
    return (isinstance(value, kind) if isinstance(kind, type) else True), value


def _check_types(config: object) -> None:
    """Every field of a config holds a value of its annotated type (an int that is no bool, a str...):
    a wrong one is a ValueError naming the field, not a TypeError from deep inside the engine."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        for kind in kinds:
            ok, kept = _as_type(value, kind)
            if ok:
                object.__setattr__(config, f.name, kept)
                break
        else:
            names = " or ".join("None" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds)
            raise ValueError(f"{f.name} must be {names}, got {type(value).__name__} {value!r:.80}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged device KV pool: page size and how much memory it may take."""

    page_size: int = 16
    memory_bytes: int | None = None  # None: a default sized for the device (see kvcache.kv_pool)
    num_pages: int | None = None  # explicit page count wins over memory_bytes (tests force preemption)
    enable_prefix_cache: bool = True  # keep finished requests' pages as a device-tier cache
    # vLLM's gpu_memory_utilization: on CUDA, the share of the device's memory this engine may use for
    # weights, activations and the pool together (the pool takes what is left); None: the default size.
    # memory_bytes and num_pages win over it; on a CPU it does not apply (see kvcache.kv_pool)
    gpu_memory_utilization: float | None = None
    # vLLM's kv_cache_dtype: what the pages hold ("auto": the model's dtype; fp8 is e4m3, scale 1)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        f = self.gpu_memory_utilization
        if f is not None and not 0.0 < f <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1] of the device's memory "
                             f"(vLLM's default is 0.9), got {f}")  # fmt: skip
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"the KV pool's bytes (kv_pool_bytes, --kv-pool-bytes) must be positive, got "
                             f"{self.memory_bytes}; leave it unset for the default size")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be at least 2, got {self.num_pages}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens per step (chunked prefill) and running requests."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 16
    long_prefill_token_threshold: int = 0  # most prompt tokens one request computes per step (0: the budget)
    # vLLM's --scheduling-policy: "fcfs" (arrival order) or "priority" (a request's priority, lower first,
    # then arrival; the running request of the lowest priority, newest first, is preempted for pages)
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: no limit below the step's budget)")


@dataclass(frozen=True)
class StoreConfig:
    """AttentionStore tiers below the device: host DRAM and local disk, with byte budgets."""

    enable: bool = True
    store_dir: str | None = None  # None: no disk tier
    host_bytes: int = 2 << 30
    disk_bytes: int = 16 << 30
    storage_dtype: str | None = None  # None: the model's dtype
    layerwise: bool = True  # overlap loading layer l+1 with computing layer l
    preload: bool = True  # load the queue head's stored KV into its pages while it waits (device read buffer)
    write_through: bool = True  # with a disk tier, persist each new segment at once (kill -9 loses at most one turn)
    policy: str = "lookahead"
    prefetch_window: int | None = None
    host_free_threshold: float = 0.05  # demote host -> disk ahead of need when free host falls below this share
    disk_ttl_s: float | None = None  # forget sessions whose KV has not been used for this long (None: keep)
    # context overflow: keep a head, drop a share of the history, reuse the rest
    truncation: str = "reuse"  # "reuse" (keep KV at new positions) | "recompute" (paper's baseline) | "off"
    keep_head_tokens: int | None = None  # None: the first turn's system prompt (found by the session)
    drop_fraction: float = 0.5
    # earlier branches kept per session (a turn that edits, regenerates or forks the conversation
    # keeps the one it left), so that going back to one reuses its KV; 0: only the latest is kept
    session_branches: int = 4
    # a model with sliding-window layers: a segment that no later turn's window reaches (before its
    # record's newest turn by more than the window and a page, and not its first) keeps only the layers
    # without one in host memory. "disk": once its file holds every layer (a turn resuming further
    # back reads them from there); "drop": also without a disk tier (such a turn resumes before it);
    # "keep": every layer stays
    windowed_history: str = "disk"
    # a Redis-protocol store shared by replicas (redis://HOST:PORT/DB, rediss://, unix:///PATH): every
    # session's turns published there, a session another replica served fetched from there
    remote_url: str | None = None
    remote_timeout_s: float = 2.0  # a call to the remote store gives up after this long
    remote_wait_s: float = 2.0  # at admission, wait at most this long for a turn's segments still coming from remote
    remote_ttl_s: float | None = None  # the remote store forgets values not written again for this long (None: never)
    remote_namespace: str = "cachedattention"  # key prefix: deployments sharing one server keep apart

    def __post_init__(self) -> None:
        _check_types(self)
        if self.host_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("host_bytes and disk_bytes must be >= 0")
        if self.storage_dtype is not None and self.storage_dtype not in _DTYPES:
            raise ValueError(f"storage_dtype must be one of {_DTYPES}, got {self.storage_dtype!r}")
        if self.windowed_history not in ("disk", "drop", "keep"):
            raise ValueError(f"windowed_history must be 'disk', 'drop' or 'keep', got {self.windowed_history!r}")
        if self.truncation not in ("reuse", "recompute", "off"):
            raise ValueError(f"truncation must be 'reuse', 'recompute' or 'off', got {self.truncation!r}")
        if not 0.0 <= self.host_free_threshold < 1.0:
            raise ValueError(f"host_free_threshold must be in [0, 1), got {self.host_free_threshold}")
        if self.disk_ttl_s is not None and not self.disk_ttl_s > 0:
            raise ValueError(f"disk_ttl_s must be > 0 seconds or None, got {self.disk_ttl_s}")
        if self.session_branches < 0:
            raise ValueError(f"session_branches must be >= 0, got {self.session_branches}")
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1], got {self.drop_fraction}")
        if self.remote_url is not None:
            check_remote_url(self.remote_url)
        if not self.remote_timeout_s > 0 or not self.remote_wait_s >= 0:
            raise ValueError(f"remote_timeout_s must be > 0 and remote_wait_s >= 0 seconds, got {self.remote_timeout_s} and {self.remote_wait_s}")
        if not self.remote_namespace or any(c.isspace() for c in self.remote_namespace):
            raise ValueError(f"remote_namespace must be a non-empty name without spaces, got {self.remote_namespace!r}")
        if self.remote_ttl_s is not None and not self.remote_ttl_s >= 0.001:
            raise ValueError(f"remote_ttl_s must be at least 0.001 seconds or None, got {self.remote_ttl_s}")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (vLLM's --enable-lora and its limits): `max_loras` adapters in one step,
    each of rank at most `max_lora_rank`; `max_cpu_loras` kept loaded (None: max_loras), the least
    recently used read again from its folder when asked for once more."""

    enable: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be 1-512 (vLLM's largest is 512), got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")

    @property
    def kept_loaded(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


SPEC_METHODS = ("ngram",)  # speculative decoding's proposers (vLLM's names)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config, its n-gram method (prompt lookup): a request's next
    `num_speculative_tokens` are proposed from the tokens that followed the latest earlier match of
    its last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`), and one forward pass
    checks them all. As vLLM's: both bounds 5 when neither is given, one given sets the other."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported: {', '.join(SPEC_METHODS)} "
                             "(a draft model, EAGLE or MTP need weights this engine does not load)")  # fmt: skip
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be 1-32, got {self.num_speculative_tokens}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        lo, hi = (5, 5) if lo is None and hi is None else (hi if lo is None else lo, lo if hi is None else hi)
        if not 1 <= lo <= hi:
            raise ValueError(f"prompt_lookup_min ({lo}) and prompt_lookup_max ({hi}) must be 1 <= min <= max")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def of(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """vLLM's speculative_config as a dict (its keys), ours, or None; unknown keys refused by name."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: {unknown[0]!r} is not supported (known: {', '.join(sorted(known))})")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; built by LLM(...) or the CLI."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    # the model as it was given (a Hugging Face id, or a path as typed) where `model` is its local
    # path (a hub id's snapshot): what /v1/models' cards give as `root`, as vLLM's; None: `model`
    model_given: str | None = None
    tokenizer: str | None = None  # vLLM's --tokenizer: a folder (or GGUF file) whose tokenizer serves instead of the model's
    device: str = "cpu"
    dtype: str = "float32"
    # None: the model's window; -1 (vLLM's auto): the model's window, lowered to what the KV pool holds
    max_model_len: int | None = None
    # vLLM's --seed: the random state of sampled requests without their own seed, so that they repeat
    # from one start to the next (None: torch's global state, different each start)
    seed: int | None = None
    max_logprobs: int = MAX_LOGPROBS  # most logprobs / prompt_logprobs a request may ask for (-1: no limit)
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    store: StoreConfig = StoreConfig(enable=False)
    lora: LoRAConfig = LoRAConfig()
    speculative: SpeculativeConfig | None = None  # vLLM's speculative_config (None: one token a step)
    chat_template: str | None = None  # a Jinja chat template, or a file holding one, instead of the tokenizer's
    # how a message's content reaches the template (vLLM's --chat-template-content-format): one string,
    # OpenAI's list of text parts, or as the template reads it (auto)
    chat_template_content_format: str = "auto"
    # the model's sampling defaults (vLLM's --generation-config): "auto" reads generation_config.json
    # beside the weights, "vllm" ignores it, a folder reads that folder's file
    generation_config: str = "auto"
    # laid over the generation config's defaults, in its names (vLLM's --override-generation-config)
    override_generation_config: dict | None = None
    # laid over the model's config.json before its shape is read (vLLM's --hf-overrides)
    hf_overrides: dict | None = None
    # vLLM's --disable-sliding-window: the window capped at the model's sliding window, where windowed
    # attention is full attention
    disable_sliding_window: bool = False
    # how the model writes its reasoning (qwen3, deepseek_r1, seed_oss; vLLM's --reasoning-parser): a guided
    # answer is held to its shape only after the reasoning (engine/reasoning_gate.py)
    reasoning_parser: str | None = None

    @property
    def window_given(self) -> int | None:
        """The window the user sized (None: the model's, or -1's auto)."""
        return self.max_model_len if self.max_model_len is not None and self.max_model_len > 0 else None

    def __post_init__(self) -> None:
        _check_types(self)
        check_hf_overrides(self.hf_overrides)
        if self.reasoning_parser is not None:
            from cachedattention.reasoning_parser import reasoning_parser

            reasoning_parser(self.reasoning_parser)  # a ValueError naming the known ones
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got "
                             f"{self.chat_template_content_format!r}")  # fmt: skip
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0 and self.max_model_len != -1:
            raise ValueError(f"max_model_len must be positive, or -1 for the model's window lowered to what the KV "
                             f"pool holds (vLLM's auto), got {self.max_model_len}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= 0, or -1 for no limit, got {self.max_logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
