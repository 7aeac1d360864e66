"""A prompt over a long cached history, attended in two parts merged by log-sum-exp, equals the
masked single call and transformers."""

import pytest
import torch
import torch.nn.functional as F

import cachedattention.model.llama as llama_mod
from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.model import split_attention
from tests.tiny_models import make_tiny_model
from tests.util import capture_logits, rel_err


def _reference(q, k, v, context_len):
    """The bottom-right causal mask, materialised, with K/V heads expanded."""
    heads, n, _ = q.shape
    group = heads // k.shape[0]
    mask = torch.ones(n, context_len + n, dtype=torch.bool).tril(context_len)
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]


@pytest.mark.parametrize(
    "heads,kv_heads,n,context,d",
    [(9, 3, 40, 300, 16), (4, 4, 7, 50, 16), (8, 2, 1, 20, 16), (6, 1, 33, 129, 16), (9, 3, 100, 1100, 64)],
)
def test_split_equals_the_masked_call(heads, kv_heads, n, context, d):
    torch.manual_seed(heads * 100 + n)
    q = torch.randn(n, heads, d).transpose(0, 1)  # strided like the model's queries
    pool_k = torch.randn(context + n + 5, kv_heads, d) * 3  # a pool slice: [tokens, kv_heads, d]
    pool_v = torch.randn(context + n + 5, kv_heads, d)
    k, v = pool_k[: context + n].transpose(0, 1), pool_v[: context + n].transpose(0, 1)
    got = split_attention.attend_history_then_new(q, k, v, context)
    assert got is not None and got.shape == (heads, n, d)
    assert rel_err(got, _reference(q, k, v, context)) <= 1e-5


def test_split_refuses_inputs_whose_last_dimension_is_strided():
    """The flash op reads the head dimension as packed; a strided one would give wrong numbers."""
    q = torch.randn(4, 8, 16)
    k = torch.randn(2, 16, 40).transpose(1, 2)  # [kv_heads, tokens, d] with d strided
    v = torch.randn(2, 40, 16)
    assert split_attention.attend_history_then_new(q, k, v, 32) is None
    assert split_attention.attend_history_then_new(q, k.contiguous(), v, 32) is not None


def test_split_applies_only_to_long_float32_histories():
    lo_ctx, lo_new = split_attention.MIN_CONTEXT, split_attention.MIN_NEW
    assert split_attention.split_applies(lo_new, lo_ctx, torch.float32)
    assert not split_attention.split_applies(lo_new - 1, lo_ctx, torch.float32)
    assert not split_attention.split_applies(lo_new, lo_ctx - 1, torch.float32)
    assert not split_attention.split_applies(lo_new, lo_ctx, torch.bfloat16)


def test_a_turn_over_a_long_history_takes_the_split_and_matches_transformers(tmp_path, monkeypatch):
    hf = make_tiny_model("qwen2", tmp_path, max_position_embeddings=4096)  # q/k/v biases, 2 KV heads
    llm = LLM(model=str(tmp_path), cache=CacheConfig(page_size=16))
    calls = []
    real = split_attention.attend_history_then_new

    def spy(q, k, v, context_len):
        out = real(q, k, v, context_len)
        calls.append((q.shape[1], context_len, out is not None))
        return out

    monkeypatch.setattr(llama_mod, "attend_history_then_new", spy)
    seen = capture_logits(monkeypatch)
    history = [(7 * i + 3) % 250 for i in range(2150)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first = llm.generate([history], params)[0]  # prefilled in chunks of 512: the last (102) is split
    turn = history + first.token_ids + [(11 * i + 5) % 250 for i in range(100)]
    second = llm.generate([turn], params)[0]  # the history from the device prefix cache
    assert second.metrics.cached_tokens["device"] >= 2144  # whole pages of the first turn
    assert (102, 2048, True) in calls  # the first turn's last chunk
    assert any(n >= 100 and ctx >= 2144 and ok for n, ctx, ok in calls)  # the new turn
    with torch.no_grad():
        ref1 = hf(torch.tensor([history + first.token_ids])).logits[0]
        ref2 = hf(torch.tensor([turn + second.token_ids])).logits[0]
    rows = [ref1[len(history) - 1 + i] for i in range(3)] + [ref2[len(turn) - 1 + i] for i in range(3)]
    assert len(seen) == len(rows)
    for i, (got, want) in enumerate(zip(seen, rows)):
        assert rel_err(got, want) <= 1e-4, f"logits row {i}"
