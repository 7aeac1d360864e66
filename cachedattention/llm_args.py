"""`LLM(...)`'s extra keyword arguments sorted into the configs: the store's options by their
StoreConfig names, the cache's and scheduler's by theirs, and vLLM's engine arguments by vLLM's
names (its defaults, None, leave ours), or checked where this engine only behaves one way; and
the model, tokenizer and dtype as vLLM names them (a hub id, `auto`, `half`) made ours."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from cachedattention.cli_vllm import (
    OFFLOAD_GIB,
    load_format,
    offloading_backend,
    offloading_host_bytes,
    quantization_method,
    tokenizer_mode,
)
from cachedattention.cli_vllm_ignored import ACCEPTED_ENGINE_FLAGS, IGNORED_ENGINE_ARGS
from cachedattention.config import CacheConfig, LoRAConfig, SchedulerConfig, StoreConfig
from cachedattention.model.hf_overrides import apply_hf_overrides
from cachedattention.model.hub_cache import local_model_path

STORE_FIELDS = frozenset(f.name for f in fields(StoreConfig)) - {"enable"}
# vLLM's names (and our fields not named alike in the store's): (config, field)
_CONFIG_ARGS = {
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"), "enable_prefix_caching": ("cache", "enable_prefix_cache"),
    "enable_prefix_cache": ("cache", "enable_prefix_cache"), "block_size": ("cache", "page_size"),
    "page_size": ("cache", "page_size"), "num_pages": ("cache", "num_pages"), "kv_pool_bytes": ("cache", "memory_bytes"),
    "kv_cache_memory_bytes": ("cache", "memory_bytes"), "kv_cache_dtype": ("cache", "kv_cache_dtype"),
    "max_num_seqs": ("scheduler", "max_num_seqs"), "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "long_prefill_token_threshold": ("scheduler", "long_prefill_token_threshold"),
    "scheduling_policy": ("scheduler", "policy"),
}  # fmt: skip
# vLLM's arguments that ask for what this engine does anyway, or that change nothing here (swap_space,
# max_seq_len_to_capture, guided_decoding_backend): each checked as the command line checks its flag
_CHECKED = {"tokenizer_mode": tokenizer_mode, "load_format": load_format,
            "quantization": quantization_method, "kv_offloading_size": OFFLOAD_GIB,
            "kv_offloading_backend": offloading_backend,
            **{name: check for name, (check, _, _) in IGNORED_ENGINE_ARGS.items()}}  # fmt: skip
# true or false: it never runs a model's own code, always runs eagerly, logs no periodic stats, and
# schedules a step once the last one's tokens are in (async_scheduling changes nothing)
_ACCEPTED = ("trust_remote_code", "enforce_eager", "disable_log_stats", "async_scheduling", *ACCEPTED_ENGINE_FLAGS)


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
            if given[config].get(field, value) != value:  # (vLLM's name and ours both given: block_size and page_size)
                named = [n for n, (c, f) in _CONFIG_ARGS.items() if (c, f) == (config, field) and n in options]
                raise ValueError(f"{' and '.join(named)} both set the {config}'s {field}, to different values: give one")
            given[config][field] = value
        elif name in STORE_FIELDS:
            store[name] = value
        elif name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if value != 1:
                raise ValueError(f"{name} must be 1: this engine runs one device")
        elif name in _CHECKED:
            _check_as_its_flag(name, value)
        elif name == "kv_transfer_config":
            raise ValueError("kv_transfer_config is not taken: this engine runs no KV connectors; its store is its KV "
                             "offloading (kv_offloading_size in GiB or host_bytes; store_dir for a disk tier, "
                             "remote_url for one shared by replicas)")  # fmt: skip
        elif name == "compilation_config":  # (vLLM's level, dict or CompilationConfig: nothing compiles here)
            if isinstance(value, bool) or not isinstance(value, int | dict) and type(value).__name__ != "CompilationConfig":
                raise ValueError(f"compilation_config must be a level or a dict, got {type(value).__name__}")
        elif name in _ACCEPTED:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        elif name == "enable_chunked_prefill":  # (None, vLLM's default, was skipped above)
            if value is not True:
                raise ValueError("enable_chunked_prefill must be True: this scheduler always chunks prefill; to "
                                 "compute a prompt in as few steps as it can, raise max_num_batched_tokens")  # fmt: skip
        else:
            raise ValueError(f"LLM() got an unknown argument {name!r}: see help(LLM); the store's options are "
                             "StoreConfig's fields, the cache's and scheduler's CacheConfig's and "
                             "SchedulerConfig's (or give cache=, scheduler=, store=)")  # fmt: skip
    return replace(cache, **given["cache"]), replace(scheduler, **given["scheduler"]), store


def offloaded_host_bytes(options: dict[str, Any], host_bytes: int | None) -> int | None:
    """The store's host budget: `host_bytes`, or vLLM's kv_offloading_size (GiB) taken out of
    `options` (both: they must agree); its kv_offloading_backend (native or lmcache) is checked."""
    size = options.pop("kv_offloading_size", None)
    backend = options.pop("kv_offloading_backend", None)
    if backend is not None:
        _check_as_its_flag("kv_offloading_backend", backend)
    if size is None:
        return host_bytes
    _check_as_its_flag("kv_offloading_size", size)
    return offloading_host_bytes(float(size), host_bytes)


# vLLM's LoRA arguments, by LoRAConfig's names
_LORA_ARGS = {"enable_lora": "enable", "max_loras": "max_loras", "max_lora_rank": "max_lora_rank",
              "max_cpu_loras": "max_cpu_loras"}  # fmt: skip


def lora_config(options: dict[str, Any]) -> LoRAConfig:
    """The LoRA config from vLLM's LoRA arguments, taken out of `options` (None: vLLM's default);
    `lora_dtype` must be "auto" (adapters run in the model's dtype), `fully_sharded_loras` changes
    nothing on one device."""
    given = {_LORA_ARGS[k]: options.pop(k) for k in list(options) if k in _LORA_ARGS}
    dtype = options.pop("lora_dtype", None)
    if dtype not in (None, "auto"):
        raise ValueError(f"lora_dtype must be 'auto': adapters run in the model's dtype, got {dtype!r}")
    sharded = options.pop("fully_sharded_loras", None)
    if sharded is not None and not isinstance(sharded, bool):
        raise ValueError(f"fully_sharded_loras must be true or false, got {sharded!r}")
    return LoRAConfig(**{k: v for k, v in given.items() if v is not None})


def _check_as_its_flag(name: str, value: Any) -> None:
    """A ValueError naming `name` where the command line would refuse its flag given this value (as
    text: 8192.0 is no integer there either; a dict or list as JSON)."""
    try:
        _CHECKED[name](json.dumps(value) if isinstance(value, dict | list) else str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{name}: {e}") from None


# vLLM's --dtype names: ours, or None for auto
VLLM_DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
               "float32": "float32"}  # fmt: skip


def engine_dtype(dtype: str | torch.dtype, device: str, model: str | None,
                 hf_overrides: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The dtype this engine runs `model` in for vLLM's dtype on `device` (`model`: a folder, a GGUF
    file, or None for the embedded model; its config with `hf_overrides` laid over it): one of vLLM's
    names in any case, or a torch dtype."""
    name = _vllm_dtype_name(dtype)
    if name not in VLLM_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(VLLM_DTYPES)} (or torch.float16, torch.bfloat16, "
                         f"torch.float32), got {dtype!r}")  # fmt: skip
    exact = VLLM_DTYPES[name]
    return exact if exact is not None else auto_dtype(device.split(":")[0], checkpoint_dtype(model, hf_overrides))


def _vllm_dtype_name(dtype: str | torch.dtype) -> str:
    """As vLLM reads LLM(dtype=...): a name lowercased, a torch dtype as its own name (float64's is
    then refused, as it is on vLLM's platforms)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a name (auto, half, float16, bfloat16, float, float32) or a torch dtype, "
                         f"got {type(dtype).__name__}")  # fmt: skip
    return dtype.lower()


def auto_dtype(device_type: str, checkpoint: str | None) -> str:
    """vLLM's `auto`: on CUDA the checkpoint's 16-bit dtype, float16 for a float32 (or unsaid) one.
    On a CPU float32: this engine computes in float32 there (16-bit arithmetic is 4-6x slower on
    a CPU; a 16-bit checkpoint's weights are still held as they are)."""
    if device_type == "cpu":
        return "float32"
    return checkpoint if checkpoint in ("bfloat16", "float16") else "float16"


def checkpoint_dtype(model: str | None, hf_overrides: dict[str, Any] | None = None) -> str | None:
    """config.json's torch_dtype (transformers' newer name: dtype; a multimodal model's text
    config's) of a model folder, with `hf_overrides` laid over it; None where none says (a GGUF
    file, the embedded model)."""
    if model is None or not Path(model).expanduser().is_dir():
        return None
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # (the loader refuses the folder, saying why)
        return None
    if not isinstance(config, dict):
        return None
    config = apply_hf_overrides(config, hf_overrides)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for place in (config, text):
        for key in ("torch_dtype", "dtype"):
            if isinstance(place.get(key), str):
                return place[key].removeprefix("torch.")
    return None


def local_model_args(model: str | None, tokenizer: str | None, dtype: str | torch.dtype, device: str,
                     revision: str | None = None, tokenizer_revision: str | None = None,
                     download_dir: str | None = None,
                     hf_overrides: dict[str, Any] | None = None) -> tuple[str | None, str | None, str]:  # fmt: skip
    """The model and tokenizer as paths (a Hugging Face model id read from the local hub cache, at
    vLLM's revision; `download_dir`: vLLM's --download-dir, the cache to look in) and the dtype as
    ours (vLLM's auto, half, float resolved for the model and its `hf_overrides`)."""
    if model is None and revision is not None:
        raise ValueError(f"a revision ({revision!r}) picks a version of a Hugging Face model id: give the model's id")
    if tokenizer is None and tokenizer_revision is not None:
        raise ValueError("--tokenizer-revision picks a version of --tokenizer's model id: give --tokenizer")
    if model is not None:
        model = _local_path(model, "model", revision, download_dir)
    if tokenizer is not None:
        tokenizer = _local_path(tokenizer, "tokenizer", tokenizer_revision, download_dir)
    return model, tokenizer, engine_dtype(dtype, device, model, hf_overrides)


def _local_path(source: str, what: str, revision: str | None, cache_dir: str | None) -> str:
    """`source` as local_model_path finds it; an id the default cache lacks, with no revision or
    cache named, stays as given (the loader refuses it, saying how to get it, when it loads)."""
    if revision is None and cache_dir is None:
        try:
            return local_model_path(source, what)
        except ValueError:
            return source
    return local_model_path(source, what, revision, cache_dir)
