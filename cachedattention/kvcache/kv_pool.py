"""The device KV tensors: one flat slot array per layer for keys (post-RoPE) and values."""

from __future__ import annotations

import math
import mmap

import torch

from cachedattention.kvcache.prefault import HUGE_PAGE, populate
from cachedattention.model.spec import ModelSpec

DEFAULT_CPU_BYTES = 1 << 30
DEFAULT_GPU_FRACTION = 0.5


ACTIVATION_RESERVE = 256 << 20  # beyond the estimate: cuBLAS workspaces, the allocator's fragmentation, the store's scratch
GIB = 1 << 30


def default_pool_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_FRACTION)
    return DEFAULT_CPU_BYTES


def activation_bytes(spec: ModelSpec, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                     element_size: int) -> int:  # fmt: skip
    """An upper estimate of one step's activations beyond the weights and the pool (vLLM measures
    them by profiling a forward pass; this engine's are few and known): the step's hidden states,
    attention and MLP; its logits in float32 (every position's, for prompt logprobs) with softmax's
    copy; and one layer's gathered history (a window's K/V spread to every query head on CUDA, or a
    decode group's K/V), plus a fixed reserve."""
    tokens = max_num_batched_tokens
    q_width = spec.num_heads * spec.head_dim
    per_token = (4 * spec.hidden_size + 3 * spec.widest_mlp() + 3 * q_width) * element_size
    logits = 2 * tokens * spec.vocab_size * 4
    history = 2 * max_model_len * spec.head_dim * element_size  # one head's K and V over a window
    gathered = max(history * spec.num_heads, max_num_seqs * history * spec.num_kv_heads)
    return tokens * per_token + logits + gathered + ACTIVATION_RESERVE


def pool_bytes_for_utilization(fraction: float, total_bytes: int, used_bytes: int, activation_bytes: int,
                               min_bytes: int) -> int:  # fmt: skip
    """vLLM's --gpu-memory-utilization: the pool gets what is left of `fraction` of the device's
    memory once what this engine already uses (the weights) and the activations' headroom are
    counted. ValueError when that is less than `min_bytes` (the smallest pool)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {fraction}")
    budget = int(fraction * total_bytes) - used_bytes - activation_bytes
    if budget < min_bytes:
        raise ValueError(
            f"gpu_memory_utilization {fraction} allows {fraction * total_bytes / GIB:.2f} GiB of the device's "
            f"{total_bytes / GIB:.2f} GiB, but this engine uses {used_bytes / GIB:.2f} GiB already (the weights) "
            f"and {activation_bytes / GIB:.2f} GiB is kept for activations: that leaves no room for "
            f"the KV cache; raise --gpu-memory-utilization, lower --max-num-batched-tokens or --max-model-len, "
            f"or size the pool with --kv-pool-bytes"
        )
    return budget


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Zeroed pool memory, and whether the OS backs it lazily (on first write). On a Linux CPU, an
    anonymous mapping in transparent huge pages: decode attention reads pages scattered over the
    whole pool, and 2 MiB pages spare it most TLB misses."""
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, device=device, dtype=dtype), False
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.zeros(shape, device=device, dtype=dtype), False
    flat = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive as long as any view
    start = -flat.data_ptr() % HUGE_PAGE  # huge pages need 2 MiB alignment
    return flat[start : start + nbytes].view(dtype).view(shape), True


# what the pool stores for each of vLLM's --kv-cache-dtype names ("auto": the model's dtype)
_STORAGE = {"auto": None, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2}  # fmt: skip


def kv_storage_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The dtype the pool stores for vLLM's --kv-cache-dtype `name` (CacheConfig checked it) when
    the model computes in `compute`."""
    return _STORAGE[name] or compute


class KVPool:
    """Slot s = page * page_size + offset. Pages hold keys after RoPE (DESIGN.md).

    `storage` (default `dtype`): what the pages hold. A narrower one (vLLM's --kv-cache-dtype fp8 or
    bfloat16) is written by `write` and read back in `dtype` by `read` / `gather` / `gather_pages`;
    FP8 with a scale of 1, as vLLM's default, values past the format's largest saturating to it. Only
    an exact pool (`storage == dtype`) may be written or read through `k` / `v` directly: a narrower
    one keeps FP8 as its bytes (CPU copies take no FP8 tensors)."""

    def __init__(self, spec: ModelSpec, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype,
                 storage: torch.dtype | None = None) -> None:  # fmt: skip
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype, self.storage = dtype, storage or dtype
        self.exact = self.storage == dtype
        self._fp8 = self.storage.itemsize == 1
        held = torch.uint8 if self._fp8 else self.storage
        shape = (num_pages * page_size, spec.num_kv_heads, spec.head_dim)
        k = [_zeros(shape, device, held) for _ in range(spec.num_layers)]
        v = [_zeros(shape, device, held) for _ in range(spec.num_layers)]
        self.k, self.v = [t for t, _ in k], [t for t, _ in v]
        self._lazy = all(is_lazy for _, is_lazy in k + v)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x as the pages hold it."""
        if self.exact:
            return x.to(self.dtype)
        if not self._fp8:
            return x.to(self.storage)
        limit = torch.finfo(self.storage).max  # saturate (e5m2's cast would give infinities)
        return x.clamp(-limit, limit).to(self.storage).view(torch.uint8)

    def decode(self, held: torch.Tensor) -> torch.Tensor:
        """Values as the pages hold them, in the model's dtype."""
        if self.exact:
            return held
        return (held.view(self.storage) if self._fp8 else held).to(self.dtype)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """x as attention reads it back from the pages: a prompt attending its own new keys directly
        sees what it would see in the pool, so a recomputed turn equals one served from the cache."""
        return x if self.exact else self.decode(self.encode(x))

    def prefault_start(self) -> bool:
        """Back the first huge page of every layer's K and V now, where the OS backs the pool on first
        write: the first requests' pages, faulted in at start-up instead of in their time to first
        token (kvcache/prefault.py). True if done (or nothing to do)."""
        return not self._lazy or populate(self.k + self.v, HUGE_PAGE)

    @staticmethod
    def pages_for_budget(spec: ModelSpec, page_size: int, budget_bytes: int, element_size: int) -> int:
        return max(2, budget_bytes // (spec.kv_bytes_per_token(element_size) * page_size))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, self.encode(k))
        self.v[layer].index_copy_(0, slots, self.encode(v))

    def write_run(self, layer: int, first_slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens into consecutive slots from first_slot."""
        n = k.shape[0]
        self.k[layer][first_slot : first_slot + n].copy_(self.encode(k), non_blocking=True)
        self.v[layer][first_slot : first_slot + n].copy_(self.encode(v), non_blocking=True)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.k[layer].index_select(0, slots)), self.decode(self.v[layer].index_select(0, slots))

    def gather_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole pages in the given order: [len(pages) * page_size, kv_heads, head_dim] each
        (a copy per page, not per token; the page table is all a step has to build)."""
        token_shape = (-1, *self.k[layer].shape[1:])
        k = self.k[layer].view(self.num_pages, -1).index_select(0, pages).view(token_shape)
        v = self.v[layer].view(self.num_pages, -1).index_select(0, pages).view(token_shape)
        return self.decode(k), self.decode(v)

    def read(
        self, layer: int, pages: torch.Tensor, length: int, first_slot: int | None, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of a sequence's tokens [start, length), held in these pages: views of the pool when
        they are consecutive from first_slot (token 0's), else a gather of the pages holding them."""
        if first_slot is None:
            first_page = start // self.page_size
            k, v = self.gather_pages(layer, pages[first_page:])
            lo, hi = start - first_page * self.page_size, length - first_page * self.page_size
            return k[lo:hi], v[lo:hi]
        run = slice(first_slot + start, first_slot + length)
        return self.decode(self.k[layer][run]), self.decode(self.v[layer][run])

    @staticmethod
    def contiguous_start(pages: list[int], page_size: int, start: int, end: int) -> int | None:
        """The slot of token `start` when tokens start..end-1 occupy consecutive slots, else None.

        Consecutive slots let a writer fill a plain slice of the pool instead of scattering.
        """
        first, last = start // page_size, (end - 1) // page_size
        run = pages[first : last + 1]
        if any(b != a + 1 for a, b in zip(run, run[1:])):
            return None
        return run[0] * page_size + start % page_size

    @staticmethod
    def slots_for(pages: list[int], page_size: int, start: int, end: int, device: torch.device) -> torch.Tensor:
        """Slots of token indices start..end-1 of a sequence with this page table (built on the CPU)."""
        idx = torch.arange(start, end)
        table = torch.tensor(pages, dtype=torch.long)
        return (table[idx // page_size] * page_size + idx % page_size).to(device, non_blocking=True)
