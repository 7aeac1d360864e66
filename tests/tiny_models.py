"""Tiny random-weight Hugging Face models (Llama, Qwen2, Qwen3, Mistral, with and without sliding
windows, the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma 1, 2 and 3, Phi-3, ...) used as
references in tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256


def tiny_config(kind: str, **overrides):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        common.update(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=10000.0,
        )
        cls = transformers.LlamaConfig
    elif kind == "llama-linear":  # positions scaled down linearly (context-extended Llama 2s, Code Llama's kin)
        common.update(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=10000.0)
        cls = transformers.LlamaConfig
    elif kind == "llama-tied":
        common.update(tie_word_embeddings=True, rope_theta=100000.0, num_key_value_heads=1)
        cls = transformers.LlamaConfig
    elif kind == "qwen2":
        common.update(tie_word_embeddings=True, rope_theta=1000000.0)
        cls = transformers.Qwen2Config
    elif kind == "qwen3":  # per-head q/k norms; heads wider than hidden / heads, as Qwen3's are
        common.update(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32)
        cls = transformers.Qwen3Config
    elif kind == "mistral":
        common.update(sliding_window=None, rope_theta=10000.0)
        cls = transformers.MistralConfig
    elif kind == "mistral-window":  # every layer sees the last 8 keys only (Mistral 7B v0.1's 4096, scaled down)
        common.update(sliding_window=8, rope_theta=10000.0)
        cls = transformers.MistralConfig
    elif kind == "qwen2-window":  # layer 0 full, layers 1 and 2 a window of 12 (from max_window_layers on)
        common.update(tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=True, sliding_window=12,
                      max_window_layers=1)
        cls = transformers.Qwen2Config
    elif kind in ("gemma3", "gemma3-scaled"):  # windows of 8 in layers 0 and 1, layer 2 full; a query scale
        # apart from head_dim; "scaled": the full layers' RoPE linearly scaled, as Gemma 3 4B's and up
        common.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=3,
                      num_key_value_heads=1)
        if kind == "gemma3-scaled":
            common.update(rope_scaling={"rope_type": "linear", "factor": 8.0})
        cls = transformers.Gemma3TextConfig
    elif kind == "gemma":  # Gemma 1: (1 + w) norms, GeGLU under its legacy name, a scaled embedding
        common.update(head_dim=32, hidden_act="gelu", num_key_value_heads=1)
        cls = transformers.GemmaConfig
    elif kind == "gemma2":  # windows of 8 in layers 0 and 2; scores and logits capped low enough to bite
        # (eager: transformers 5.17's default SDPA path for Gemma 2 leaves the scores' cap out)
        common.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=1.0,
                      final_logit_softcapping=0.5, attn_implementation="eager")
        cls = transformers.Gemma2Config
    elif kind in ("phi3", "phi3-window"):  # fused q/k/v and gate/up; "window": Phi-3-mini-4k's window, scaled down
        common.update(rope_theta=10000.0, sliding_window=8 if kind == "phi3-window" else None, pad_token_id=0)
        cls = transformers.Phi3Config
    elif kind == "phi4-mini":  # three quarters of each head rotate; longrope's factors (Phi-4-mini's, scaled down)
        common.update(rope_theta=10000.0, pad_token_id=0, partial_rotary_factor=0.75, original_max_position_embeddings=128,
                      rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6, 3.1, 4.0],
                                    "long_factor": [1.5, 2.5, 4.0, 7.0, 11.0, 16.0]})  # fmt: skip
        cls = transformers.Phi3Config
    elif kind == "qwen2-yarn":  # YaRN stretching a 64-token pretraining window by 8 (Qwen2.5's long-context setting)
        common.update(tie_word_embeddings=True, rope_theta=10000.0,
                      rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64})
        cls = transformers.Qwen2Config
    elif kind == "olmo3":  # OLMo 2's norms; windows of 8 but in layer 2; YaRN on the full layer only
        common.update(rope_theta=10000.0, attention_bias=True, pad_token_id=0, sliding_window=8,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                      rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64})
        cls = transformers.Olmo3Config
    elif kind == "exaone4":  # norms after attention and the MLP, per-head q/k norms; the full layer without RoPE
        common.update(rope_theta=10000.0, sliding_window=8, sliding_window_pattern=2, head_dim=32, pad_token_id=0)
        cls = transformers.Exaone4Config
    elif kind == "ernie4_5":  # RoPE over adjacent pairs; every linear layer with a bias
        common.update(rope_theta=10000.0, use_bias=True, head_dim=16, tie_word_embeddings=True, pad_token_id=0)
        cls = transformers.Ernie4_5Config
    elif kind == "seed_oss":  # q/k/v biases, none on o; mlp_bias
        common.update(rope_theta=10000.0, attention_bias=True, attention_out_bias=False, mlp_bias=True,
                      head_dim=16, pad_token_id=0)
        cls = transformers.SeedOssConfig
    elif kind == "helium":  # q/k/v biases, o without
        common.update(rope_theta=10000.0, attention_bias=True, head_dim=16, pad_token_id=0)
        cls = transformers.HeliumConfig
    elif kind in ("glm", "glm4"):  # half of each head rotates, over adjacent pairs; fused gate/up; GLM-4's four norms
        common.update(rope_theta=10000.0, head_dim=16, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0)
        cls = transformers.GlmConfig if kind == "glm" else transformers.Glm4Config
    elif kind in ("cohere", "cohere-qk-norm"):  # LayerNorm, attention and MLP side by side, RoPE over adjacent
        # pairs, logits scaled; "qk-norm": Command R+'s q and k LayerNorms, a weight for each head
        common.update(rope_theta=10000.0, logit_scale=0.25, layer_norm_eps=1e-5, attention_bias=True, pad_token_id=0,
                      use_qk_norm=kind == "cohere-qk-norm")  # fmt: skip
        cls = transformers.CohereConfig
    elif kind == "cohere2":  # Cohere's, with windows of 8 in layers 0 and 1; layer 2 (full) without RoPE
        common.update(rope_theta=10000.0, logit_scale=0.25, sliding_window=8, sliding_window_pattern=3, pad_token_id=0)
        cls = transformers.Cohere2Config
    elif kind == "smollm3":  # layer 1 without RoPE and with a window of 8 (SmolLM3-3B: every fourth, no window)
        common.update(rope_theta=5000000.0, no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=8,
                      attention_bias=True, mlp_bias=True, pad_token_id=0)
        cls = transformers.SmolLM3Config
    elif kind == "granite":  # its four multipliers, each away from 1; a tied head
        common.update(rope_theta=10000.0, embedding_multiplier=3.0, attention_multiplier=0.6, residual_multiplier=0.5,
                      logits_scaling=4.0, tie_word_embeddings=True)
        cls = transformers.GraniteConfig
    elif kind == "granitemoe":  # Granite's multipliers around 8 experts, 2 per token (Granite 3 1B-A400M's shape)
        common.update(rope_theta=10000.0, embedding_multiplier=3.0, attention_multiplier=0.6, residual_multiplier=0.5,
                      logits_scaling=4.0, tie_word_embeddings=True, num_local_experts=8, num_experts_per_tok=2,
                      intermediate_size=48)
        cls = transformers.GraniteMoeConfig
    elif kind == "granitemoeshared":  # Granite MoE's, with an ungated shared MLP beside the experts
        common.update(rope_theta=10000.0, embedding_multiplier=3.0, attention_multiplier=0.6, residual_multiplier=0.5,
                      logits_scaling=4.0, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48,
                      shared_intermediate_size=40)
        cls = transformers.GraniteMoeSharedConfig
    elif kind == "ministral":  # windows of 8 in layers 0 and 2, layer 1 full (Ministral 8B's interleaving)
        common.update(rope_theta=10000.0, sliding_window=8, head_dim=16,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = transformers.MinistralConfig
    elif kind == "olmo2":  # norms after attention and the MLP only; q/k norms over the whole projection
        common.update(rope_theta=10000.0, attention_bias=True, pad_token_id=0)
        cls = transformers.Olmo2Config
    elif kind == "llama-biases":  # attention_bias and mlp_bias: q/k/v/o and gate/up/down have biases
        common.update(rope_theta=10000.0, attention_bias=True, mlp_bias=True)
        cls = transformers.LlamaConfig
    elif kind == "mixtral":  # 8 experts, 2 per token, every layer sparse
        common.update(sliding_window=None, rope_theta=10000.0, num_local_experts=8, num_experts_per_tok=2,
                      intermediate_size=48)
        cls = transformers.MixtralConfig
    elif kind == "qwen2-moe":  # a shared expert beside the routed ones; layer 1 a plain MLP; top-k not rescaled
        common.update(rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1])
        cls = transformers.Qwen2MoeConfig
    elif kind == "qwen3-moe":  # Qwen3's head norms; top-k rescaled, as Qwen3-30B-A3B's
        common.update(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif kind == "glm4_moe":  # half of each head rotates (halves); q/k norms; a dense layer, then 8 experts in
        # 2 groups (1 kept), 2 per token, scaled by 2.5, and a shared expert
        common.update(head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                      routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        cls = transformers.Glm4MoeConfig
    elif kind == "gpt_oss":  # sinks, windows of 8 in layers 0 and 2, YaRN; 8 biased experts, 2 per token
        common.update(head_dim=16, intermediate_size=32, sliding_window=8, num_local_experts=8, num_experts_per_tok=2,
                      rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "truncate": False, "original_max_position_embeddings": 64,
                                       "rope_theta": 150000.0})  # fmt: skip
        cls = transformers.GptOssConfig
    else:
        raise ValueError(kind)
    common.update(overrides)
    return cls(**common)


def make_tiny_model(kind: str, path: Path, seed: int = 0, **overrides):
    """Save a random tiny model to `path`; return the transformers model (float32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases, head norms and routers so their paths are exercised
        for name, p in model.named_parameters():
            if name.endswith((".bias", "_bias")):  # (gpt-oss's experts: gate_up_proj_bias, down_proj_bias)
                p.normal_(0.0, 0.2)
            elif name.endswith("self_attn.sinks"):  # gpt-oss's: large enough to take a share of each softmax
                p.uniform_(-1.0, 2.0)
            elif name.endswith("experts.gate_up_proj"):  # past swiglu_limit (7) often: the clamp bites
                p.normal_(0.0, 0.6)
            elif name.endswith(("q_norm.weight", "k_norm.weight")) or (kind in ("olmo2", "olmo3", "exaone4", "glm4", "cohere", "cohere-qk-norm", "cohere2")
                                                                          and name.endswith("norm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith((".gate.weight", "shared_expert_gate.weight", "router.weight")):  # routers
                p.normal_(0.0, 0.5)
            elif "gemma" in kind and name.endswith("norm.weight"):  # Gemma's (1 + w): zeros at init
                p.uniform_(-0.5, 0.5)
            elif kind in ("smollm3", "gemma2") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # sharper attention: a layer rotated by mistake moves the logits well past 1e-4
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # GLM-4.5's: an expert's pick, not its weight
                b.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Reference greedy decoding with transformers' own KV cache."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
