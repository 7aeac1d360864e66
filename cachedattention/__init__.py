"""CachedAttention: an LLM serving engine that keeps every conversation's KV cache across turns."""

from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.llm import LLM
from cachedattention.outputs import CompletionOutput, RequestMetrics, RequestOutput
from cachedattention.sampling import GuidedDecodingParams, Logprob, SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "GuidedDecodingParams",
    "Logprob",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "EngineConfig",
    "CacheConfig",
    "SchedulerConfig",
    "StoreConfig",
]
