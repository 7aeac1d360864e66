"""4-bit integer checkpoints: AutoAWQ's GEMM layout, GPTQ's (gptq and gptq_v2 formats) and
compressed-tensors' pack-quantized (W4A16), each weight's values unpacked with their zero points and
scales (a pair for each group of inputs of a row): value = (q - zero) * scale.

On a CPU with the few-rows kernel a weight whose groups hold whole blocks of 32 inputs is kept as
the kernel's Q4_1 blocks (4 bits a weight, a float32 scale and min a block: 6 bits, against 32 as
float32): scale * q + min with min = -zero * scale is (q - zero) * scale exactly, as zero and q are
at most 16 and a 16-bit float's scale has at most 11 significant bits. Otherwise (act-order's
shuffled groups, a scale of float32's precision, a GPU) the weight is widened to float32."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cachedattention.kernels.few_rows_linear import QuantizedWeight
from cachedattention.model.quant_config import Int4Scheme

NIBBLES = 8  # 4-bit values in an int32, the first in its lowest bits
AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 of eight
SYMMETRIC_ZERO = 8
# each method's tensors beside a weight's values: (values, scales, zero points, group of each input)
NAMES = {"awq": ("qweight", "scales", "qzeros", None), "gptq": ("qweight", "scales", "qzeros", "g_idx"),
         "compressed-tensors": ("weight_packed", "weight_scale", None, "weight_g_idx")}  # fmt: skip


@dataclass(frozen=True)
class Int4Weight:
    """A weight's 4-bit values q [out, in] (0-15), the zero points and scales [out, groups] (float32)
    and the group of each input [in]."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    groups: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in]: (q - zero) * scale, each input with its group's pair."""
        return (self.q.float() - self.zeros[:, self.groups]).mul_(self.scales[:, self.groups])

    def blocks(self) -> QuantizedWeight | None:
        """The weight as the few-rows kernel's Q4_1 blocks, equal to `dequantize()` bit for bit; None
        where a block of 32 inputs spans two groups or a scale is not a 16-bit float's."""
        out, k = self.q.shape
        if k % 32 or not torch.equal(self.groups.view(-1, 32), self.groups[::32, None].expand(-1, 32)):
            return None
        if not (_is_16_bit(self.scales, torch.float16) or _is_16_bit(self.scales, torch.bfloat16)):
            return None
        # element j of a block in the low nibble of byte j, element j + 16 in its high nibble
        halves = self.q.view(out, k // 32, 2, 16)
        quants = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out, k // 2).contiguous()
        first = self.groups[::32]
        mins = (-self.zeros * self.scales)[:, first].contiguous()
        return QuantizedWeight("Q4_1", quants, self.scales[:, first].contiguous(), mins, (out, k))


def _is_16_bit(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.isfinite(t).all()) and torch.equal(t.to(dtype).float(), t)


def unpack_int4(state: dict[str, torch.Tensor], scheme: Int4Scheme) -> Iterator[tuple[str, Int4Weight]]:
    """Each packed weight of the checkpoint unpacked, under its `.weight` name, its parts taken out of
    `state` as it goes (so that a large checkpoint's packed and unpacked forms are not all held at
    once). A packed weight missing a part, or of parts whose shapes disagree, is a ValueError naming it."""
    values, scales, zeros, groups = NAMES[scheme.method]
    for name in [n for n in state if n.endswith("." + values)]:
        owner = name.removesuffix("." + values)
        parts = {part: state.pop(f"{owner}.{part}", None) for part in (values, scales, zeros, groups) if part}
        if scheme.method == "compressed-tensors":
            parts["shape"] = state.pop(f"{owner}.weight_shape", None)
        missing = [part for part, t in parts.items() if t is None and part != groups]
        if missing:
            raise ValueError(f"{scheme.method} weight {owner} has no {', '.join(missing)}")
        yield f"{owner}.weight", _unpacked(owner, scheme, parts)


def _unpacked(owner: str, scheme: Int4Scheme, parts: dict[str, torch.Tensor]) -> Int4Weight:
    """One weight's values, zero points, scales and groups, from its method's layout."""
    values, scales, zeros, groups = NAMES[scheme.method]
    packed, s = parts[values], parts[scales].float()
    if packed.dtype != torch.int32 or packed.dim() != 2 or s.dim() != 2:
        raise ValueError(f"{owner}.{values} must be a 2-D int32 tensor and its {scales} 2-D, got "
                         f"{packed.dtype} {list(packed.shape)} and {list(s.shape)}")  # fmt: skip
    for part in (zeros, groups):
        t = parts.get(part) if part else None
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise ValueError(f"{owner}.{part} must hold integers, got {t.dtype}")
    if scheme.method == "awq":  # [in, out / 8], columns packed out of order; scales [groups, out]
        q = _columns(_nibbles(packed), AWQ_NIBBLE_OF_COLUMN).t()
        z = _columns(_nibbles(parts[zeros]), AWQ_NIBBLE_OF_COLUMN).t()
        s = s.t()
    elif scheme.method == "gptq":  # [in / 8, out], inputs packed down the column; zeros [groups, out / 8]
        q = _nibbles(packed.t().contiguous())
        z = _nibbles(parts[zeros]).t() + scheme.zero_offset
        s = s.t()
    else:  # compressed-tensors: [out, in / 8] (the true shape beside it), scales [out, groups], zero 8
        shape = [int(n) for n in parts["shape"].flatten().tolist()]
        q = _nibbles(packed)
        if len(shape) != 2 or shape[0] != q.shape[0] or not 0 <= q.shape[1] - shape[1] < NIBBLES:
            raise ValueError(f"{owner}.weight_shape {shape} does not fit its packed values {list(packed.shape)}")
        q = q[:, : shape[1]]
        z = torch.full_like(s, SYMMETRIC_ZERO)
    out, k = q.shape
    group = _groups(owner, k, s.shape[1], scheme.group_size, parts.get(groups) if groups else None)
    if s.shape[0] != out or tuple(z.shape) != tuple(s.shape):
        raise ValueError(f"{owner}: values {[out, k]}, scales {list(s.shape)} and zero points {list(z.shape)} "
                         "(as [out, groups]) do not fit one another")  # fmt: skip
    return Int4Weight(q.to(torch.uint8).contiguous(), z.float().contiguous(), s.contiguous(), group)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n] -> int32 [rows, n * 8], the eight 4-bit values of each word, lowest bits first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 15).reshape(packed.shape[0], -1)


def _columns(unpacked: torch.Tensor, nibble_of_column: tuple[int, ...]) -> torch.Tensor:
    """Columns put in order where each word packed its eight out of order."""
    rows, n = unpacked.shape
    return unpacked.view(rows, n // NIBBLES, NIBBLES)[:, :, list(nibble_of_column)].reshape(rows, n)


def _groups(owner: str, k: int, count: int, group_size: int | None, g_idx: torch.Tensor | None) -> torch.Tensor:
    """The group of each of the k inputs: the checkpoint's g_idx (act-order), else consecutive runs
    of group_size (one group without one)."""
    if g_idx is not None:
        group = g_idx.flatten().long()
        if group.numel() != k or (k and (int(group.min()) < 0 or int(group.max()) >= count)):
            raise ValueError(f"{owner}'s g_idx must give each of its {k} inputs a group below {count}")
        return group
    size = group_size or k
    if -(-k // size) != count:
        raise ValueError(f"{owner} has {count} groups of scales, but {k} inputs in groups of {size} make "
                         f"{-(-k // size)}")  # fmt: skip
    return torch.arange(k) // size
