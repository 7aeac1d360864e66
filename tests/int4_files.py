"""4-bit checkpoints written as AutoAWQ, GPTQ and compressed-tensors write them (their layouts checked
once against autoawq's, gptqmodel's and compressed-tensors' own code), for tests and benchmarks."""

import numpy as np
import torch

GROUP = 32  # inputs a scale and zero point cover (every scheme below)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the column each nibble of an AutoAWQ word holds, of its eight


def quantized(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype, g_idx=None):
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


SCHEMES = {  # each scheme's quantization_config
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


def packed_weights(weights: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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
        q, zeros, scales, values[name] = quantized(w.float(), GROUP, symmetric, scale_dtype, g_idx)
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
