"""CachedAttention: an LLM serving engine that keeps every conversation's KV cache across turns.

The names below are imported on first use (PEP 562): `cachedattention router`, `--help` and the
command line's errors do not pay for torch and the engine."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (for type checkers and editors: the same names, imported eagerly)
    from cachedattention.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from cachedattention.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, StoreConfig
    from cachedattention.llm import LLM
    from cachedattention.lora.request import LoRARequest
    from cachedattention.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from cachedattention.sampling import GuidedDecodingParams, Logprob, SamplingParams, StructuredOutputsParams

_HOMES = {
    "LLM": "cachedattention.llm",
    "SamplingParams": "cachedattention.sampling",
    "StructuredOutputsParams": "cachedattention.sampling",
    "GuidedDecodingParams": "cachedattention.sampling",
    "Logprob": "cachedattention.sampling",
    "RequestOutput": "cachedattention.outputs",
    "CompletionOutput": "cachedattention.outputs",
    "RequestMetrics": "cachedattention.outputs",
    "EngineConfig": "cachedattention.config",
    "CacheConfig": "cachedattention.config",
    "SchedulerConfig": "cachedattention.config",
    "StoreConfig": "cachedattention.config",
    "LoRAConfig": "cachedattention.config",
    "LoRARequest": "cachedattention.lora.request",
    "BeamSearchParams": "cachedattention.beam_search",
    "BeamSearchOutput": "cachedattention.beam_search",
    "BeamSearchSequence": "cachedattention.beam_search",
}
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "Logprob", "RequestOutput",
           "CompletionOutput", "RequestMetrics", "EngineConfig", "CacheConfig", "SchedulerConfig", "StoreConfig",
           "LoRAConfig", "LoRARequest", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"]  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        return getattr(importlib.import_module(home), name)
    # a submodule, as `import cachedattention` made the ones it imported before it was lazy
    # (cachedattention.config, .sampling, .llm...)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cachedattention' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
