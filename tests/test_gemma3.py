"""Gemma 3 (text): its (1 + w) norms, the norms around attention and MLP, the scaled embedding, GeGLU,
the query scale, windowed layers with their own RoPE base beside full ones with linear scaling;
against transformers on tiny random models, and through the store (its tiers and truncation)."""

import json

import pytest
import torch

from cachedattention import LLM, SamplingParams, SchedulerConfig
from cachedattention.kernels.paged_decode import PagedDecodeKernel
from cachedattention.model.spec import spec_from_hf_config
from tests.tiny_models import hf_greedy
from tests.util import assert_logits_match, capture_logits, rel_err

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
HUB_1B = {  # google/gemma-3-1b-it's config.json, layers and vocabulary cut down
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "attention_bias": False, "bos_token_id": 2, "eos_token_id": [1, 106],
}  # fmt: skip


def test_a_hub_config_reads_as_transformers_reads_it():
    spec = spec_from_hf_config(HUB_1B)
    assert spec.window_layers == (0, 1, 2, 3, 4, 6) and spec.sliding_window == 512  # every sixth layer full
    assert (spec.rope_theta, spec.local_rope_theta, spec.local_rope_layers) == (1e6, 1e4, spec.window_layers)
    assert spec.qk_norm and spec.sandwich_norms
    assert spec.hidden_act == "gelu_pytorch_tanh" and spec.embed_scale == 8.0 and spec.attn_scale == 256**-0.5
    scaled = spec_from_hf_config({**HUB_1B, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert scaled.rope_freq_factors == (8.0,) * 16  # the full layers' linear scaling


def test_a_null_window_is_none_and_a_missing_one_gemma_s_default():
    assert spec_from_hf_config({**HUB_1B, "sliding_window": None}).window_layers == ()
    missing = {k: v for k, v in HUB_1B.items() if k != "sliding_window"}
    assert spec_from_hf_config(missing).sliding_window == 4096  # Gemma3TextConfig's


@pytest.mark.parametrize("change, match", [
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"final_logit_softcapping": -1.0}, "final_logit_softcapping must be a positive number or null"),
    ({"hidden_activation": "relu"}, "activation"),
])  # fmt: skip
def test_what_is_not_implemented_is_refused(change, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HUB_1B, **change}))
    with pytest.raises(ValueError, match=match):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize("kind", ["gemma3", "gemma3-scaled"])
def test_logits_and_tokens_equal_transformers(kind, tiny_dirs, monkeypatch):
    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path))
    seen = capture_logits(monkeypatch)
    prompt = [(7 * i + 3) % 250 + 3 for i in range(37)]  # longer than the window of 8
    out = llm.generate([prompt], GREEDY)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, f"step {step}"
    assert out.token_ids == hf_greedy(hf, prompt, 12)


def test_chunked_prompts_and_batched_decoders_equal_transformers(tiny_dirs):
    path, hf = tiny_dirs["gemma3"]
    prompts = [[(7 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((5, 30, 17, 50))]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(hf, p, 12) for p in prompts]


def test_a_window_that_never_cuts_leaves_the_fused_c_layers_off(tmp_path):
    """Without a window that cuts, the CPU's paged decode kernel serves; the fused layers (Llama's
    structure) must not."""
    from tests.tiny_models import make_tiny_model

    hf = make_tiny_model("gemma3", tmp_path, sliding_window=4096)
    llm = LLM(model=str(tmp_path))
    assert llm.engine.spec.window_layers == () and llm.engine.spec.local_rope_layers == (0, 1)  # still their RoPE
    assert llm.engine.runner.fused_decode is None
    assert llm.engine.runner.decode_kernel is not None or PagedDecodeKernel.load() is None  # the kernel serves
    prompts = [[(5 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((9, 33))]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(hf, p, 12) for p in prompts]


def test_the_text_part_of_a_multimodal_checkpoint_serves(tmp_path, monkeypatch):
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration: their language model is served (under
    language_model.*), the vision tower's weights left out; text prompts as transformers' model answers them."""
    import transformers

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    text = tiny_config("gemma3-scaled")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    hf = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "language_model" in name and name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    llm = LLM(model=str(tmp_path))
    assert_logits_match(llm, hf, [(11 * i + 5) % 250 + 3 for i in range(29)], GREEDY, monkeypatch)
