"""FP8 checkpoints, read as their weights times their scales.

Three ways of writing them are read: transformers' `fp8` (Qwen3's and DeepSeek's FP8 releases: a
`weight_scale_inv` for each block of `weight_block_size`, or AutoFP8's one `weight_scale` a tensor),
Meta's `fbgemm_fp8` (a scale a row) and compressed-tensors' float-quantized weights (llm-compressor's
FP8 and FP8-dynamic releases: a scale a tensor, a row or a block). On a CPU with the few-rows kernel
an e4m3 weight whose scales hold for whole runs of 32 inputs is kept as the kernel's F8 blocks (its
bytes and a float32 scale for each 32: 9 bits a weight, against 32 as float32); otherwise it is
widened to float32 and multiplied by its scale at load, as vLLM's weight-only FP8 path does on GPUs
without FP8 arithmetic. Either way the weights are the checkpoint's; the activations and the KV cache
stay in the model's dtype (the scales for quantizing those, where the checkpoint has them, are not
used). The config is read in model/quant_config.py."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cachedattention.kernels.few_rows_linear import QuantizedWeight
from cachedattention.model.quant_config import Fp8Scheme

SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
LARGEST_SCALE = torch.finfo(torch.float32).max / 256  # the kernel's F8 blocks read scale * 256


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight as the checkpoint holds it: its values [..., rows, cols], its scale (one, one a
    row, or one for each block of `block`) and its name, for the messages."""

    values: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None
    name: str

    def dequantize(self) -> torch.Tensor:
        """float32 values times their scales."""
        return self.values.to(torch.float32).mul_(_scales(self.values.shape, self.scale, self.block, self.name))

    def blocks(self) -> QuantizedWeight | None:
        """The few-rows kernel's F8 blocks (the e4m3 bytes, a float32 scale for each 32 inputs), the
        same values as `dequantize()` bit for bit; None for a weight of other than two dimensions or
        of e4m3, rows not of whole blocks of 32, scales that change within 32 inputs or past
        LARGEST_SCALE, or a NaN."""
        out, k = self.values.shape[-2:]
        if self.values.dim() != 2 or self.values.dtype != torch.float8_e4m3fn or k % 32:
            return None
        if self.block is not None and self.scale.numel() > 1 and self.block[1] % 32:
            return None
        if not bool(torch.isfinite(self.values.to(torch.float32)).all()):  # (the kernel reads e4m3's NaN as 480)
            return None
        grid = _scales(self.values.shape, self.scale, self.block, self.name)
        if not bool((grid.abs() <= LARGEST_SCALE).all()):  # (the kernel multiplies by scale * 256)
            return None
        per_block = grid.expand(out, k)[:, ::32].contiguous()
        # a copy: the loaded tensor maps the checkpoint's file, whose pages would be read in by the first
        # request, change with the file, and fault if it were cut short
        quants = self.values.contiguous().view(torch.uint8).clone()
        return QuantizedWeight("F8", quants, per_block, None, (out, k))


def fp8_weights(state: dict[str, torch.Tensor], scheme: Fp8Scheme) -> Iterator[tuple[str, Fp8Weight]]:
    """Each FP8 weight of the checkpoint with its scale, both taken out of `state` as it goes. An FP8
    weight without its scale, or a scale of a shape that does not fit its weight, is a ValueError
    naming it; a scale without an FP8 weight is left for the loader to refuse as a weight with no
    place."""
    for name in [n for n, t in state.items() if _is_fp8(t)]:
        owner = name.removesuffix(".weight")
        scale_name = next((owner + s for s in SCALE_SUFFIXES if owner + s in state), None)
        if scale_name is None or not name.endswith(".weight"):
            raise ValueError(f"weight {name} is {str(state[name].dtype).replace('torch.', '')} but the checkpoint has "
                             f"no {owner}.weight_scale_inv or .weight_scale for it")  # fmt: skip
        weight = Fp8Weight(state.pop(name), state.pop(scale_name), scheme.block, name)
        if weight.values.dim() < 2:
            raise ValueError(f"{name} is an FP8 tensor of {weight.values.dim()} dimensions: only weight matrices are read")
        _scales(weight.values.shape, weight.scale, weight.block, name)  # (its shape checked now, not at first use)
        yield name, weight


def refuse_fp8(state: dict[str, torch.Tensor]) -> None:
    """FP8 weights in a checkpoint whose config has no quantization_config: nothing says how they
    are scaled (read as they are, every answer would be garbage)."""
    name = next((n for n, t in state.items() if _is_fp8(t)), None)
    if name is not None:
        raise ValueError(f"weight {name} is {str(state[name].dtype).replace('torch.', '')}, but config.json has no "
                         "quantization_config saying how the checkpoint's FP8 weights are scaled")  # fmt: skip


def _is_fp8(t: torch.Tensor) -> bool:
    return "float8" in str(t.dtype) and "e8m0" not in str(t.dtype)


def _scales(shape: torch.Size, scale: torch.Tensor, block: tuple[int, int] | None, name: str) -> torch.Tensor:
    """Each weight's scale as float32, broadcastable to `shape` [..., rows, cols]: one for all ([]),
    one a row ([..., rows, 1]; stored as that or [..., rows]), or one for each block of `block`
    ([..., rows, cols]; stored as [..., ceil(rows / r), ceil(cols / c)])."""
    s = scale.to(torch.float32)
    rows, cols = shape[-2:]
    lead = tuple(shape[:-2])
    if s.numel() == 1:
        return s.reshape(())
    if block is not None:
        r, c = block
        want = (*lead, math.ceil(rows / r), math.ceil(cols / c))
        if tuple(s.shape) != want:
            raise ValueError(f"{name}'s scale is {list(s.shape)}, but blocks of {r}x{c} over {list(shape)} "
                             f"make it {list(want)}")  # fmt: skip
        return s.repeat_interleave(r, dim=-2)[..., :rows, :].repeat_interleave(c, dim=-1)[..., :cols]
    if tuple(s.shape) in ((*lead, rows, 1), (*lead, rows)):
        return s.reshape(*lead, rows, 1)
    raise ValueError(f"{name}'s scale is {list(s.shape)}: neither one for the weight {list(shape)} nor one "
                     "a row, and the config names no blocks")  # fmt: skip
