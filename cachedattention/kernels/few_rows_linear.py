"""Linear layers for a few rows at a time on a CPU (the C kernel in few_rows_linear.c).

A decode step multiplies each weight by one row per decoder. Reading the weights is all the work
there is, and MKL's GEMM reads them at 45-60 % of its one-row speed for 4-16 rows; this kernel reads them
once, near the machine's memory bandwidth (bench/few_rows_linear_timing.py).
"""

from __future__ import annotations

import ctypes

import torch

from cachedattention.kernels.build import load_kernel

# Up to this many rows the kernel beats MKL here (bench/few_rows_linear_timing.py); prefill
# chunks are far larger and keep MKL's GEMM, which is compute-bound and good at it.
MAX_ROWS = 32

_ARGTYPES = (*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 6)


class FewRowsLinearKernel:
    """y = x @ weight.T (+ bias) for float32 CPU tensors with at most MAX_ROWS rows."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.few_rows_linear
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = ctypes.c_int

    @classmethod
    def load(cls) -> FewRowsLinearKernel | None:
        """The kernel, or None where it cannot serve (no compiler, no AVX-512)."""
        lib = load_kernel("few_rows_linear")
        if lib is None or not lib.few_rows_linear_supported():
            return None
        return cls(lib)

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call is one for the kernel: a few float32 CPU rows, a contiguous weight."""
        return (
            x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.is_contiguous()
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.takes(x, weight) or x.shape[1] != weight.shape[1] or weight.dim() != 2:
            raise ValueError(
                f"few-rows linear takes 1-{MAX_ROWS} float32 CPU rows against a contiguous [out, in] "
                f"float32 weight; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
            )
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (weight.shape[0],)
                                 or not bias.is_contiguous()):
            raise ValueError(f"bias must be a contiguous float32 vector of {weight.shape[0]}")
        x = x.contiguous()  # a few rows: a copy costs nothing next to the weight
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        status = self._fn(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(),
            x.shape[0], x.shape[1], weight.shape[0], x.stride(0), y.stride(0), torch.get_num_threads(),
        )
        if status != 0:
            raise ValueError(f"few-rows linear: unsupported call (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
        return y
