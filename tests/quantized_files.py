"""Quantized checkpoints written as their tools write them, for tests and benchmarks: FP8 (transformers'
fp8 with blocks or a scale a tensor, fbgemm_fp8, compressed-tensors) and 4-bit (AutoAWQ, GPTQ and
compressed-tensors; their layouts checked once against autoawq's, gptqmodel's and compressed-tensors'
own code)."""

import math

import numpy as np
import torch

GROUP = 32  # inputs a scale and zero point cover (every scheme below)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the column each nibble of an AutoAWQ word holds, of its eight


def int4_quantized(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype, g_idx=None):
    """`w` [out, in] as 4-bit values in groups of inputs (or the groups g_idx gives): q (0-15), zero
    points and scales [out, groups], and the values they stand for, group by group."""
    out, k = w.shape
    group = torch.arange(k) // group_size if g_idx is None else g_idx
    count = int(group.max()) + 1
    q = torch.zeros(out, k, dtype=torch.int64)
    zeros = torch.zeros(out, count, dtype=torch.int64)
    scales = torch.zeros(out, count, dtype=scale_dtype)
    values = torch.zeros(out, k)
    for g in range(count):
        cols = (group == g).nonzero().flatten()
        part = w[:, cols]
        if symmetric:
            s = (part.abs().amax(dim=1) / 7).clamp(min=1e-6).to(scale_dtype)
            z = torch.full((out,), 8)
        else:
            low, high = part.amin(dim=1).clamp(max=0), part.amax(dim=1).clamp(min=0)
            s = ((high - low) / 15).clamp(min=1e-6).to(scale_dtype)
            z = torch.round(-low / s.float()).clamp(0, 15).long()
        qg = (torch.round(part / s.float()[:, None]) + z[:, None]).clamp(0, 15).long()
        q[:, cols], zeros[:, g], scales[:, g] = qg, z, s
        values[:, cols] = (qg - z[:, None]).float() * s.float()[:, None]
    return q, zeros, scales, values


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., n, 8] values of 4 bits -> [..., n] int32 words, the first nibble in the lowest bits."""
    word = sum(nibbles[..., j].to(torch.int64) << (4 * j) for j in range(8))
    return torch.from_numpy(word.numpy().astype(np.uint32).view(np.int32))


def awq_tensors(q, zeros, scales):
    """AutoAWQ's GEMM layout: qweight [in, out / 8] and qzeros [groups, out / 8], each word's eight
    columns in AWQ_ORDER; scales [groups, out]."""
    def pack(t):  # [rows, cols]: columns packed by eights
        rows, cols = t.shape
        return _words(t.view(rows, cols // 8, 8)[:, :, AWQ_ORDER])
    return {"qweight": pack(q.t().contiguous()), "qzeros": pack(zeros.t().contiguous()), "scales": scales.t().contiguous()}


def gptq_tensors(q, zeros, scales, g_idx, v1: bool):
    """GPTQ's layout: qweight [in / 8, out] (inputs packed down each column), qzeros [groups, out / 8]
    (minus one in the first format), scales [groups, out], g_idx [in]."""
    k = q.shape[1]
    qweight = _words(q.t().contiguous().view(k // 8, 8, -1).permute(0, 2, 1))
    z = (zeros - 1 if v1 else zeros).t().contiguous()
    return {"qweight": qweight, "qzeros": _words(z.view(z.shape[0], -1, 8)), "scales": scales.t().contiguous(),
            "g_idx": g_idx.to(torch.int32)}  # fmt: skip


def compressed_tensors(q, zeros, scales):
    """compressed-tensors' pack-quantized: weight_packed [out, in / 8] (inputs packed along each row),
    weight_scale [out, groups], weight_shape; symmetric, so every zero point is 8."""
    assert bool((zeros == 8).all())
    return {"weight_packed": _words(q.view(q.shape[0], -1, 8)), "weight_scale": scales,
            "weight_shape": torch.tensor(list(q.shape))}  # fmt: skip


INT4_SCHEMES = {  # each scheme's quantization_config
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
    "gptq-v2-act-order": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                          "checkpoint_format": "gptq_v2"},
    "compressed": {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                   "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                       "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True,
                       "actorder": None}}}},
}  # fmt: skip


def int4_packed_weights(weights: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's decoder-layer projections as `scheme` packs them (the other weights as they
    are), and the float32 values each packed weight stands for."""
    weights, values = dict(weights), {}
    rng = torch.Generator().manual_seed(5)
    for name, w in list(weights.items()):
        if not name.startswith("model.layers.") or not name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            continue
        owner, k = name.removesuffix(".weight"), w.shape[1]
        g_idx = None
        if scheme == "gptq-v2-act-order":  # act-order: the groups follow a shuffled order of the inputs
            g_idx = (torch.randperm(k, generator=rng) // GROUP).long()
        symmetric = scheme in ("compressed", "gptq")
        scale_dtype = torch.bfloat16 if scheme == "compressed" else torch.float16
        q, zeros, scales, values[name] = int4_quantized(w.float(), GROUP, symmetric, scale_dtype, g_idx)
        if scheme == "awq":
            parts = awq_tensors(q, zeros, scales)
        elif scheme.startswith("gptq"):
            group = torch.arange(k) // GROUP if g_idx is None else g_idx
            parts = gptq_tensors(q, zeros, scales, group, v1=scheme == "gptq")
        else:
            parts = compressed_tensors(q, zeros, scales)
        del weights[name]
        weights.update({f"{owner}.{part}": t for part, t in parts.items()})
    return weights, values


FP8_MAX = 448.0  # e4m3's largest value


def fp8_quantized(w: torch.Tensor, rows: int, cols: int, scale_dtype: torch.dtype):
    """`w` [..., R, C] as e4m3 with one scale for each rows x cols block (cut at the edges), the
    scales, and the values they stand for (each block's, one at a time: no broadcasting shared with
    the code under test)."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    values = torch.empty(w.shape)
    R, C = w.shape[-2:]
    scales = torch.empty((*w.shape[:-2], math.ceil(R / rows), math.ceil(C / cols)), dtype=scale_dtype)
    for i in range(0, R, rows):
        for j in range(0, C, cols):
            part = w[..., i : i + rows, j : j + cols]
            s = (part.abs().amax(dim=(-2, -1)) / FP8_MAX).clamp(min=1e-8).to(scale_dtype)
            q[..., i : i + rows, j : j + cols] = (part / s.float()[..., None, None]).to(torch.float8_e4m3fn)
            scales[..., i // rows, j // cols] = s
            values[..., i : i + rows, j : j + cols] = q[..., i : i + rows, j : j + cols].float() * s.float()[..., None, None]
    return q, scales, values


# how each FP8 way writes its weights: the config, the scales' name and layout, activation scales
FP8_SCHEMES = {
    "fp8-blocks": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 32]},
                   "weight_scale_inv", (16, 32), torch.float32, False),
    "fp8-blocks-128": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
                       "weight_scale_inv", (128, 128), torch.float32, False),  # (Qwen3's and DeepSeek's FP8 releases)
    "fp8-tensor-static": ({"quant_method": "fp8", "activation_scheme": "static"}, "weight_scale", None, torch.float32, True),
    "fbgemm-rows": ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]}, "weight_scale", (1, None),
                    torch.float32, False),
    "compressed-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                            "quantization_status": "compressed",
                            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
                           "weight_scale", (1, None), torch.bfloat16, False),
    "compressed-blocks": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                           "quantization_status": "compressed",
                           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                               "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 16],
                               "symmetric": True}}}},
                          "weight_scale", (32, 16), torch.bfloat16, False),
}  # fmt: skip


def fp8_packed_weights(weights: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's decoder-layer projections as `scheme` writes them in FP8 (the other weights as
    they are), and the float32 values each FP8 weight stands for."""
    _, scale_name, block, scale_dtype, static = FP8_SCHEMES[scheme]
    weights, values = dict(weights), {}
    for name, w in list(weights.items()):
        if not name.startswith("model.layers.") or not name.endswith("_proj.weight") or ".mlp.gate." in name:
            continue
        rows, cols = (w.shape[-2], w.shape[-1]) if block is None else (block[0], block[1] or w.shape[-1])
        q, scales, values[name] = fp8_quantized(w.float(), rows, cols, scale_dtype)
        if block is not None and block[1] is None:
            scales = scales.reshape(*w.shape[:-1], 1)  # a scale a row, as [rows, 1]
        elif block is None:
            scales = scales.reshape(1)  # one for the tensor
        weights[name] = q
        owner = name.removesuffix(".weight")
        weights[f"{owner}.{scale_name}"] = scales
        if static:
            weights[f"{owner}.input_scale"] = torch.tensor([0.05])
    return weights, values


def tiny_quantized_checkpoint(kind: str, scheme: str, path, **overrides):
    """A tiny model of `kind` saved in `path` with its decoder layers' projections quantized as
    `scheme` (one of FP8_SCHEMES' or INT4_SCHEMES'), the float32 values each quantized weight stands
    for, and transformers' model over those values."""
    from safetensors.torch import load_file

    from tests.tiny_models import make_tiny_model
    from tests.util import quantized_checkpoint

    make_tiny_model(kind, path, **overrides)
    plain = load_file(str(path / "model.safetensors"))
    if scheme in FP8_SCHEMES:
        (weights, values), config = fp8_packed_weights(plain, scheme), FP8_SCHEMES[scheme][0]
    else:
        (weights, values), config = int4_packed_weights(plain, scheme), INT4_SCHEMES[scheme]
    return quantized_checkpoint(path, plain, weights, values, config), values


def llama_config_with(**quantization_config) -> dict:
    """A tiny Llama's config.json dict with the given quantization_config."""
    from tests.tiny_models import tiny_config

    return {**tiny_config("llama").to_dict(), "quantization_config": quantization_config}

