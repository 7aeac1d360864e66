"""The device KV tensors: one flat slot array per layer for keys (post-RoPE) and values."""

from __future__ import annotations

import math
import mmap

import torch

from cachedattention.kvcache.prefault import HUGE_PAGE, populate
from cachedattention.model.spec import ModelSpec

DEFAULT_CPU_BYTES = 1 << 30
DEFAULT_GPU_FRACTION = 0.5


def default_pool_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_FRACTION)
    return DEFAULT_CPU_BYTES


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


class KVPool:
    """Slot s = page * page_size + offset. Pages hold keys after RoPE (DESIGN.md)."""

    def __init__(
        self, spec: ModelSpec, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages * page_size, spec.num_kv_heads, spec.head_dim)
        k = [_zeros(shape, device, dtype) for _ in range(spec.num_layers)]
        v = [_zeros(shape, device, dtype) for _ in range(spec.num_layers)]
        self.k, self.v = [t for t, _ in k], [t for t, _ in v]
        self._lazy = all(is_lazy for _, is_lazy in k + v)

    def prefault_start(self) -> bool:
        """Back the first huge page of every layer's K and V now, where the OS backs the pool on first
        write: the first requests' pages, faulted in at start-up instead of in their time to first
        token (kvcache/prefault.py). True if done (or nothing to do)."""
        return not self._lazy or populate(self.k + self.v, HUGE_PAGE)

    @staticmethod
    def pages_for_budget(spec: ModelSpec, page_size: int, budget_bytes: int, element_size: int) -> int:
        return max(2, budget_bytes // (spec.kv_bytes_per_token(element_size) * page_size))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def gather_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole pages in the given order: [len(pages) * page_size, kv_heads, head_dim] each
        (a copy per page, not per token; the page table is all a step has to build)."""
        token_shape = (-1, *self.k[layer].shape[1:])
        k = self.k[layer].view(self.num_pages, -1).index_select(0, pages).view(token_shape)
        v = self.v[layer].view(self.num_pages, -1).index_select(0, pages).view(token_shape)
        return k, v

    def read(
        self, layer: int, pages: torch.Tensor, length: int, first_slot: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of a sequence's first `length` tokens, held in these pages: views of the pool when
        they are consecutive from first_slot, else a gather of the pages."""
        if first_slot is None:
            k, v = self.gather_pages(layer, pages)
            return k[:length], v[:length]
        end = first_slot + length
        return self.k[layer][first_slot:end], self.v[layer][first_slot:end]

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
