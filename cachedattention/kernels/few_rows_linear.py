"""Linear layers for a few rows at a time on a CPU (the C kernel in few_rows_linear.c).

A decode step multiplies each weight by one row per decoder. Reading the weights is all the work
there is, and MKL's GEMM reads them at 45-60 % of its one-row speed for 4-16 rows; this kernel reads them
once, near the machine's memory bandwidth (bench/few_rows_linear_timing.py).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from cachedattention.kernels.build import load_kernel

# Up to this many rows the kernel beats MKL here (bench/few_rows_linear_timing.py): on float32
# weights, and on GGUF blocks (a quarter of the bytes or less). Prefill chunks are far larger and keep
# MKL's GEMM, which is compute-bound and good at it.
MAX_ROWS = 32
MAX_ROWS_GGUF = 96
# blocks with no float32 copy (a GGUF mixture's experts): up to this many rows the kernel beats
# dequantizing them for the call and running MKL (a Q4_K expert of 768 x 2048: 4.6 against 6.2 ms at
# 256 rows, 9.3 against 5.8 at 384; bench/expert_rows_timing.py); past it, dequantized per call
MAX_ROWS_BLOCKS_ONLY = 256

_ARGTYPES = (*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 6)
_QUANTIZED_ARGTYPES = (ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 6)
_DEQUANTIZE_ARGTYPES = (ctypes.c_int64, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3)
# the block kinds the kernel reads (blocks of 32 weights): GGUF's Q4_1 and Q8_0 as they are; Q8_M
# (int8 values, a scale and a min a block), Q8_S16 (int8 values, a scale for each 16) and Q4_MS16
# (Q4_1's nibbles, a scale and a min for each 16) hold K-quant files' super-blocks re-expressed
# exactly (model/gguf_kquants.py; Q4_K becomes Q4_1); BF16 and F16 (16-bit floats, no scales) hold
# a checkpoint's bfloat16 or float16 weights (or a GGUF's) in half float32's bytes; F8 (FP8 e4m3 values,
# a scale a block) an FP8 checkpoint's (model/fp8.py)
_KINDS = {"Q4_1": 1, "Q8_0": 2, "Q8_M": 3, "Q8_S16": 4, "Q4_MS16": 5, "BF16": 6, "F16": 7, "F8": 8}
QUANTIZED_KINDS = ("Q4_1", "Q8_0")  # GGUF types read as they are
HALF_KINDS = {"BF16": torch.bfloat16, "F16": torch.float16}
# kind: (dtype of the quants, weights per quant, weights per scale (0: none), whether there are mins)
_LAYOUTS = {"Q4_1": (torch.uint8, 2, 32, True), "Q8_0": (torch.int8, 1, 32, False),
            "Q8_M": (torch.int8, 1, 32, True), "Q8_S16": (torch.int8, 1, 16, False),
            "Q4_MS16": (torch.uint8, 2, 16, True), "BF16": (torch.int16, 1, 0, False),
            "F16": (torch.int16, 1, 0, False), "F8": (torch.uint8, 1, 32, False)}  # fmt: skip
_NO_MEMORY = 3


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight kept as blocks of 32, for the kernel to read instead of float32: the quantized
    values (Q4_1 and Q4_MS16: two per byte, element j of a block in the low nibble of byte j and
    element j + 16 in its high nibble; BF16 and F16: the 16-bit floats' bits; the others: int8), each
    block's float32 scale (Q8_S16 and Q4_MS16: one per 16 values; BF16 and F16: none) and, for Q4_1,
    Q8_M and Q4_MS16, as many mins (value = scale * q + min). Dequantized, it equals GGUF's float32
    values exactly (a 16-bit float's, as torch converts it)."""

    kind: str
    quants: torch.Tensor  # uint8 [out, in / 2] (Q4_1, Q4_MS16), int16 [out, in] (BF16, F16) or int8 [out, in]
    scales: torch.Tensor  # float32 [out, in / 32] ([out, in / 16] for Q8_S16 and Q4_MS16; [out, 0] for BF16, F16)
    mins: torch.Tensor | None  # float32, as the scales, for Q4_1, Q8_M and Q4_MS16
    shape: tuple[int, int]  # (out_features, in_features)

    def __post_init__(self) -> None:
        # the C code trusts these layouts: a mismatch would read the wrong bytes
        out, k = self.shape
        layout = _LAYOUTS.get(self.kind)
        ok = layout is not None and k % 32 == 0
        if ok:
            dtype, per_byte, per_scale, has_mins = layout
            ok = (
                self.quants.dtype == dtype
                and self.quants.shape == (out, k // per_byte)
                and (self.mins is not None) == has_mins
                and _plain_floats(self.scales, (out, k // per_scale if per_scale else 0))
                and (self.mins is None or _plain_floats(self.mins, (out, k // per_scale)))
                and self.quants.is_contiguous()
                and self.quants.device.type == "cpu"
            )
        if not ok:
            raise ValueError(f"not a valid {self.kind} weight of shape {self.shape} for the few-rows kernel")

    @staticmethod
    def weights_per_scale(kind: str) -> int:
        return _LAYOUTS[kind][2]

    @classmethod
    def from_gguf_rows(cls, kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
        """From a GGUF tensor's raw rows (uint8 [out, bytes per row]) of type Q4_1 or Q8_0."""
        if kind not in QUANTIZED_KINDS or in_features % 32:
            raise ValueError(f"the few-rows kernel reads Q4_1 and Q8_0 rows of whole blocks, not {kind} of {in_features}")
        block_bytes = {"Q4_1": 20, "Q8_0": 34}[kind]
        out = rows.shape[0]
        blocks = np.ascontiguousarray(rows).reshape(out, in_features // 32, block_bytes)
        scales = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)[:, :, 0]
        if kind == "Q4_1":
            mins = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).astype(np.float32)[:, :, 0])
            quants = torch.from_numpy(blocks[:, :, 4:].reshape(out, -1).copy())
        else:
            mins = None
            quants = torch.from_numpy(blocks[:, :, 2:].reshape(out, -1).copy().view(np.int8))
        return cls(kind, quants, torch.from_numpy(scales), mins, (out, in_features))

    @classmethod
    def from_halves(cls, weight: torch.Tensor) -> QuantizedWeight | None:
        """A float32 [out, in] weight as BF16 (else F16) blocks when every value is one of those
        exactly (a checkpoint's bfloat16 or float16 weights), rows of whole blocks of 32; else None."""
        if weight.dim() != 2 or weight.shape[1] % 32 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        if weight.shape[0] == 0:
            return None
        weight = weight.detach()
        for dtype in HALF_KINDS.values():
            # every bit (-0.0 too), a few rows first: a float32 checkpoint's weight fails there, cheaply
            few = weight[[0, weight.shape[0] // 2, weight.shape[0] - 1]]
            if all(torch.equal(rows.to(dtype).float().view(torch.int32), rows.view(torch.int32)) for rows in (few, weight)):
                return cls.from_16_bit(weight.to(dtype))
        return None

    @classmethod
    def from_16_bit(cls, values: torch.Tensor) -> QuantizedWeight:
        """A bfloat16 or float16 [out, in] tensor as BF16 or F16 blocks (its memory when contiguous)."""
        kind = next(kind for kind, dtype in HALF_KINDS.items() if dtype == values.dtype)
        return cls(kind, values.contiguous().view(torch.int16), torch.empty(values.shape[0], 0, dtype=torch.float32),
                   None, tuple(values.shape))  # fmt: skip

    def take_rows(self, rows: torch.Tensor) -> QuantizedWeight:
        """The same weight with its rows taken in this order (a row's blocks move with it)."""
        return QuantizedWeight(self.kind, self.quants[rows].contiguous(), self.scales[rows].contiguous(),
                               None if self.mins is None else self.mins[rows].contiguous(), (len(rows), self.shape[1]))  # fmt: skip

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float32 weight [out, in], or some of its rows (GGUF's own dequantization, in torch)."""
        k = self.shape[1]
        if self.kind in HALF_KINDS:
            return self.quants[rows].view(HALF_KINDS[self.kind]).float().reshape(-1, k)
        if self.kind in ("Q4_1", "Q4_MS16"):
            q = self.quants[rows].reshape(-1, k // 32, 16).to(torch.int32)
            q = torch.cat([q & 15, q >> 4], dim=2)
        elif self.kind == "F8":
            q = self.quants[rows].view(torch.float8_e4m3fn)
        else:
            q = self.quants[rows]
        per_scale = self.weights_per_scale(self.kind)
        w = self.scales[rows][:, :, None] * q.reshape(-1, k // per_scale, per_scale).float()
        if self.mins is not None:  # (one for each scale)
            w = w + self.mins[rows][:, :, None]
        return w.reshape(-1, k)

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether `weight` is this weight dequantized, comparing its checked rows exactly."""
        if tuple(weight.shape) != self.shape or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return False
        return self.matches_rows({r: weight[r : r + 1].detach() for r in self.checked_rows(self.shape[0])})

    def matches_rows(self, rows: dict[int, torch.Tensor]) -> bool:
        """Whether these rows ({index: float32 [1, in]}) are this weight's, dequantized, exactly."""
        return all(torch.equal(self.dequantize(slice(r, r + 1)), row) for r, row in rows.items())

    @staticmethod
    def checked_rows(out_features: int) -> list[int]:
        """The rows a check compares: 0, 1 and the last (row 1 also tells whether q/k rows were put
        in the same order: llama.cpp's permutation moves it)."""
        return sorted({0, min(1, out_features - 1), out_features - 1})


def _plain_floats(t: torch.Tensor, shape: tuple[int, int]) -> bool:
    return t.dtype == torch.float32 and t.shape == shape and t.is_contiguous() and t.device.type == "cpu"


def kind_code(kind: str) -> int:
    """The C code's number for a GGUF block type it reads."""
    return _KINDS[kind]


class FewRowsLinearKernel:
    """y = x @ weight.T (+ bias) for float32 CPU rows, at most MAX_ROWS of them (MAX_ROWS_GGUF
    against GGUF blocks)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.few_rows_linear
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = ctypes.c_int
        self._quantized = lib.few_rows_linear_quantized
        self._quantized.argtypes = _QUANTIZED_ARGTYPES
        self._quantized.restype = ctypes.c_int
        self._dequantize = lib.few_rows_dequantize
        self._dequantize.argtypes = _DEQUANTIZE_ARGTYPES
        self._dequantize.restype = ctypes.c_int
        # each thread's buffer for dequantized weights (engines sharing a model may run at once)
        self._scratch = threading.local()

    @classmethod
    def load(cls) -> FewRowsLinearKernel | None:
        """The kernel, or None where it cannot serve (no compiler, no AVX-512)."""
        lib = load_kernel("few_rows_linear")
        if lib is None or not lib.few_rows_linear_supported():
            return None
        return cls(lib)

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, blocks_only: bool = False) -> bool:
        """Whether this call is one for the kernel: a few float32 CPU rows as wide as the weight's
        input, and a contiguous 2-D float32 CPU weight or GGUF blocks (`blocks_only`: blocks with no
        float32 copy, for more rows)."""
        if isinstance(weight, QuantizedWeight):
            max_rows, in_features = MAX_ROWS_BLOCKS_ONLY if blocks_only else MAX_ROWS_GGUF, weight.shape[1]
        elif weight.dtype == torch.float32 and weight.dim() == 2 and weight.is_contiguous() and weight.device.type == "cpu":
            max_rows, in_features = MAX_ROWS, weight.shape[1]
        else:
            return False
        return (
            x.dim() == 2
            and 0 < x.shape[0] <= max_rows
            and x.shape[1] == in_features
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        )

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.takes(x, weight):
            raise ValueError(
                f"few-rows linear takes 1-{MAX_ROWS} float32 CPU rows (1-{MAX_ROWS_GGUF} against GGUF blocks) "
                f"as wide as a contiguous [out, in] float32 weight; got x {tuple(x.shape)} {x.dtype}, "
                f"weight {_describe(weight)}"
            )
        return self.run(x, weight, bias)

    def run(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """The call, once takes(x, weight) holds (the model's linear layers ask first)."""
        out_features = weight.shape[0]
        _check_bias(bias, out_features)
        x = x.contiguous()  # a few rows: a copy costs nothing next to the weight
        y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
        shape = (x.shape[0], x.shape[1], out_features, _row_stride(x), y.stride(0), torch.get_num_threads())
        bias_ptr = bias.data_ptr() if bias is not None else None
        if isinstance(weight, QuantizedWeight):
            mins = weight.mins.data_ptr() if weight.mins is not None else None
            status = self._quantized(x.data_ptr(), _KINDS[weight.kind], weight.quants.data_ptr(),
                                     weight.scales.data_ptr(), mins, bias_ptr, y.data_ptr(), *shape)
        else:
            status = self._fn(x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(), *shape)
        if status == _NO_MEMORY:
            raise MemoryError("few-rows linear: out of memory for its dequantization buffers")
        if status != 0:
            raise ValueError(f"few-rows linear: unsupported call (x {tuple(x.shape)}, weight {_describe(weight)})")
        return y


    def dequantize(self, weight: QuantizedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's blocks as float32 [out, in] (into `out`, contiguous, when given), rows split
        across threads, in a fraction of torch's time: QuantizedWeight's own values, bit for bit,
        where scale * q is exact, as it is for every block made from a GGUF file (float16 scales;
        otherwise the compiler may fuse the min's add)."""
        if out is None:
            out = torch.empty(weight.shape, dtype=torch.float32)
        elif tuple(out.shape) != weight.shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"few-rows dequantize: out must be a contiguous float32 {weight.shape}, got {tuple(out.shape)}")
        mins = weight.mins.data_ptr() if weight.mins is not None else None
        status = self._dequantize(_KINDS[weight.kind], weight.quants.data_ptr(), weight.scales.data_ptr(), mins,
                                  out.data_ptr(), weight.shape[1], weight.shape[0], torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise ValueError(f"few-rows dequantize: unsupported weight ({_describe(weight)})")
        return out

    def dequantized_linear(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T (+ bias) for a call of more rows than the kernel takes on a weight held only as
        blocks: dequantized into this thread's buffer, then torch's GEMM. The buffer is kept, grown to
        the largest weight seen: a fresh one of a large weight pays its page faults on every call (a
        Llama-3-8B MLP weight: 56 ms against 8 ms for the dequantization alone). A call autograd
        records gets a weight of its own (it keeps the weight for the backward pass)."""
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, self.dequantize(weight).to(x.dtype), bias)
        numel = weight.shape[0] * weight.shape[1]
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < numel:
            self._scratch.buffer = None  # (let the smaller one go before the larger is allocated)
            buffer = self._scratch.buffer = torch.empty(numel, dtype=torch.float32)
        w = self.dequantize(weight, buffer[:numel].view(weight.shape))
        return F.linear(x, w.to(x.dtype), bias)


def _describe(weight: torch.Tensor | QuantizedWeight) -> str:
    if isinstance(weight, QuantizedWeight):
        return f"{weight.kind} blocks of {weight.shape}"
    return f"{tuple(weight.shape)} {weight.dtype}"


def _check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,) or not bias.is_contiguous()
                             or bias.device.type != "cpu"):
        raise ValueError(f"bias must be a contiguous float32 CPU vector of {out_features}")


def _row_stride(x: torch.Tensor) -> int:
    # torch calls one row contiguous whatever its stride; the C code wants rows at least a row apart
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]
