"""Gemma 1 and Gemma 2: (1 + w) norms, GeGLU, the scaled embedding; Gemma 2's norms around attention
and MLP, every other layer windowed, and its attention scores and logits capped (cap * tanh(x / cap)),
against transformers on tiny random models (their logits and greedy tokens: test_model_equivalence);
Gemma 3 with caps too."""

import json
from dataclasses import replace

import pytest
import torch

from cachedattention import LLM, SamplingParams, SchedulerConfig
from cachedattention.model.spec import spec_from_hf_config
from tests.tiny_models import hf_greedy, make_tiny_model
from tests.util import capture_logits, rel_err

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
HUB_GEMMA2 = {  # google/gemma-2-2b-it's config.json, layers and vocabulary cut down
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
    "attention_bias": False, "bos_token_id": 2, "eos_token_id": [1, 107], "cache_implementation": "hybrid",
}  # fmt: skip
HUB_GEMMA = {  # google/gemma-2b-it's, cut down: the first releases wrote the tanh GELU as "gelu"
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_act": "gelu", "hidden_activation": None, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "rope_scaling": None, "bos_token_id": 2, "eos_token_id": 1,
}  # fmt: skip


def test_hub_configs_read_as_transformers_reads_them():
    g2 = spec_from_hf_config(HUB_GEMMA2)
    assert g2.window_layers == (0, 2) and g2.sliding_window == 4096  # every other layer, from the first
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0) and g2.attn_scale == 256**-0.5
    assert g2.sandwich_norms and g2.norms_plus_one() and not g2.qk_norm and g2.local_rope_layers == ()
    assert g2.hidden_act == "gelu_pytorch_tanh" and g2.embed_scale == 8.0 and g2.tie_word_embeddings
    g1 = spec_from_hf_config(HUB_GEMMA)
    assert g1.hidden_act == "gelu_pytorch_tanh" and g1.norms_plus_one() and not g1.sandwich_norms
    # transformers' Gemma never caps its logits, whatever the config names; an embedding model's
    # bidirectional attention is refused
    assert spec_from_hf_config({**HUB_GEMMA, "final_logit_softcapping": 30.0}).final_softcap is None
    with pytest.raises(ValueError, match="bidirectional"):
        spec_from_hf_config({**HUB_GEMMA, "use_bidirectional_attention": True})
    assert g1.attn_scale is None and g1.attn_softcap is None and g1.window_layers == () and g1.embed_scale == 8.0


def test_gemma2_caps_take_its_defaults_and_null_is_none():
    missing = {k: v for k, v in HUB_GEMMA2.items() if not k.endswith("softcapping")}
    assert (spec_from_hf_config(missing).attn_softcap, spec_from_hf_config(missing).final_softcap) == (50.0, 30.0)
    none = spec_from_hf_config({**HUB_GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert none.attn_softcap is None and none.final_softcap is None


def test_the_caps_bite_in_the_tiny_model(tiny_dirs, monkeypatch):
    """Left out, either cap moves the logits far past the tests' 1e-4: they are tested."""
    path, hf = tiny_dirs["gemma2"]
    prompt = [(7 * i + 3) % 250 + 3 for i in range(20)]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    for cap in ("attn_softcap", "final_softcap"):
        llm = LLM(model=str(path))
        monkeypatch.setattr(llm.engine.model, "spec", replace(llm.engine.spec, **{cap: None}))
        for layer in llm.engine.model.model.layers:
            monkeypatch.setattr(layer.self_attn, "spec", llm.engine.model.spec)
        seen = capture_logits(monkeypatch)
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        assert rel_err(seen[0], ref) > 1e-2, cap
        monkeypatch.undo()


def test_chunked_prompts_and_batched_decoders_equal_transformers(tiny_dirs):
    """Capped scores through every attention path: prompts in chunks over cached context, within
    and past the window, and decoders of different lengths through the paged C kernel or in padded
    groups."""
    path, hf = tiny_dirs["gemma2"]
    prompts = [[(7 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((5, 30, 17, 50))]
    for kernel in (True, False):  # decoders through the paged C kernel (capped there), and in padded groups
        llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
        assert llm.engine.runner.fused_decode is None  # the fused C layers are Llama's: no caps
        assert llm.engine.runner.decode_kernel is not None  # this machine builds it (its tests say so)
        if not kernel:
            llm.engine.runner.decode_kernel = None
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(hf, p, 12) for p in prompts]


def test_gemma3_with_caps_equals_transformers(tmp_path, monkeypatch):
    """Gemma 3's modeling caps its logits when its config asks (its released configs do not); the
    attention's cap it names but never applies (transformers 5.17 and 5.24), so neither does this engine."""
    hf = make_tiny_model("gemma3", tmp_path, attn_logit_softcapping=1.0, final_logit_softcapping=0.5,
                         attn_implementation="eager")  # fmt: skip
    assert hf.config._attn_implementation == "eager"  # (transformers' eager attention would cap, if asked)
    assert json.loads((tmp_path / "config.json").read_text())["attn_logit_softcapping"] == 1.0
    llm = LLM(model=str(tmp_path))
    seen = capture_logits(monkeypatch)
    prompt = [(5 * i + 1) % 250 + 3 for i in range(25)]
    out = llm.generate([prompt], GREEDY)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, f"step {step}"
