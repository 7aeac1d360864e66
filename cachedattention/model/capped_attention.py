"""Attention whose scores are capped before the softmax (Gemma 2's cap * tanh(s / cap)), in plain
operations: no fused kernel takes the cap."""

from __future__ import annotations

import torch
from torch.nn.attention.bias import CausalBias


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float,
                     mask: torch.Tensor | CausalBias | None = None, causal: bool = False) -> torch.Tensor:  # fmt: skip
    """q [..., heads, n, d] over k, v [..., kv_heads, L, d] (each KV head shared by a group of query
    heads). `mask`: bool (True: attend) or added to the scores, or causal (bottom-right aligned, as
    SDPA's causal_lower_right); `causal`: query i sees keys up to i (n == L)."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    scores = torch.tanh(scores.div_(cap)).mul_(cap)
    n, length = scores.shape[-2:]
    if causal or isinstance(mask, CausalBias):
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_(length - n)
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
