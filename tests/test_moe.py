"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): how a config is read, which layers are sparse,
the routing against transformers' own block, and the decode steps that stay off the fused C layers."""

import json

import numpy as np
import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.model.fused_decode import FusedDecode
from cachedattention.model.spec import spec_from_hf_config
from tests.util import capture_logits, rel_err

BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 512}
QWEN_MOE = {**BASE, "model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}


def test_the_hub_and_transformers_names_of_the_expert_count_both_read():
    """Hub configs say num_experts (Qwen) and num_local_experts (Mixtral); transformers 5 writes either."""
    for name in ("num_experts", "num_local_experts"):
        for model_type in ("mixtral", "qwen3_moe"):
            cfg = {**BASE, "model_type": model_type, name: 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
            assert spec_from_hf_config(cfg).moe.num_experts == 6


def test_missing_expert_counts_take_transformers_defaults():
    qwen3 = spec_from_hf_config({**BASE, "model_type": "qwen3_moe"}).moe
    qwen2 = spec_from_hf_config({**BASE, "model_type": "qwen2_moe"}).moe
    mixtral = spec_from_hf_config({**BASE, "model_type": "mixtral"}).moe
    assert (qwen3.num_experts, qwen3.top_k, qwen3.expert_intermediate_size) == (128, 8, 768)
    assert (qwen2.num_experts, qwen2.top_k, qwen2.expert_intermediate_size, qwen2.shared_expert_intermediate_size) == (
        60, 4, 1408, 5632)
    assert (mixtral.num_experts, mixtral.top_k) == (8, 2)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    spec = spec_from_hf_config({**QWEN_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert [spec.is_sparse(i) for i in range(4)] == [False, True, False, False]
    assert spec.moe.shared_expert_intermediate_size == 64 and not spec.moe.normalize_top_k
    mixtral = spec_from_hf_config({**BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    assert all(mixtral.is_sparse(i) for i in range(4)) and mixtral.moe.normalize_top_k
    assert mixtral.moe.expert_intermediate_size == 128  # Mixtral's experts are intermediate_size wide
    assert spec_from_hf_config({**QWEN_MOE, "model_type": "qwen3_moe"}).moe.shared_expert_intermediate_size == 0
    # no experts: a dense model, whatever the family says
    assert spec_from_hf_config({**QWEN_MOE, "num_experts": 0}).moe is None


def test_the_experts_are_part_of_the_fingerprint():
    a, b = spec_from_hf_config(QWEN_MOE), spec_from_hf_config({**QWEN_MOE, "num_experts_per_tok": 3})
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("top_k", [0, 9])
def test_an_impossible_expert_count_per_token_is_refused(top_k, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN_MOE, "num_experts_per_tok": top_k}))
    with pytest.raises(ValueError, match="num_experts_per_tok must be in"):
        LLM(model=str(tmp_path))


def test_the_moe_families_read_their_windows_as_transformers_does():
    """Qwen2-MoE: every other layer below max_window_layers; Qwen3-MoE: every layer; only when used."""
    windowed = {**QWEN_MOE, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3}
    assert spec_from_hf_config(windowed).window_layers == (0, 2)
    assert spec_from_hf_config({**windowed, "model_type": "qwen3_moe"}).window_layers == (0, 1, 2, 3)
    assert spec_from_hf_config({**QWEN_MOE, "sliding_window": 64}).window_layers == ()  # named, not used


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "qwen3-moe", "glm4_moe"])
def test_each_layers_mlp_equals_transformers_block(kind, tiny_dirs):
    """Our sparse block against transformers' on the same hidden states: routing, weights, shared expert."""
    path, hf = tiny_dirs[kind]
    ours = LLM(model=str(path)).engine.model
    x = torch.randn(23, ours.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    for ours_layer, hf_layer in zip(ours.model.layers, hf.model.layers):
        hf_mlp = getattr(hf_layer, "mlp", None) or hf_layer.block_sparse_moe
        with torch.no_grad():
            assert rel_err(ours_layer.mlp(x.clone()), hf_mlp(x[None])[0]) <= 1e-5


def test_mixtral_checkpoint_names_map_to_ours(tiny_dirs):
    from safetensors import safe_open

    path, _ = tiny_dirs["mixtral"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        w1 = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w1.weight")
    assert not any(".mlp." in n for n in names)  # the hub's names, which we rename
    ours = LLM(model=str(path)).engine.model
    assert torch.equal(ours.model.layers[0].mlp.experts[3].gate_proj.weight, w1)


def test_granite_moe_experts_are_split_from_its_fused_tensors(tiny_dirs):
    """Granite MoE (Granite 3 1B-A400M, 3B-A800M): the hub's input_linear holds each expert's gate then
    up rows, output_linear its down projection, router.layer the router; its residual multiplier
    reaches every expert's down projection (a logit error of 9e-3 while it did not: test_model_equivalence)."""
    from safetensors import safe_open

    path, _ = tiny_dirs["granitemoe"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        fused = f.get_tensor("model.layers.1.block_sparse_moe.input_linear.weight")
        down = f.get_tensor("model.layers.1.block_sparse_moe.output_linear.weight")
    ours = LLM(model=str(path)).engine.model
    spec, expert = ours.spec, ours.model.layers[1].mlp.experts[5]
    assert spec.moe.num_experts == 8 and spec.moe.top_k == 2 and spec.moe.normalize_top_k
    assert torch.equal(expert.gate_proj.weight, fused[5, :48]) and torch.equal(expert.up_proj.weight, fused[5, 48:])
    assert torch.allclose(expert.down_proj.weight, down[5] * spec.residual_scale)


def test_decode_steps_run_per_operation_and_batched_rows_route_independently(tiny_dirs, monkeypatch):
    """No fused C layers for experts; a batch of decoders (each row its own experts) gives each
    prompt the tokens it gets alone."""
    path, hf = tiny_dirs["qwen3-moe"]
    llm = LLM(model=str(path))
    assert llm.engine.runner.fused_decode is None
    with pytest.raises(ValueError, match="no mixture-of-experts"):  # refused before any kernel is asked for
        FusedDecode(None, llm.engine.model, llm.engine.runner.pool)
    prompts = [[(5 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((7, 40, 19))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompts[1]], params)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[1] + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompts[1]) - 1 + step]) <= 1e-4


def test_a_gguf_file_with_experts_not_stacked_or_without_metadata_is_refused(tmp_path):
    """A Mixtral GGUF of llama.cpp's layout before 2024 (one tensor per expert) is refused with what to
    do, not half loaded; so is a file without a model's metadata."""
    import gguf

    def write(name: str, arch: str, fill) -> str:
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    def old_mixtral(w, heads: bool = True) -> None:
        w.add_block_count(1)
        w.add_embedding_length(32)
        w.add_feed_forward_length(32)
        if heads:
            w.add_head_count(4)
        w.add_vocab_size(64)
        w.add_expert_count(8)
        w.add_expert_used_count(2)
        w.add_tensor("blk.0.ffn_gate.0.weight", np.zeros((32, 32), dtype=np.float32))  # the old per-expert names

    with pytest.raises(ValueError, match="experts are not stacked"):
        LLM(model=write("mixtral.gguf", "llama", old_mixtral))
    with pytest.raises(ValueError, match="qwen3moe.block_count must be a positive integer, got None"):
        LLM(model=write("bare.gguf", "qwen3moe", lambda w: None))

    def no_heads(w) -> None:
        old_mixtral(w, heads=False)
        w.add_head_count(0)

    with pytest.raises(ValueError, match="head_count must be a positive integer, got 0"):
        LLM(model=write("no-heads.gguf", "llama", no_heads))


def test_glm4_moe_reads_its_routing_and_leaves_out_its_multi_token_prediction_layer(tiny_dirs, tmp_path, monkeypatch):
    """GLM-4.5: sigmoid scores, groups of experts, a bias on the choice, scaled weights, a shared expert
    and dense first layers, as transformers reads its config; the released checkpoints add a
    multi-token-prediction layer past the model's (transformers leaves it out, and so do we)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.util import assert_logits_match

    glm = {**BASE, "model_type": "glm4_moe", "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
           "topk_group": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 2, "routed_scaling_factor": 2.5}
    moe = spec_from_hf_config(glm).moe
    assert moe.sigmoid_groups == (4, 2) and moe.routed_scale == 2.5 and moe.normalize_top_k
    assert moe.dense_layers == (0, 1) and moe.shared_experts_intermediate_size == 16
    with pytest.raises(ValueError, match="n_group 3 must divide"):
        spec_from_hf_config({**glm, "n_group": 3})
    path, hf = tiny_dirs["glm4_moe"]
    folder = tmp_path / "with-mtp"
    shutil.copytree(path, folder)
    state = load_file(str(folder / "model.safetensors"))
    state.update({"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64)})
    save_file(state, str(folder / "model.safetensors"))
    assert_logits_match(LLM(model=str(folder)), hf, [(5 * i + 2) % 250 for i in range(23)], SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True), monkeypatch)  # fmt: skip
