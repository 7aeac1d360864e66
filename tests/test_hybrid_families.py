"""Configs of OLMo 3, EXAONE 4, Cohere, ERNIE 4.5, Seed-OSS, Helium and GLM read as transformers reads them:
their layer types and windows, the layers without RoPE, each type's RoPE, biases and defaults.
(Their logits against transformers: test_model_equivalence; through the store: test_store_equivalence
and test_rope_scaling's truncation.)"""

import pytest

from cachedattention.model.spec import spec_from_hf_config

BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 65536}  # fmt: skip


def test_exaone4_windows_and_its_full_layers_without_rope():
    spec = spec_from_hf_config({**BASE, "model_type": "exaone4", "sliding_window": 4096, "sliding_window_pattern": "LLLG"})
    assert spec.window_layers == (0, 1, 2, 4, 5, 6) and spec.sliding_window == 4096
    assert spec.nope_layers == (3, 7) and spec.post_norms_only and spec.qk_norm and not spec.qk_norm_full
    by_int = spec_from_hf_config({**BASE, "model_type": "exaone4", "sliding_window_pattern": 4})  # window: 4096
    assert (by_int.window_layers, by_int.nope_layers) == (spec.window_layers, spec.nope_layers)
    # a window no shorter than the context never cuts, but the full layers still go without RoPE
    long = spec_from_hf_config({**BASE, "model_type": "exaone4", "sliding_window": 65536, "sliding_window_pattern": 4})
    assert long.window_layers == () and long.nope_layers == (3, 7)
    none = spec_from_hf_config({**BASE, "model_type": "exaone4", "sliding_window": None})  # EXAONE 4.0 1.2B's
    assert none.window_layers == () and none.nope_layers == ()


def test_olmo3_full_layers_take_the_scaling_and_windowed_ones_rotate_plainly():
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192}
    before = spec_from_hf_config({**BASE, "model_type": "olmo3", "rope_theta": 5e5, "rope_scaling": yarn})
    nested = spec_from_hf_config({**BASE, "model_type": "olmo3", "rope_parameters": {
        "full_attention": {**yarn, "rope_theta": 5e5}, "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}})
    for spec in (before, nested):
        assert spec.window_layers == (0, 1, 2, 4, 5, 6) and spec.local_rope_layers == spec.window_layers
        assert spec.rope_theta == spec.local_rope_theta == 5e5 and spec.rope_attention_factor is not None
        assert spec.qk_norm_full and spec.post_norms_only
    assert before.rope_freq_factors == nested.rope_freq_factors
    plain = spec_from_hf_config({**BASE, "model_type": "olmo3"})
    assert plain.rope_theta == 5e5 and plain.rope_freq_factors is None and plain.sliding_window == 4096
    with pytest.raises(ValueError, match="windowed layers rotate with 'yarn'"):
        spec_from_hf_config({**BASE, "model_type": "olmo3", "rope_parameters": {
            "full_attention": {"rope_type": "default"}, "sliding_attention": yarn}})


@pytest.mark.parametrize("config, qkv, o, mlp", [
    ({"model_type": "ernie4_5", "use_bias": True}, True, True, True),
    ({"model_type": "ernie4_5"}, False, False, False),
    ({"model_type": "seed_oss"}, True, False, False),  # q/k/v biases by default
    ({"model_type": "seed_oss", "attention_out_bias": True, "mlp_bias": True}, True, True, True),
    ({"model_type": "helium", "attention_bias": True}, True, False, False),  # o never has one
])  # fmt: skip
def test_biases_as_each_family_places_them(config, qkv, o, mlp):
    spec = spec_from_hf_config({**BASE, **config})
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (qkv, o, mlp)


def test_defaults_where_a_config_leaves_fields_out():
    ernie = spec_from_hf_config({**BASE, "model_type": "ernie4_5"})
    assert ernie.head_dim == 128 and ernie.tie_word_embeddings and ernie.rope_theta == 5e5 and ernie.rope_interleaved
    helium = spec_from_hf_config({**BASE, "model_type": "helium"})
    assert helium.head_dim == 128 and helium.rms_norm_eps == 1e-8 and helium.rope_theta == 1e5 and helium.rope_interleaved
    assert spec_from_hf_config({**BASE, "model_type": "seed_oss"}).head_dim == 128


@pytest.mark.parametrize("config, match", [
    ({"model_type": "exaone4", "sliding_window_pattern": "LLXG"}, "made of L"),
    ({"model_type": "olmo3", "layer_types": ["full_attention"] * 3}, "must name each of the 8 layers"),
    ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["chunked_attention"] * 8},
     "'chunked_attention' is not implemented"),
])  # fmt: skip
def test_malformed_or_unknown_layer_types_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config({**BASE, **config})


def test_cohere_norms_blocks_and_logit_scale():
    cohere = spec_from_hf_config({**BASE, "model_type": "cohere", "layer_norm_eps": 1e-3})
    assert cohere.layer_norm and cohere.parallel_block and cohere.rope_interleaved and cohere.rms_norm_eps == 1e-3
    assert cohere.logits_scale == 16.0 and cohere.tie_word_embeddings and cohere.rope_theta == 5e5  # 1 / 0.0625
    assert cohere.window_layers == () and cohere.nope_layers == ()
    two = spec_from_hf_config({**BASE, "model_type": "cohere2"})
    assert two.head_dim == 16 and spec_from_hf_config({**BASE, "model_type": "cohere2", "head_dim": 32}).head_dim == 32
    assert two.window_layers == (0, 1, 2, 4, 5, 6) and two.nope_layers == (3, 7)  # the full layers go without RoPE
    unwindowed = spec_from_hf_config({**BASE, "model_type": "cohere2", "sliding_window": None})
    assert unwindowed.window_layers == () and unwindowed.nope_layers == tuple(range(8))  # as transformers: none rotate
    plus = spec_from_hf_config({**BASE, "model_type": "cohere", "use_qk_norm": True})  # Command R+
    assert plus.qk_norm and plus.qk_norm_per_head and not cohere.qk_norm and not cohere.qk_norm_per_head


def test_glm_rotates_half_of_each_head_by_default():
    for family in ("glm", "glm4"):
        spec = spec_from_hf_config({**BASE, "model_type": family})
        assert spec.rotary_dim == 64 and spec.head_dim == 128 and spec.rope_interleaved and spec.qkv_bias
        assert not spec.o_bias and spec.sandwich_norms == (family == "glm4")


@pytest.mark.parametrize("family, eos", [("glm4", (151329, 151336, 151338)), ("olmo3", (50279,)), ("cohere2", (255001,)),
                                         ("exaone4", (2,)), ("phi3", (32000,))])  # fmt: skip
def test_a_config_without_its_end_of_text_takes_the_family_s(family, eos):
    assert spec_from_hf_config({**BASE, "model_type": family}).eos_token_ids == eos
