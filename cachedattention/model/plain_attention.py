"""Attention in plain operations, for what no fused kernel takes: Gemma 2's cap on the scores
(cap * tanh(s / cap)) and gpt-oss's sinks (a learned logit per head that takes its share of the
softmax and is then dropped)."""

from __future__ import annotations

import sys
from typing import Any

import torch

SCORE_BYTES = 256 << 20  # the most float32 scores held at once: longer queries go in blocks of rows


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | Any | None = None, causal: bool = False, *,
                    cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """q [..., heads, n, d] over k, v [..., kv_heads, L, d] (each KV head shared by a group of query
    heads). `mask`: bool (True: attend) or added to the scores, or causal (bottom-right aligned, as
    SDPA's causal_lower_right: the CausalBias a cached prefill's mask is on CUDA); `causal`: query i
    sees keys up to i (n == L); `sinks`: a logit per query head, shaped to broadcast against the
    scores' [..., heads, n, 1]."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    n, length = q.shape[-2], k.shape[-2]
    if causal or _is_causal_bias(mask):
        mask = bottom_right_mask(n, length, q.device)
    rows = max(1, SCORE_BYTES // (4 * length * q[..., :1, :1].numel()))
    if n <= rows:
        return _attend_rows(q, k, v, mask, cap, sinks)
    blocks = [_attend_rows(q[..., i : i + rows, :], k, v, _rows(mask, i, rows, n), cap, _rows(sinks, i, rows, n))
              for i in range(0, n, rows)]  # fmt: skip
    return torch.cat(blocks, dim=-2)


def bottom_right_mask(n: int, length: int, device: torch.device) -> torch.Tensor:
    """n queries at the end of `length` keys, query i at length - n + i: True where it may attend."""
    return torch.ones(n, length, dtype=torch.bool, device=device).tril_(length - n)


def _is_causal_bias(mask: object) -> bool:
    """Whether `mask` is SDPA's CausalBias (a torch.Tensor subclass, so no isinstance test on
    Tensor tells it apart). Its module imports torch._dynamo: not imported here, since no CausalBias
    exists before it is."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(mask, bias.CausalBias)


def _rows(t: torch.Tensor | None, start: int, rows: int, n: int) -> torch.Tensor | None:
    """A mask's (or the sinks') rows of one block of queries; as it is where it broadcasts over them."""
    if t is None or t.dim() < 2 or t.shape[-2] != n:
        return t
    return t[..., start : start + rows, :]


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 cap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    if cap is not None:
        scores = torch.tanh(scores.div_(cap)).mul_(cap)
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    if sinks is None:
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    sink = sinks.float().expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
