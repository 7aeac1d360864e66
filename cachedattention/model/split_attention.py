"""A new turn's prompt over a long cached history on a CPU: the history and the new tokens apart.

New token i sits at position context + i, so it sees the whole history and the new tokens up to
itself: a causal mask aligned to the bottom-right. The CPU flash kernel takes that only as a
materialised mask, which it reads for every block of scores and cannot skip past. Split, the
history needs no mask at all (the query heads sharing a KV head then fold into that head's rows,
as in decode: no K/V copies), the new tokens are a plain causal square, and the two partial
softmaxes merge exactly by their log-sum-exp. Faster from ~100 new tokens over ~2,000 cached ones
on (bench/split_attention_timing.py); smaller prompts keep the single masked call.
"""

from __future__ import annotations

import torch

# Where the split pays on a CPU (bench/split_attention_timing.py): 10-22 % faster from 100 new tokens
# over 2,048 cached ones; even or slower with fewer of either (the merge costs ~0.1 ms a layer)
MIN_CONTEXT = 2048
MIN_NEW = 96


def split_applies(num_new: int, context_len: int, dtype: torch.dtype) -> bool:
    """Whether a CPU prefill of `num_new` tokens over `context_len` cached ones takes the split."""
    return num_new >= MIN_NEW and context_len >= MIN_CONTEXT and dtype == torch.float32


def attend_history_then_new(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int
) -> torch.Tensor | None:
    """Causal attention of n new queries over context_len + n keys, the last n being their own.

    q [heads, n, d]; k, v [kv_heads, context_len + n, d], each with its last dimension packed
    (stride 1; any other strides). Returns [heads, n, d], or None if an input's last dimension is
    strided or this torch's flash op does not give its log-sum-exp in the layout relied on.
    """
    heads, n, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return None  # the op behind F.sdpa skips the checks F.sdpa makes: it reads d as packed
    # (nor does it check that q and k have as many heads: the new tokens' K/V are expanded for it)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # history: every new token sees every key; a KV head's query heads are just more rows
    o_hist, lse_hist = flash(q.reshape(kv_heads, group * n, d)[None], k[None, :, :context_len],
                             v[None, :, :context_len], 0.0, False)
    # the new tokens: a causal square over their own keys (n rows each: copies are cheap)
    k_new = k[:, context_len:].repeat_interleave(group, dim=0)
    v_new = v[:, context_len:].repeat_interleave(group, dim=0)
    o_new, lse_new = flash(q[None], k_new[None], v_new[None], 0.0, True)
    if lse_hist.shape != (1, kv_heads, group * n) or lse_new.shape != (1, heads, n):
        return None
    lse_hist, lse_new = lse_hist.reshape(heads, n, 1), lse_new.reshape(heads, n, 1)
    top = torch.maximum(lse_hist, lse_new)
    w_hist, w_new = (lse_hist - top).exp_(), (lse_new - top).exp_()
    out = o_hist.reshape(heads, n, d) * w_hist
    out.addcmul_(o_new[0], w_new)
    return out.div_(w_hist + w_new)
