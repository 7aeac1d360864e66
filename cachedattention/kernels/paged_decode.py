"""Decode attention over the paged KV pool without gathering it (the C kernel in paged_decode.c).

One call per layer covers every decoding sequence of the step, whatever its length and however
scattered its pages: each page is read once where it lies, instead of being copied into a padded
tensor and read again.
"""

from __future__ import annotations

import ctypes
import math

import torch

from cachedattention.kernels.build import load_kernel

# pages per work item: 512 tokens at page size 16, so one long context still splits across threads
CHUNK_TOKENS = 512

_ARGTYPES = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_float]


class PagedDecodeKernel:
    """Attention of one new token per sequence over its pages (float32, CPU)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.paged_decode_attention
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = ctypes.c_int

    @classmethod
    def load(cls) -> PagedDecodeKernel | None:
        lib = load_kernel("paged_decode")
        return cls(lib) if lib is not None else None

    def __call__(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        rows: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        pages: torch.Tensor,
        page_start: torch.Tensor,
        lengths: torch.Tensor,
        page_size: int,
    ) -> None:
        """Write into out[rows[s]] the attention of q[rows[s]] over sequence s's first lengths[s]
        tokens, held in pages[page_start[s]:page_start[s + 1]].

        q, out: [tokens, heads, head_dim]; k_pool, v_pool: [slots, kv_heads, head_dim]; the index
        tensors are int64. Every tensor is a contiguous CPU tensor (float32 or int64).
        """
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = k_pool.shape[1]
        _check(q, out, k_pool, v_pool, rows, pages, page_start, lengths)
        status = self._fn(
            q.data_ptr(), rows.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), pages.data_ptr(),
            page_start.data_ptr(), lengths.data_ptr(), out.data_ptr(), rows.shape[0], heads, kv_heads,
            head_dim, page_size, max(1, CHUNK_TOKENS // page_size), 1.0 / math.sqrt(head_dim),
        )
        if status != 0:
            raise ValueError(f"paged decode kernel refused heads={heads}, kv_heads={kv_heads}, "
                             f"head_dim={head_dim}, page_size={page_size} or a page table too short")


def _check(q, out, k_pool, v_pool, *index: torch.Tensor) -> None:
    # the C code trusts its pointers: a wrong dtype or stride would read the wrong bytes
    for t in (q, out, k_pool, v_pool):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("the paged decode kernel takes contiguous float32 CPU tensors")
    for t in index:
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("the paged decode kernel takes contiguous int64 CPU index tensors")
    if q.shape != out.shape or k_pool.shape != v_pool.shape:
        raise ValueError("q/out and k_pool/v_pool must have matching shapes")
