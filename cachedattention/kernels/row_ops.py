"""The small per-layer operations of a decode step in one C call each (row_ops.c): the residual add
with the RMSNorm that follows it, Qwen3's norm of each head's q and k, the rotation of q and k with
the KV write into the pool, and the gated MLP's activation.

For a few rows, torch spends its time dispatching operators, not computing; the model uses these
for steps of at most MAX_ROWS tokens on a CPU in float32.
"""

from __future__ import annotations

import ctypes

import torch

from cachedattention.kernels.build import load_kernel
from cachedattention.kernels.few_rows_linear import MAX_ROWS  # the same few-row steps (decode)

_BAD_INDEX = 2


class RowOpsKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._norm = lib.add_rms_norm
        self._norm.argtypes = (*[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
        self._norm.restype = ctypes.c_int
        self._rope = lib.rope_store
        self._rope.argtypes = (*[ctypes.c_void_p] * 9, *[ctypes.c_int64] * 5)
        self._rope.restype = ctypes.c_int
        self._head_norm = lib.head_rms_norm
        self._head_norm.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
        self._head_norm.restype = ctypes.c_int
        self._silu_mul = lib.silu_mul
        self._silu_mul.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        self._silu_mul.restype = ctypes.c_int

    @classmethod
    def load(cls) -> RowOpsKernel | None:
        lib = load_kernel("row_ops")
        return cls(lib) if lib is not None else None

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """Whether a step's hidden states [tokens, hidden] are a few float32 CPU rows."""
        return x.shape[0] <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual += delta (in place, when given); returns RMSNorm(residual) * weight."""
        rows, dim = residual.shape
        _need_float32(residual, weight, *([] if delta is None else [delta]))
        if (delta is not None and delta.shape != residual.shape) or weight.shape != (dim,):
            raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)}, delta "
                             f"{None if delta is None else tuple(delta.shape)} and weight {tuple(weight.shape)} disagree")
        out = torch.empty_like(residual)
        self._norm(residual.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                   out.data_ptr(), rows, dim, eps)
        return out

    def head_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [rows, heads, d] = RMSNorm over each head's d values * weight [d], in place; returns x."""
        _need_float32(x, weight)
        d = x.shape[-1]
        if weight.shape != (d,):
            raise ValueError(f"head_rms_norm: weight {tuple(weight.shape)} is not one per head value ({d})")
        self._head_norm(x.data_ptr(), weight.data_ptr(), x.numel() // d, d, eps)
        return x

    def rope_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
    ) -> torch.Tensor:
        """Rotates q in place, writes rotated k and v into the pools at `slots`; returns rotated k.

        q [rows, heads, d]; k, v [rows, kv_heads, d]; cos, sin [rows, 1, d] or [rows, d];
        slots int64 [rows]; pools [num_slots, kv_heads, d]. k itself (pre-RoPE) is not changed.
        """
        rows, heads, d = q.shape
        kv_heads = k.shape[1]
        _need_float32(q, k, v, cos, sin, k_pool, v_pool)
        if (k.shape != (rows, kv_heads, d) or v.shape != k.shape or k_pool.shape[1:] != k.shape[1:]
                or v_pool.shape != k_pool.shape or cos.numel() != rows * d or sin.numel() != rows * d or d % 2):
            raise ValueError("rope_store: shapes of q, k, v, cos, sin and the pools do not agree")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.shape != (rows,) or slots.device.type != "cpu":
            raise ValueError("rope_store: slots must be a contiguous int64 CPU vector, one per row")
        k_rot = torch.empty_like(k)
        status = self._rope(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                            slots.data_ptr(), k_rot.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                            rows, heads, kv_heads, d, k_pool.shape[0])
        if status == _BAD_INDEX:
            raise ValueError(f"rope_store: a slot is outside the pool's {k_pool.shape[0]} slots")
        return k_rot

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate = silu(gate) * up, in place; returns gate."""
        _need_float32(gate, up)
        if gate.shape != up.shape:
            raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        self._silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel())
        return gate


def _need_float32(*tensors: torch.Tensor) -> None:
    # the C code trusts dtypes and layouts: a mismatch would read or write the wrong bytes
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"row ops take contiguous float32 CPU tensors; got {t.dtype} {tuple(t.shape)} on {t.device}")
