"""The small per-layer operations of a decode step in one C call each (row_ops.c): the residual add
with the RMSNorm that follows it, Qwen3's norm of each head's q and k, the rotation of q and k with
the KV write into the pool, the gated MLP's activation, and a LoRA adapter's share of a linear
layer's output.

For a few rows, torch spends its time dispatching operators, not computing; the model uses these
for steps of at most MAX_ROWS tokens on a CPU in float32.
"""

from __future__ import annotations

import ctypes

import torch

from cachedattention.kernels.build import load_kernel
from cachedattention.kernels.few_rows_linear import MAX_ROWS  # the same few-row steps (decode)
from cachedattention.kernels.kv_types import kv_type

_BAD_INDEX = 2
LORA_MAX_RANK = 512  # row_ops.c's


class RowOpsKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._norm = lib.add_rms_norm
        self._norm.argtypes = (*[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
        self._norm.restype = ctypes.c_int
        self._rope = lib.rope_store_kv
        self._rope.argtypes = (*[ctypes.c_void_p] * 9, *[ctypes.c_int64] * 6)
        self._rope.restype = ctypes.c_int
        self._head_norm = lib.head_rms_norm
        self._head_norm.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
        self._head_norm.restype = ctypes.c_int
        self._silu_mul = lib.silu_mul
        self._silu_mul.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        self._silu_mul.restype = ctypes.c_int
        self._lora_add = lib.lora_add
        self._lora_add.argtypes = (*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 5)
        self._lora_add.restype = ctypes.c_int

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
        storage: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rotates q in place, writes rotated k and v into the pools at `slots`; returns rotated k.

        q [rows, heads, d]; k, v [rows, kv_heads, d]; cos, sin [rows, 1, d] or [rows, d];
        slots int64 [rows]; pools [num_slots, kv_heads, d] of `storage` values (FP8 as its bytes),
        written as torch casts them. k itself (pre-RoPE) is not changed.
        """
        rows, heads, d = q.shape
        kv_heads = k.shape[1]
        _need_float32(q, k, v, cos, sin)
        values = kv_type(storage, (k_pool, v_pool), "rope_store")
        if (k.shape != (rows, kv_heads, d) or v.shape != k.shape or k_pool.shape[1:] != k.shape[1:]
                or v_pool.shape != k_pool.shape or cos.numel() != rows * d or sin.numel() != rows * d or d % 2):
            raise ValueError("rope_store: shapes of q, k, v, cos, sin and the pools do not agree")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.shape != (rows,) or slots.device.type != "cpu":
            raise ValueError("rope_store: slots must be a contiguous int64 CPU vector, one per row")
        k_rot = torch.empty_like(k)
        status = self._rope(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                            slots.data_ptr(), k_rot.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                            rows, heads, kv_heads, d, k_pool.shape[0], values)
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


    def lora_add(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
        """y[r] += (a @ x[r]) @ bt for each row r in `rows` (in place): a [rank, in], bt [rank, out]
        (an adapter's B transposed, its scale in it), x [n, in], y [n, out], rows int64 on the CPU."""
        _need_float32(x, a, bt, y)
        rank, n = a.shape[0], x.shape[0]
        if (a.dim() != 2 or bt.dim() != 2 or bt.shape[0] != rank or a.shape[1] != x.shape[1]
                or y.shape != (n, bt.shape[1])):  # fmt: skip
            raise ValueError(f"lora_add: x {tuple(x.shape)}, a {tuple(a.shape)}, bt {tuple(bt.shape)} and y "
                             f"{tuple(y.shape)} disagree")  # fmt: skip
        if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous() or rows.device.type != "cpu":
            raise ValueError("lora_add: rows must be a contiguous 1-D int64 CPU tensor")
        status = self._lora_add(x.data_ptr(), a.data_ptr(), bt.data_ptr(), y.data_ptr(), rows.data_ptr(),
                                rows.shape[0], n, x.shape[1], y.shape[1], rank)  # fmt: skip
        if status:
            raise ValueError("lora_add: " + ("a row out of range" if status == _BAD_INDEX else
                                             f"a rank of {rank}, past the kernel's {LORA_MAX_RANK}"))


def _need_float32(*tensors: torch.Tensor) -> None:
    # the C code trusts dtypes and layouts: a mismatch would read or write the wrong bytes
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"row ops take contiguous float32 CPU tensors; got {t.dtype} {tuple(t.shape)} on {t.device}")
