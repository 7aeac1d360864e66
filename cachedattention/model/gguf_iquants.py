"""GGUF's grid-coded low-bit types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) re-expressed
exactly as the few-rows kernel's int8 blocks.

Each of these super-blocks of 256 weights holds, for every group of 32 (or 16), a scale (the float16
super-scale times a small integer: exact in float32) and the group's values: points of a fixed grid
with signs, small integers (IQ1's are a grid point plus or minus 1/8: eight times them are). So each
weight is scale * an integer below 64, and scale * integer is exact in float32: gguf's value.

Only the scales are read here; the integers are gguf's own dequantized values divided by them
(exact, since each value is an exact product), so the grids and sign tables are gguf's. A group
of 32 becomes Q8_0 (int8 values, a scale a block of 32), a group of 16 Q8_S16.
"""

from __future__ import annotations

import numpy as np
import torch

from cachedattention.kernels.few_rows_linear import QuantizedWeight

SUPER = 256  # weights in a K-quant's or an IQ type's super-block (gguf_kquants' too)
IQ_BYTES = {"IQ1_S": 50, "IQ1_M": 56, "IQ2_XXS": 66, "IQ2_XS": 74, "IQ2_S": 82, "IQ3_XXS": 98, "IQ3_S": 110}


def iq_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """A GGUF tensor's raw rows (uint8 [out, bytes per row]) of a grid-coded type as int8 blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if kind not in IQ_BYTES or in_features % SUPER:
        raise ValueError(f"rows of {', '.join(IQ_BYTES)} are whole super-blocks of {SUPER}, not {kind} of {in_features}")
    out = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, IQ_BYTES[kind])
    scales = _SCALES[kind](blocks)  # [blocks, groups]: float32, exact
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # (non-finite scales: a broken row)
        values = dequantize(blocks, GGMLQuantizationType[kind]).reshape(scales.shape[0], scales.shape[1], -1)
        q = values / scales[:, :, None]
    q = np.rint(np.where(np.isfinite(q), q, 0)).astype(np.int8)  # (a zero scale's group: values 0)

    def per_row(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(out, -1))

    new_kind = "Q8_0" if values.shape[2] == 32 else "Q8_S16"
    return QuantizedWeight(new_kind, per_row(q), per_row(scales), None, (out, in_features))


def halves(fields: np.ndarray) -> np.ndarray:
    """Float16 fields (two bytes each) as float32 (the super-blocks' scales; gguf_kquants' too)."""
    return fields.view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes of two 4-bit fields each, low nibble first, as float32."""
    return ((packed[:, :, None] >> np.array([0, 4], dtype=np.uint8)) & 0x0F).reshape(packed.shape[0], -1).astype(np.float32)


def _iq2_xxs(blocks: np.ndarray) -> np.ndarray:  # d; then per 32: 4 grid indices, a uint32 of signs and 4-bit scale
    high = blocks[:, 2:66].copy().view("<u4").reshape(-1, 8, 2)[:, :, 1] >> 28
    return halves(blocks[:, 0:2].copy()) * (np.float32(0.5) + high.astype(np.float32)) * np.float32(0.25)


def _iq2_xs(blocks: np.ndarray) -> np.ndarray:  # d, 32 uint16 of index and signs, 16 nibbles of scales (per 16)
    return halves(blocks[:, 0:2].copy()) * (np.float32(0.5) + _nibbles(blocks[:, 66:74])) * np.float32(0.25)


def _iq2_s(blocks: np.ndarray) -> np.ndarray:  # d, indices, signs, high index bits, 16 nibbles of scales (per 16)
    return halves(blocks[:, 0:2].copy()) * (np.float32(0.5) + _nibbles(blocks[:, 74:82])) * np.float32(0.25)


def _iq3_xxs(blocks: np.ndarray) -> np.ndarray:  # d, 64 indices, per 32 a uint32 of signs and a 4-bit scale
    high = blocks[:, 66:98].copy().view("<u4") >> 28
    return halves(blocks[:, 0:2].copy()) * (np.float32(0.5) + high.astype(np.float32)) * np.float32(0.5)


def _iq3_s(blocks: np.ndarray) -> np.ndarray:  # d, indices, high bits, signs, 8 nibbles of scales (per 32)
    return halves(blocks[:, 0:2].copy()) * (1 + 2 * _nibbles(blocks[:, 106:110]))


def _iq1_s(blocks: np.ndarray) -> np.ndarray:  # d, 32 indices, per 32 a uint16 (3-bit scale at bit 12)
    qh = blocks[:, 34:50].copy().view("<u2")
    dl = halves(blocks[:, 0:2].copy()) * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    return dl / np.float32(8)  # (values: grid point +- 1/8)


def _iq1_m(blocks: np.ndarray) -> np.ndarray:  # indices, high bits, 4 uint16: 3-bit scales (per 16), d's nibbles on top
    fields = blocks[:, 48:56].copy().view("<u2")
    d = (fields & 0xF000) >> np.array([12, 8, 4, 0], dtype=np.uint16)
    d = halves((d[:, 0] | d[:, 1] | d[:, 2] | d[:, 3]).reshape(-1, 1).copy().view(np.uint8))
    sc = ((fields[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(-1, 16)
    return d * (2 * sc + 1).astype(np.float32) / np.float32(8)


_SCALES = {"IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "IQ2_XXS": _iq2_xxs, "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s,
           "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s}  # fmt: skip
_SCALES_AT = {"IQ1_S": 0, "IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0}  # each block's float16 d


def random_iq_rows(kind: str, out_features: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """Raw rows of random super-blocks of a grid-coded type (tests and benchmarks: gguf's Python
    package does not quantize to them): random bytes, except the float16 d between 1e-4 and 1e-2."""
    blocks = rng.integers(0, 256, (out_features * in_features // SUPER, IQ_BYTES[kind]), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-2, (blocks.shape[0], 1)).astype(np.float16).view(np.uint16)
    if kind == "IQ1_M":  # d's four nibbles on top of the four scale fields
        fields = blocks[:, 48:56].copy().view("<u2") & 0x0FFF
        fields |= ((d >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF) << 12
        blocks[:, 48:56] = fields.view(np.uint8)
    else:
        blocks[:, _SCALES_AT[kind] : _SCALES_AT[kind] + 2] = d.view(np.uint8)
    return blocks.reshape(out_features, -1)
