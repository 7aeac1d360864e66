"""FP8 checkpoints, read as their weights times their scales.

Three ways of writing them are read: transformers' `fp8` (Qwen3's and DeepSeek's FP8 releases: a
`weight_scale_inv` for each block of `weight_block_size`, or AutoFP8's one `weight_scale` a tensor),
Meta's `fbgemm_fp8` (a scale a row) and compressed-tensors' float-quantized weights (llm-compressor's
FP8 and FP8-dynamic releases: a scale a tensor, a row or a block). Each FP8 weight is widened to
float32 and multiplied by its scale at load, as vLLM's weight-only FP8 path does on GPUs without FP8
arithmetic: the weights are the checkpoint's, the activations and the KV cache stay in the model's
dtype (the scales for quantizing those, where the checkpoint has them, are not used). The config is
read in model/quant_config.py."""

from __future__ import annotations

import logging
import math
from typing import Any

from cachedattention.model.quant_config import Fp8Scheme

log = logging.getLogger(__name__)

SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
# the scales for quantizing activations and the KV cache: not used (both stay in the model's dtype)
UNUSED_SUFFIXES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale", ".kv_scale")


def dequantize_fp8(state: dict[str, Any], scheme: Fp8Scheme) -> dict[str, Any]:
    """The checkpoint's weights with each FP8 one as float32, times its scale; the scales and the
    unused activation and KV-cache scales taken out. An FP8 weight without its scale, or a scale of a
    shape that does not fit its weight, is a ValueError naming it; a scale without an FP8 weight is
    left for the loader to refuse as a weight with no place."""
    out = dict(state)
    unused = [name for name in out if name.endswith(UNUSED_SUFFIXES)]
    for name in unused:
        del out[name]
    if unused:
        log.info("the checkpoint's %d activation and KV-cache scales are not used: activations and the KV cache "
                 "stay in the model's dtype", len(unused))  # fmt: skip
    for name in [n for n, t in out.items() if _is_fp8(t)]:
        owner = name.removesuffix(".weight")
        scale_name = next((owner + s for s in SCALE_SUFFIXES if owner + s in out), None)
        if scale_name is None or not name.endswith(".weight"):
            raise ValueError(f"weight {name} is {str(out[name].dtype).replace('torch.', '')} but the checkpoint has "
                             f"no {owner}.weight_scale_inv or .weight_scale for it")  # fmt: skip
        out[name] = scaled(out[name], out.pop(scale_name), scheme.block, name)
    return out


def refuse_fp8(state: dict[str, Any]) -> None:
    """FP8 weights in a checkpoint whose config has no quantization_config: nothing says how they
    are scaled (read as they are, every answer would be garbage)."""
    name = next((n for n, t in state.items() if _is_fp8(t)), None)
    if name is not None:
        raise ValueError(f"weight {name} is {str(state[name].dtype).replace('torch.', '')}, but config.json has no "
                         "quantization_config saying how the checkpoint's FP8 weights are scaled")  # fmt: skip


def _is_fp8(t: Any) -> bool:
    return "float8" in str(t.dtype) and "e8m0" not in str(t.dtype)


def scaled(weight: Any, scale: Any, block: tuple[int, int] | None, name: str) -> Any:
    """`weight` [..., rows, cols] as float32 times its scale: one for all, one a row ([..., rows, 1] or
    [..., rows]), or one for each block of `block` ([..., ceil(rows / r), ceil(cols / c)])."""
    import torch

    if weight.dim() < 2:
        raise ValueError(f"{name} is an FP8 tensor of {weight.dim()} dimensions: only weight matrices are read")
    values, s = weight.to(torch.float32), scale.to(torch.float32)
    rows, cols = values.shape[-2:]
    lead = tuple(values.shape[:-2])
    if s.numel() == 1:
        return values.mul_(s.reshape(()))
    if block is not None:
        r, c = block
        want = (*lead, math.ceil(rows / r), math.ceil(cols / c))
        if tuple(s.shape) != want:
            raise ValueError(f"{name}'s scale is {list(s.shape)}, but blocks of {r}x{c} over {list(values.shape)} "
                             f"make it {list(want)}")  # fmt: skip
        s = s.repeat_interleave(r, dim=-2)[..., :rows, :].repeat_interleave(c, dim=-1)[..., :cols]
        return values.mul_(s)
    if tuple(s.shape) in ((*lead, rows, 1), (*lead, rows)):
        return values.mul_(s.reshape(*lead, rows, 1))
    raise ValueError(f"{name}'s scale is {list(s.shape)}: neither one for the weight {list(values.shape)} nor one "
                     "a row, and the config names no blocks")  # fmt: skip
