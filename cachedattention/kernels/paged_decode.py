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
from cachedattention.kernels.kv_types import kv_type

# pages per work item: 512 tokens at page size 16, so one long context still splits across threads
CHUNK_TOKENS = 512

_ARGTYPES = (*[ctypes.c_void_p] * 9, *[ctypes.c_int64] * 10, ctypes.c_float, ctypes.c_float, ctypes.c_int64)
_FAILURES = {  # the C code's return codes
    1: "unsupported shape",
    2: "an index is out of range (rows, page ids, page_start, lengths or starts)",
}
_NO_MEMORY = 3


class PagedDecodeKernel:
    """Attention of one new token per sequence over its pages (float32 queries, CPU; pages of
    float32, bfloat16 or FP8)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.paged_decode_attention_kv
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = ctypes.c_int
        self._supports = lib.paged_decode_supports
        self._supports.argtypes = [ctypes.c_int64] * 4
        self._supports.restype = ctypes.c_int

    @classmethod
    def load(cls) -> PagedDecodeKernel | None:
        lib = load_kernel("paged_decode")
        return cls(lib) if lib is not None else None

    def supports(self, heads: int, kv_heads: int, head_dim: int, page_size: int) -> bool:
        """Whether the kernel takes this model shape and page size (else the caller keeps torch)."""
        return bool(self._supports(heads, kv_heads, head_dim, page_size))

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
        starts: torch.Tensor | None = None,
        cap: float | None = None,
        storage: torch.dtype = torch.float32,
    ) -> None:
        """Write into out[rows[s]] the attention of q[rows[s]] over sequence s's first lengths[s]
        tokens, held in pages[page_start[s]:page_start[s + 1]]; from its token starts[s] on when
        given (a sliding window: the tokens before it are not read); `cap`: each score s becomes
        cap * tanh(s / cap) before the softmax (Gemma 2's).

        q, out: float32 [tokens, heads, head_dim]; k_pool, v_pool: [pages * page_size, kv_heads,
        head_dim] of `storage` values (FP8 as their bytes: uint8); the index tensors are int64.
        Every tensor is a contiguous CPU tensor. The C code checks every index before it follows one.
        """
        _check(q, out, k_pool, v_pool, rows, pages, page_start, lengths, page_size, starts)
        values = kv_type(storage, (k_pool, v_pool), "the paged decode kernel")
        heads, head_dim, kv_heads = q.shape[1], q.shape[2], k_pool.shape[1]
        status = self._fn(
            q.data_ptr(), rows.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), pages.data_ptr(),
            page_start.data_ptr(), lengths.data_ptr(), starts.data_ptr() if starts is not None else None, out.data_ptr(), rows.shape[0], q.shape[0],
            k_pool.shape[0] // page_size, pages.shape[0], heads, kv_heads, head_dim, page_size,
            max(1, CHUNK_TOKENS // page_size), torch.get_num_threads(), 1.0 / math.sqrt(head_dim),
            0.0 if cap is None else float(cap), values,
        )
        if status == _NO_MEMORY:
            raise MemoryError("paged decode kernel: out of memory for its work items")
        if status != 0:
            raise ValueError(f"paged decode kernel: {_FAILURES.get(status, f'error {status}')} "
                             f"(heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}, page_size={page_size})")


def _check(q, out, k_pool, v_pool, rows, pages, page_start, lengths, page_size: int, starts=None) -> None:
    # the C code trusts dtypes, layouts and shapes: a mismatch would read the wrong bytes
    for t in (q, out, k_pool, v_pool):
        if t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 3:
            raise ValueError("the paged decode kernel takes contiguous 3-D CPU tensors")
    if q.dtype != torch.float32 or out.dtype != torch.float32:
        raise ValueError("the paged decode kernel takes float32 queries and outputs")
    if starts is not None and starts.shape != lengths.shape:
        raise ValueError("starts needs one entry per sequence, as lengths")
    for t in (rows, pages, page_start, lengths, *([starts] if starts is not None else [])):
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 1:
            raise ValueError("the paged decode kernel takes contiguous 1-D int64 CPU index tensors")
    if q.shape != out.shape or k_pool.shape != v_pool.shape or q.shape[2] != k_pool.shape[2]:
        raise ValueError("q/out and k_pool/v_pool must match, with the same head_dim")
    if page_size <= 0 or k_pool.shape[0] % page_size:
        raise ValueError(f"the pool's {k_pool.shape[0]} slots are not whole pages of {page_size}")
    if page_start.shape[0] != rows.shape[0] + 1 or lengths.shape[0] != rows.shape[0]:
        raise ValueError("page_start needs one entry per sequence plus one, lengths one per sequence")
