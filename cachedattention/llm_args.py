"""`LLM(...)`'s extra keyword arguments sorted into the configs: the store's options by their
StoreConfig names, the cache's and scheduler's by theirs, and vLLM's engine arguments by vLLM's
names (its defaults, None, leave ours), or checked where this engine only behaves one way."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any

from cachedattention.cli_vllm import kv_cache_dtype, load_format, tokenizer_mode
from cachedattention.config import CacheConfig, SchedulerConfig, StoreConfig

STORE_FIELDS = frozenset(f.name for f in fields(StoreConfig)) - {"enable"}
# vLLM's names (and our fields not named alike in the store's): (config, field)
_CONFIG_ARGS = {
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"), "enable_prefix_caching": ("cache", "enable_prefix_cache"),
    "enable_prefix_cache": ("cache", "enable_prefix_cache"), "block_size": ("cache", "page_size"),
    "page_size": ("cache", "page_size"), "num_pages": ("cache", "num_pages"), "kv_pool_bytes": ("cache", "memory_bytes"),
    "max_num_seqs": ("scheduler", "max_num_seqs"), "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "long_prefill_token_threshold": ("scheduler", "long_prefill_token_threshold"),
    "scheduling_policy": ("scheduler", "policy"),
}  # fmt: skip
# vLLM's arguments that ask for what this engine does anyway (each its own check of the value)
_ONE_WAY = {"kv_cache_dtype": kv_cache_dtype, "tokenizer_mode": tokenizer_mode, "load_format": load_format}
_ACCEPTED = ("trust_remote_code", "enforce_eager")  # it never runs a model's own code, and always runs eagerly


def sort_options(options: dict[str, Any], cache: CacheConfig, scheduler: SchedulerConfig
                 ) -> tuple[CacheConfig, SchedulerConfig, dict[str, Any]]:  # fmt: skip
    """The cache and scheduler configs with the options that set them, and the store's options;
    a ValueError for any other name."""
    given: dict[str, dict[str, Any]] = {"cache": {}, "scheduler": {}}
    store: dict[str, Any] = {}
    for name, value in options.items():
        if value is None and name not in STORE_FIELDS:  # vLLM's default: ours stays
            continue
        if name in _CONFIG_ARGS:
            config, field = _CONFIG_ARGS[name]
            given[config][field] = value
        elif name in STORE_FIELDS:
            store[name] = value
        elif name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if value != 1:
                raise ValueError(f"{name} must be 1: this engine runs one device")
        elif name in _ONE_WAY:
            try:
                _ONE_WAY[name](value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{name}: {e}") from None
        elif name not in _ACCEPTED:
            raise ValueError(f"LLM() got an unknown argument {name!r}: see help(LLM); the store's options are "
                             "StoreConfig's fields, the cache's and scheduler's CacheConfig's and "
                             "SchedulerConfig's (or give cache=, scheduler=, store=)")  # fmt: skip
    return replace(cache, **given["cache"]), replace(scheduler, **given["scheduler"]), store
