"""GGUF's block types that the few-rows kernel does not read as they are, re-expressed exactly as
its blocks: the K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256 weights each, in sub-blocks
of 16 or 32 with 4-, 6- or 8-bit scales under a float16 one) and the older blocks of 32 (Q4_0, Q5_0,
Q5_1).

Each sub-block's scale (and min) is the float16 super-scale times its small integer, exact in
float32, so the kernel's scale * q (+ min) gives GGUF's values bit for bit:
Q4_K -> Q4_1 (nibbles repacked), Q5_K -> Q8_M (5-bit values, a scale and a min a block of 32),
Q6_K and Q3_K -> Q8_S16 (signed values, a scale for each 16), Q2_K -> Q4_MS16 (its 2-bit values as
nibbles, a scale and a min for each 16). The bit layouts below follow gguf's
own dequantization (gguf.quants), which the tests hold these to.

Q4_0 (d * (q - 8)) is Q4_1 with the min -8d; Q5_0 (d * (q - 16)) is Q8_0's signed values; Q5_1
(d * q + m) is Q8_M. Each product is exact in float32, so these are bit for bit too, but for Q4_0's
zeros: d * 8 - 8d is +0.0 where gguf's d * 0 is -0.0 for a negative d (equal as numbers; a sum of
products differs only if it is zero).

IQ4_NL (blocks of 32: d * a non-linear table's value, signed 8-bit, picked by a nibble) and IQ4_XS
(super-blocks of 256: eight blocks of 32 with 6-bit scales, d * (scale - 32) * the same table) are
Q8_0: the table's values as int8, d (or d * (scale - 32), exact in float32) the scale of each 32.
gguf (and llama.cpp) round the scale times the value once in float32, as the kernel does.

The ternary TQ1_0 (base-3 digits, five a byte) and TQ2_0 (2-bit fields) super-blocks of 256 are
d * q with q in -1..1 (-1..2 for TQ2_0's fields): Q8_0, q as int8 and d the scale of each 32.

The grid-coded IQ1-IQ3 types are in model/gguf_iquants.py.
"""

from __future__ import annotations

import numpy as np
import torch

from cachedattention.kernels.few_rows_linear import HALF_KINDS, QuantizedWeight
from cachedattention.model.gguf_iquants import IQ_BYTES, SUPER, halves, iq_weight, random_iq_rows

K_QUANT_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # bytes of one super-block
LEGACY_BYTES = {"Q4_0": 18, "Q5_0": 22, "Q5_1": 24}  # bytes of one block of 32
IQ4_BLOCKS = {"IQ4_NL": (32, 18), "IQ4_XS": (SUPER, 136)}  # (weights, bytes) of one block
TERNARY_BYTES = {"TQ1_0": 54, "TQ2_0": 66}  # bytes of one super-block, its float16 d last
# the sixteen values a nibble of IQ4_NL or IQ4_XS picks (llama.cpp's kvalues_iq4nl)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def reexpressible(kind: str, in_features: int) -> bool:
    """Whether rows of `in_features` weights of this GGUF type can be re-expressed as kernel blocks."""
    if kind in IQ4_BLOCKS:
        return in_features % IQ4_BLOCKS[kind][0] == 0
    if kind in K_QUANT_BYTES or kind in IQ_BYTES or kind in TERNARY_BYTES:
        return in_features % SUPER == 0
    if kind in HALF_KINDS:  # (held as they are, rows of whole blocks of 32)
        return in_features % 32 == 0
    return kind in LEGACY_BYTES and in_features % 32 == 0


def reexpressed_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """A GGUF tensor's raw rows of a K-quant, older, IQ or ternary block type as kernel blocks."""
    if kind in IQ4_BLOCKS:
        return iq4_weight(kind, rows, in_features)
    if kind in TERNARY_BYTES:
        return ternary_weight(kind, rows, in_features)
    if kind in HALF_KINDS:  # 16-bit floats: their bits as they are
        if in_features % 32:
            raise ValueError(f"rows of {kind} for the kernel are whole blocks of 32, not {in_features}")
        bits = torch.from_numpy(np.ascontiguousarray(rows).view(np.int16).reshape(rows.shape[0], in_features).copy())
        return QuantizedWeight.from_16_bit(bits.view(HALF_KINDS[kind]))
    if kind in IQ_BYTES:
        return iq_weight(kind, rows, in_features)
    return legacy_weight(kind, rows, in_features) if kind in LEGACY_BYTES else kquant_weight(kind, rows, in_features)


def iq4_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """Raw rows (uint8 [out, bytes per row]) of IQ4_NL or IQ4_XS as Q8_0 blocks."""
    if kind not in IQ4_BLOCKS or in_features % IQ4_BLOCKS[kind][0]:
        raise ValueError(f"rows of IQ4_NL (IQ4_XS) are whole blocks of 32 (256), not {kind} of {in_features}")
    out = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, IQ4_BLOCKS[kind][1])
    d = halves(blocks[:, 0:2].copy())
    if kind == "IQ4_NL":
        scales, qs = d, blocks[:, 2:18]
    else:  # each block of 32's scale: 4 low bits (two a byte, low nibble first) and 2 high ones (a uint16's pairs)
        low = (blocks[:, 4:8, None] >> np.array([0, 4], dtype=np.uint8)).reshape(-1, 8) & 0x0F
        high = (blocks[:, 2:4].copy().view("<u2") >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
        scales, qs = d * ((low | (high << 4)).astype(np.float32) - 32), blocks[:, 8:136]
    # each 16 bytes hold a block of 32: element j in byte j's low nibble, j + 16 in its high one
    nibbles = qs.reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
    values = IQ4_VALUES[(nibbles & 0x0F).reshape(out, -1)]
    return QuantizedWeight("Q8_0", torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(scales).reshape(out, -1)),
                           None, (out, in_features))  # fmt: skip


def ternary_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """Raw rows (uint8 [out, bytes per row]) of TQ1_0 or TQ2_0 as Q8_0 blocks."""
    if kind not in TERNARY_BYTES or in_features % SUPER:
        raise ValueError(f"rows of TQ1_0 and TQ2_0 are whole super-blocks of 256, not {kind} of {in_features}")
    out = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, TERNARY_BYTES[kind])
    d = halves(blocks[:, -2:].copy()).reshape(-1)
    if kind == "TQ2_0":  # each 32 bytes hold 128 weights: element j of the four runs in bits 2r of byte j
        fields = (blocks[:, :64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        values = fields.reshape(-1, SUPER).astype(np.int8) - 1
    else:  # a byte holds five digits: multiplied by 3^k (wrapping), its top bits times 3 give the k-th
        powers = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
        runs = ((0, 32, 5), (32, 48, 5), (48, 52, 4))  # (bytes, digits in each): each digit's run of bytes in turn
        scaled = np.concatenate([(blocks[:, None, a:b] * powers[:n, None]).reshape(blocks.shape[0], -1)
                                 for a, b, n in runs], axis=1)  # fmt: skip
        values = ((scaled.astype(np.uint16) * 3) >> 8).astype(np.int8) - 1
    scales = np.repeat(d, SUPER // 32).reshape(out, -1)
    return QuantizedWeight("Q8_0", torch.from_numpy(np.ascontiguousarray(values.reshape(out, -1))),
                           torch.from_numpy(scales), None, (out, in_features))  # fmt: skip


def legacy_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """Raw rows (uint8 [out, bytes per row]) of Q4_0, Q5_0 or Q5_1 as kernel blocks."""
    if kind not in LEGACY_BYTES or in_features % 32:
        raise ValueError(f"rows of Q4_0, Q5_0 or Q5_1 are whole blocks of 32, not {kind} of {in_features}")
    out = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, LEGACY_BYTES[kind])
    d = halves(blocks[:, 0:2].copy())

    def per_row(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(out, -1))

    if kind == "Q4_0":  # the nibbles sit as Q4_1's do: element j low, j + 16 high
        return QuantizedWeight("Q4_1", per_row(blocks[:, 2:18]), per_row(d), per_row(-8 * d), (out, in_features))
    low = 2 if kind == "Q5_0" else 4  # Q5_1 has its float16 min after the scale
    fifth = blocks[:, low : low + 4].copy().view("<u4") >> np.arange(32, dtype=np.uint32)  # bit j: element j's
    qs = blocks[:, low + 4 : low + 20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | ((fifth & 1) << 4).astype(np.uint8)
    if kind == "Q5_0":
        return QuantizedWeight("Q8_0", per_row(q.astype(np.int8) - np.int8(16)), per_row(d), None, (out, in_features))
    m = halves(blocks[:, 2:4].copy())
    return QuantizedWeight("Q8_M", per_row(q.astype(np.int8)), per_row(d), per_row(m), (out, in_features))


def kquant_weight(kind: str, rows: np.ndarray, in_features: int) -> QuantizedWeight:
    """A GGUF tensor's raw rows (uint8 [out, bytes per row]) of a K-quant type as kernel blocks."""
    if kind not in K_QUANT_BYTES or in_features % SUPER:
        raise ValueError(f"K-quant rows are whole super-blocks of {SUPER} of Q2_K-Q6_K, not {kind} of {in_features}")
    out = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, K_QUANT_BYTES[kind])
    q, scales, mins = _UNPACK[kind](blocks)  # per super-block: values [n, 256], scales and mins per sub-block

    def per_row(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(out, -1))

    if kind in ("Q4_K", "Q2_K"):  # byte j of each block of 32: element j in its low nibble, j + 16 in its high one
        q = q.astype(np.uint8).reshape(-1, 2, 16)
        packed = (q[:, 0] | (q[:, 1] << 4)).astype(np.uint8)
        new_kind = "Q4_1" if kind == "Q4_K" else "Q4_MS16"
        return QuantizedWeight(new_kind, per_row(packed), per_row(scales), per_row(mins), (out, in_features))
    # (Q6_K's values take 6 bits; Q3_K's signed ones as nibbles and a min would lose gguf's -0.0 and its inf * 0)
    new_kind = "Q8_M" if kind == "Q5_K" else "Q8_S16"
    return QuantizedWeight(new_kind, per_row(q.astype(np.int8)), per_row(scales),
                           per_row(mins) if mins is not None else None, (out, in_features))  # fmt: skip


def _scale_min_6bit(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's twelve bytes of eight 6-bit scales and eight 6-bit mins."""
    d, m, m_d = np.split(packed.reshape(-1, 3, 4), 3, axis=1)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(-1, 8).astype(np.float32), mn.reshape(-1, 8).astype(np.float32)


def _scaled(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's sub-block scales and mins: d * scale and -(dmin * min), exact in float32."""
    d, dmin = halves(blocks[:, 0:2].copy()), halves(blocks[:, 2:4].copy())
    sc, mn = _scale_min_6bit(blocks[:, 4:16])
    return d * sc, -(dmin * mn)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Groups of 32 bytes holding two sub-blocks of 32: the first in the low nibbles, the second in the high."""
    q = qs.reshape(qs.shape[0], -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], -1)


def _q4_k(blocks: np.ndarray):
    scales, mins = _scaled(blocks)
    return _nibbles(blocks[:, 16:144]), scales, mins


def _q5_k(blocks: np.ndarray):
    scales, mins = _scaled(blocks)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return _nibbles(blocks[:, 48:176]) | ((qh & 1).reshape(blocks.shape[0], -1) << 4), scales, mins


def _q6_k(blocks: np.ndarray):
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 0x0F).reshape(n, -1) | ((qh & 3).reshape(n, -1) << 4)).astype(np.int8) - np.int8(32)
    d = halves(blocks[:, 208:210].copy())
    return q, d * blocks[:, 192:208].view(np.int8).astype(np.float32), None


def _q2_k(blocks: np.ndarray):
    """Sixteen bytes of 4-bit scales (low nibble) and mins (high), 64 of 2-bit values (four 32-value
    runs a 32 bytes, from the low bits up), then the float16 d and dmin: d * scale * q - dmin * min."""
    n = blocks.shape[0]
    packed, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = halves(blocks[:, 80:82].copy()), halves(blocks[:, 82:84].copy())
    q = (qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    return q.reshape(n, -1), d * (packed & 0x0F).astype(np.float32), -(dmin * (packed >> 4).astype(np.float32))


def _q3_k(blocks: np.ndarray):
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    low = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 3) << 4)).astype(np.int8) - np.int8(32)
    d = halves(blocks[:, 108:110].copy())
    ql = (qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)).reshape(n, -1) & 3
    qh = ((hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(n, -1) & 1) ^ 1
    return ql.astype(np.int8) - (qh << 2).astype(np.int8), d * sc.astype(np.float32), None


_UNPACK = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_SCALES_AT = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              "IQ4_NL": (0,), "IQ4_XS": (0,)}  # each (super-)block's float16 fields


def random_rows(kind: str, out_features: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """Raw rows of random super-blocks of a K-quant or IQ type (benchmarks and tests: gguf's Python
    package does not quantize to those): random bytes, except float16 scales between 1e-4 and 1e-2."""
    if kind in IQ_BYTES:
        return random_iq_rows(kind, out_features, in_features, rng)
    weights, nbytes = IQ4_BLOCKS.get(kind) or (SUPER, K_QUANT_BYTES[kind])
    blocks = rng.integers(0, 256, (out_features * in_features // weights, nbytes), dtype=np.uint8)
    for at in _SCALES_AT[kind]:
        blocks[:, at : at + 2] = rng.uniform(1e-4, 1e-2, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(out_features, -1)
