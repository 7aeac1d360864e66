"""gpt-oss: attention sinks, its clamped SwiGLU experts behind a biased router, MXFP4 weights read as
transformers dequantizes them, and a config read with transformers' defaults. (Logits against
transformers, and the store's tiers, are in test_model_equivalence and test_store_equivalence.)"""

import json
import shutil

import pytest
import torch

from cachedattention import LLM, SamplingParams, SchedulerConfig
from cachedattention.model.loader import mxfp4_dequantize
from cachedattention.model.plain_attention import plain_attention
from cachedattention.model.spec import spec_from_hf_config
from tests.util import assert_logits_match, rel_err

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BASE = {"model_type": "gpt_oss", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 8,
        "num_experts_per_tok": 2}  # fmt: skip


def test_a_config_without_rope_or_layer_types_reads_as_transformers_does():
    spec = spec_from_hf_config(BASE)
    assert spec.attn_sinks and spec.qkv_bias and spec.o_bias
    assert spec.window_layers == (0, 2) and spec.sliding_window == 128  # windowed first, every other layer
    assert spec.rope_theta == 150000.0 and spec.rope_context == 4096 * 32  # YaRN by 32 from 4096 positions
    moe = spec.moe
    assert (moe.top_k, moe.softmax_top_k, moe.router_bias, moe.expert_bias) == (2, True, True, True)
    assert (moe.swiglu_alpha, moe.swiglu_limit) == (1.702, 7.0)
    assert spec_from_hf_config({**BASE, "quantization_config": {"quant_method": "mxfp4"}}).moe is not None
    with pytest.raises(ValueError, match="not implemented"):
        spec_from_hf_config({**BASE, "quantization_config": {"quant_method": "awq"}})


def test_existing_moe_fingerprints_are_unchanged_by_gpt_oss_fields():
    """Stores written for Mixtral and Qwen MoE before gpt-oss's expert fields existed keep their hits:
    at their defaults those fields stay out of the fingerprint; set, they change it."""
    import hashlib
    from dataclasses import asdict, replace

    from cachedattention.model.spec import LATER_FIELDS, LATER_MOE_FIELDS

    qwen = spec_from_hf_config({**BASE, "model_type": "qwen3_moe", "moe_intermediate_size": 32})
    fields = asdict(qwen)
    del fields["rope_context"]
    fields = {k: v for k, v in fields.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    fields["moe"] = {k: v for k, v in fields["moe"].items() if k not in LATER_MOE_FIELDS}  # as before them
    assert qwen.fingerprint() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert qwen.fingerprint() != replace(qwen, moe=replace(qwen.moe, router_bias=True)).fingerprint()


def test_sinks_attend_as_transformers_eager_attention():
    """Our plain attention with sinks against transformers' gpt-oss eager attention: grouped heads,
    causal prompt rows and a mask."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, n, d = 8, 2, 6, 16
    q, k, v = torch.randn(1, heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g), \
        torch.randn(1, kv_heads, n, d, generator=g)  # fmt: skip
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups, module.training = torch.randn(heads, generator=g) * 2, heads // kv_heads, False
    causal = torch.full((n, n), float("-inf")).triu(1)
    ref, _ = eager_attention_forward(module, q, k, v, causal[None, None], scaling=d**-0.5)
    ours = plain_attention(q[0], k[0], v[0], causal=True, sinks=module.sinks.view(-1, 1, 1))
    assert rel_err(ours.transpose(0, 1), ref[0]) <= 1e-5
    # the sinks take a share: the keys' weights sum to less than 1 (without them the output differs)
    assert rel_err(plain_attention(q[0], k[0], v[0], causal=True), ref[0].transpose(0, 1)) > 1e-2


def test_long_queries_run_in_blocks_of_rows_with_the_same_result(monkeypatch):
    """The scores of a long prompt chunk over a long context would not fit at once: blocks of query
    rows, each with its rows of the mask (and the sinks where they vary by row), give the same output."""
    import cachedattention.model.plain_attention as pa

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 37, 8, generator=g), torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    sinks, mask = torch.randn(4, generator=g).view(-1, 1, 1), torch.rand(37, 50, generator=g) > 0.2
    whole = [pa.plain_attention(q, k, v, mask, cap=5.0, sinks=sinks), pa.plain_attention(q, k, v, causal=True)]
    monkeypatch.setattr(pa, "SCORE_BYTES", 4 * 50 * 4 * 5)  # blocks of 5 query rows
    blocked = [pa.plain_attention(q, k, v, mask, cap=5.0, sinks=sinks), pa.plain_attention(q, k, v, causal=True)]
    for a, b in zip(whole, blocked):
        assert rel_err(b, a) <= 1e-6


def test_mxfp4_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 10, 2), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(mxfp4_dequantize(blocks, scales).transpose(1, 2), theirs)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4_dequantize(blocks, scales[..., :1])


def _quantize_experts(path, hf, out_dir):
    """A copy of the tiny checkpoint whose experts are MXFP4 blocks and scales (as the released ones
    are), and the transformers model given the weights they dequantize to."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    shutil.copytree(path, out_dir)
    state = load_file(str(out_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows, cols = state[name].shape  # [E, in, out]
        blocks = torch.randint(0, 256, (experts, cols, rows // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(122, 128, (experts, cols, rows // 32), dtype=torch.uint8, generator=g)
        del state[name]
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
        layer = int(name.split(".")[2])
        param = getattr(hf.model.layers[layer].mlp.experts, name.rsplit(".", 1)[1])
        with torch.no_grad():
            param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(state, str(out_dir / "model.safetensors"))
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (out_dir / "config.json").write_text(json.dumps(cfg))


def test_an_mxfp4_checkpoint_answers_as_its_dequantized_weights(tiny_dirs, tmp_path, monkeypatch):
    from tests.tiny_models import make_tiny_model

    path, _ = tiny_dirs["gpt_oss"]
    hf = make_tiny_model("gpt_oss", tmp_path / "fresh")  # a model of its own to change (same seed, same weights)
    _quantize_experts(path, hf, tmp_path / "mxfp4")
    llm = LLM(model=str(tmp_path / "mxfp4"))
    assert_logits_match(llm, hf, [(7 * i + 3) % 250 for i in range(29)], GREEDY, monkeypatch)


def test_batched_and_chunked_runs_decode_through_torch_and_equal_one_at_a_time(tiny_dirs):
    """The paged C kernel has no sinks: decoders go through torch's groups (padded rows, each KV
    head's query heads with their own sinks); chunked prompts cross the windows of 8."""
    path, _ = tiny_dirs["gpt_oss"]
    llm = LLM(model=str(path))
    assert llm.engine.runner.decode_kernel is None and llm.engine.runner.fused_decode is None
    prompts = [[(5 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((7, 40, 19))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    alone = [llm.generate([p], params)[0] for p in prompts]
    chunked = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    for got, ref in zip(chunked.generate(prompts, params), alone):
        assert got.token_ids == ref.token_ids
        ours, theirs = [t.logprob for t in got.logprobs], [t.logprob for t in ref.logprobs]
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-4)
    batched = llm.generate(prompts, params)  # three decoders of different lengths in one padded group
    for got, ref in zip(batched, alone):
        assert got.token_ids == ref.token_ids
        ours, theirs = [t.logprob for t in got.logprobs], [t.logprob for t in ref.logprobs]
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-4)


def test_mxfp4_experts_are_dequantized_one_at_a_time_straight_to_the_model_s_dtype():
    """e2m1 times a power of two is exact in bfloat16: gpt-oss-20b's experts never exist as float32."""
    from cachedattention.model.loader import _gpt_oss_experts

    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (2, 6, 2, 16), dtype=torch.uint8, generator=g)  # 2 experts, 6 rows, 64 inputs
    scales = torch.randint(120, 134, (2, 6, 2), dtype=torch.uint8, generator=g)
    prefix = "model.layers.0.mlp.experts."
    state = {prefix + "gate_up_proj_blocks": blocks, prefix + "gate_up_proj_scales": scales,
             prefix + "gate_up_proj_bias": torch.randn(2, 6, generator=g)}  # fmt: skip
    out = _gpt_oss_experts(state, torch.bfloat16)
    full = mxfp4_dequantize(blocks, scales)
    for e in range(2):
        gate, up = out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"]
        assert gate.dtype == up.dtype == torch.bfloat16
        assert torch.equal(gate.float(), full[e, 0::2]) and torch.equal(up.float(), full[e, 1::2])
        assert torch.equal(out[f"{prefix}{e}.up_proj.bias"], state[prefix + "gate_up_proj_bias"][e, 1::2])


def test_a_bottom_right_causal_bias_is_the_boolean_mask_it_stands_for():
    """On CUDA a cached prefill's mask is SDPA's CausalBias (a torch.Tensor subclass), and Gemma 2's
    cap and gpt-oss's sinks take it to plain_attention: it must mean the bottom-right causal mask."""
    from torch.nn.attention.bias import causal_lower_right

    from cachedattention.model.llama import bottom_right_causal

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(4, 5, 8, generator=g), torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    sinks = torch.randn(4, generator=g).view(-1, 1, 1)
    boolean = bottom_right_causal(5, 12, q.device)
    assert torch.equal(boolean, torch.ones(5, 12, dtype=torch.bool).tril(7))
    for kw in ({"cap": 5.0}, {"sinks": sinks}):
        want = plain_attention(q, k, v, boolean, **kw)
        assert rel_err(plain_attention(q, k, v, causal_lower_right(5, 12), **kw), want) <= 1e-6
        assert rel_err(want, plain_attention(q, k, v, **kw)) > 1e-2  # (the mask matters here)
