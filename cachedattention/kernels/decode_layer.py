"""A decoder layer of a few-row decode step in two C calls (decode_layer.c), on a CPU in float32.

The C side runs the very kernels the per-operation path calls (few-rows linear, row ops, paged
decode), so the results are the same bit for bit; what goes is Python's dispatch between them.
Weights and pools are described once (`LayerArgs`), the step's shape and buffers once per step
(`StepArgs`); both keep the tensors they point at alive.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from cachedattention.kernels.build import load_kernel
from cachedattention.kernels.few_rows_linear import MAX_ROWS, QuantizedWeight, kind_code
from cachedattention.kernels.kv_types import kv_type
from cachedattention.kernels.paged_decode import CHUNK_TOKENS
from cachedattention.kernels.row_ops import LORA_MAX_RANK

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
_FAILURES = {1: "unsupported shape", 2: "a slot or page index is out of range", 3: "out of memory"}


class _Linear(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("weight", "quants", "scales", "mins", "bias")],
        *[(name, ctypes.c_int64) for name in ("kind", "in_features", "out_features")],
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *[(name, _Linear) for name in LINEARS],
        *[(name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "k_pool", "v_pool", "q_norm", "k_norm")],
        ("index", ctypes.c_int64),
        ("kv_type", ctypes.c_int64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int64) for name in
          ("rows", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "num_slots", "num_threads")],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *[(name, ctypes.c_void_p) for name in ("cos", "sin", "slots", "seq_rows", "pages", "page_start", "lengths")],
        *[(name, ctypes.c_int64) for name in ("num_seqs", "table_len", "page_size", "chunk_pages")],
        *[(name, ctypes.c_void_p) for name in ("residual", "delta", "h", "q", "attn", "k_rot", "gate", "up")],
        ("lora_groups", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("lora_rows", "lora_start", "lora_rank", "lora_a", "lora_bt")],
    ]


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float

    def __post_init__(self) -> None:
        dims = (self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate)
        if min(dims) <= 0 or self.head_dim % 2 or self.heads % self.kv_heads:
            raise ValueError(f"not a decoder layer shape the fused kernel takes: {self}")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}


class LayerArgs:
    """One layer's weights (float32 or GGUF blocks, with an optional bias), norms (and Qwen3's norms of
    each head's q and k, when given) and pools, checked once: the C code trusts every layout."""

    def __init__(
        self,
        shape: LayerShape,
        linears: dict[str, tuple[torch.Tensor | QuantizedWeight, torch.Tensor | None]],
        norms: tuple[torch.Tensor, torch.Tensor],
        pools: tuple[torch.Tensor, torch.Tensor],
        head_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
        index: int = 0,
        storage: torch.dtype = torch.float32,
    ) -> None:
        """`index`: the layer's place in the model (its row of a step's LoRA tables); `storage`: what
        the pools' pages hold (vLLM's --kv-cache-dtype; FP8 as its bytes)."""
        self.keep = (linears, norms, pools, head_norms)  # the tensors the struct points at
        self.struct = _Layer(index=index, kv_type=kv_type(storage, pools, "the fused decode layers"))
        for name, (out, inp) in shape.linear_shapes().items():
            weight, bias = linears[name]
            setattr(self.struct, name, _linear(name, weight, bias, out, inp))
        for t in norms:
            _need(t, (shape.hidden,), "a norm weight")
        k_pool, v_pool = pools
        if tuple(k_pool.shape[1:]) != (shape.kv_heads, shape.head_dim) or v_pool.shape != k_pool.shape:
            raise ValueError(f"the K and V pools must be [slots, {shape.kv_heads}, {shape.head_dim}], got "
                             f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")  # fmt: skip
        self.num_slots = k_pool.shape[0]
        self.struct.input_norm, self.struct.post_norm = norms[0].data_ptr(), norms[1].data_ptr()
        self.struct.k_pool, self.struct.v_pool = k_pool.data_ptr(), v_pool.data_ptr()
        if head_norms is not None:
            for t in head_norms:
                _need(t, (shape.head_dim,), "a head norm weight")
            self.struct.q_norm, self.struct.k_norm = head_norms[0].data_ptr(), head_norms[1].data_ptr()


class StepArgs:
    """A step's shape, positions, slots, decoders and work buffers, shared by every layer."""

    def __init__(
        self,
        shape: LayerShape,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        decoders: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        page_size: int,
        num_slots: int,
    ) -> None:
        rows, d = residual.shape[0], shape.head_dim
        if not 0 < rows <= MAX_ROWS:
            raise ValueError(f"a fused decode step takes 1-{MAX_ROWS} rows, got {rows}")
        _need(residual, (rows, shape.hidden), "the residual stream")
        _need(cos, (rows, d), "cos", numel_only=True)
        _need(sin, (rows, d), "sin", numel_only=True)
        seq_rows, pages, page_start, lengths = decoders
        for t in (slots, *decoders):
            if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("slots and decoder indices must be contiguous 1-D int64 CPU tensors")
        if slots.shape[0] != rows or page_start.shape[0] != seq_rows.shape[0] + 1 or lengths.shape != seq_rows.shape:
            raise ValueError("one slot per row, and page_start / lengths per decoder, are needed")
        if page_size <= 0 or num_slots % page_size:
            raise ValueError(f"the pool's {num_slots} slots are not whole pages of {page_size}")
        q_width, kv_width = shape.heads * d, shape.kv_heads * d
        widths = {"delta": shape.hidden, "h": shape.hidden, "q": q_width, "attn": q_width,
                  "k_rot": kv_width, "gate": shape.intermediate, "up": shape.intermediate}
        work = torch.empty(rows * sum(widths.values()), dtype=torch.float32)
        self.keep = (residual, cos, sin, slots, decoders, work)
        s = self.struct = _Step(
            rows=rows, hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=d,
            intermediate=shape.intermediate, num_slots=num_slots, num_threads=torch.get_num_threads(),
            eps=shape.eps, scale=1.0 / math.sqrt(d), num_seqs=seq_rows.shape[0], table_len=pages.shape[0],
            page_size=page_size, chunk_pages=max(1, CHUNK_TOKENS // page_size),
        )
        for name, t in zip(("cos", "sin", "slots", "seq_rows", "pages", "page_start", "lengths", "residual"),
                           (cos, sin, slots, seq_rows, pages, page_start, lengths, residual)):
            setattr(s, name, t.data_ptr())
        at = 0
        for name, width in widths.items():
            setattr(s, name, work[at:].data_ptr())
            at += rows * width
        self.delta = work[: rows * shape.hidden].view(rows, shape.hidden)

    def set_lora(self, tables: LoRATables, rows: torch.Tensor, starts: torch.Tensor) -> None:
        """The step's LoRA adapters: `tables` (one per group, in order), each group's rows
        rows[starts[g]:starts[g + 1]] (contiguous int64 CPU tensors, checked against the step)."""
        for t in (rows, starts):
            if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("LoRA rows and starts must be contiguous 1-D int64 CPU tensors")
        if starts.shape[0] != tables.groups + 1 or int(starts[-1]) != rows.shape[0]:
            raise ValueError("one start per LoRA group, and one past the last, are needed")
        if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < self.struct.rows:
            raise ValueError("a LoRA row is outside the step")
        self.keep = (*self.keep, tables, rows, starts)
        s = self.struct
        s.lora_groups, s.lora_rows, s.lora_start = tables.groups, rows.data_ptr(), starts.data_ptr()
        s.lora_rank = tables.ranks.data_ptr()
        s.lora_a, s.lora_bt = ctypes.addressof(tables.a), ctypes.addressof(tables.bt)


class LoRATables:
    """For the adapters of a step's `groups`, in order: each layer's linear layers' A, B^T (by address)
    and rank ([layers][LINEARS][groups], A null where an adapter leaves one alone). `weights(layer,
    linear, group)` gives (A [rank, in], B^T [rank, out]) or None; every pair is checked against the
    layer's shape (its rank its own: PEFT's rank_pattern). The tables do not keep the tensors alive:
    whoever uses them must hold the adapters (the step's batch does)."""

    def __init__(self, shape: LayerShape, layers: int, groups: int, weights) -> None:
        self.groups = groups
        size = layers * len(LINEARS) * groups
        self.a, self.bt = (ctypes.c_void_p * size)(), (ctypes.c_void_p * size)()
        self.ranks = torch.zeros(size, dtype=torch.int64)
        shapes = shape.linear_shapes()
        for layer in range(layers):
            for i, name in enumerate(LINEARS):
                out, inp = shapes[name]
                for g in range(groups):
                    pair = weights(layer, name, g)
                    if pair is None:
                        continue
                    a, bt = pair
                    rank = a.shape[0]
                    if not 1 <= rank <= LORA_MAX_RANK:
                        raise ValueError(f"layer {layer}'s {name} LoRA rank must be 1-{LORA_MAX_RANK}, got {rank}")
                    _need(a, (rank, inp), f"layer {layer}'s {name} LoRA A")
                    _need(bt, (rank, out), f"layer {layer}'s {name} LoRA B^T")
                    at = (layer * len(LINEARS) + i) * groups + g
                    self.a[at], self.bt[at], self.ranks[at] = a.data_ptr(), bt.data_ptr(), rank


class DecodeLayerKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._in = lib.decode_layer_in
        self._in.argtypes = (ctypes.POINTER(_Layer), ctypes.POINTER(_Step), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        self._out = lib.decode_layer_out
        self._out.argtypes = (ctypes.POINTER(_Layer), ctypes.POINTER(_Step), ctypes.c_void_p, ctypes.c_void_p)
        self._in.restype = self._out.restype = ctypes.c_int

    @classmethod
    def load(cls) -> DecodeLayerKernel | None:
        """The kernel, or None where it cannot serve (no compiler, no AVX-512 for the linear layers)."""
        lib = load_kernel("decode_layer")
        if lib is None or not lib.few_rows_linear_supported():
            return None
        return cls(lib)

    def layer_in(self, layer: LayerArgs, step: StepArgs, add_delta: bool, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """residual += delta (when add_delta); h = norm(residual); q into the step's buffer, k_pre and v
        (each [rows, kv_heads * head_dim] contiguous, checked by the caller) as they come."""
        _raise_on(self._in(layer.struct, step.struct, int(add_delta), k_pre.data_ptr(), v.data_ptr()))

    def layer_out(self, layer: LayerArgs, step: StepArgs, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Rotation and KV write, attention, o, residual += delta, norm, MLP: delta is the layer's MLP output."""
        _raise_on(self._out(layer.struct, step.struct, k_pre.data_ptr(), v.data_ptr()))


def _raise_on(status: int) -> None:
    if status == 3:
        raise MemoryError("fused decode layer: out of memory for its work buffers")
    if status:
        raise ValueError(f"fused decode layer: {_FAILURES.get(status, f'error {status}')}")


def _linear(name: str, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, out: int, inp: int) -> _Linear:
    if tuple(weight.shape) != (out, inp):
        raise ValueError(f"the {name} weight is {tuple(weight.shape)}, the layer needs {(out, inp)}")
    s = _Linear(bias=None if bias is None else _need(bias, (out,), f"the {name} bias").data_ptr(),
                in_features=inp, out_features=out)
    if isinstance(weight, QuantizedWeight):
        s.kind = kind_code(weight.kind)
        s.quants, s.scales = weight.quants.data_ptr(), weight.scales.data_ptr()
        s.mins = None if weight.mins is None else weight.mins.data_ptr()
    else:
        s.weight = _need(weight, (out, inp), f"the {name} weight").data_ptr()
    return s


def _need(t: torch.Tensor, shape: tuple[int, ...], what: str, numel_only: bool = False) -> torch.Tensor:
    ok_shape = t.numel() == math.prod(shape) if numel_only else tuple(t.shape) == shape
    if not ok_shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous float32 CPU tensor of {shape}, got {tuple(t.shape)} "
                         f"{t.dtype} on {t.device}")
    return t
