"""A Gemma config (Gemma 1's gemma, Gemma 2's gemma2, google/gemma-3-1b-it's gemma3_text, or the text
part of a multimodal gemma3) read into the keys every other family's config uses, with what is
Gemma's own beside them (its defaults where a config leaves them out); bidirectional attention (an
embedding model's) is refused."""

from __future__ import annotations

from typing import Any

# Gemma3TextConfig's defaults: a multimodal config's text_config names only what differs from them
TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "bos_token_id": 2, "eos_token_id": 1,
}  # fmt: skip


# GemmaConfig's and Gemma2Config's (Gemma 2 caps its attention scores and its logits with tanh)
GEMMA_DEFAULTS = {
    "vocab_size": 256000, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "rope_theta": 10_000.0, "bos_token_id": 2, "eos_token_id": 1,
}  # fmt: skip
GEMMA2_DEFAULTS = {**GEMMA_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                   "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}  # fmt: skip

KEPT_NONE = ("sliding_window", "final_logit_softcapping", "attn_logit_softcapping")
GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text")


def gemma_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A Gemma config of any generation in the common keys (the MLP's activation as hidden_act)."""
    if cfg.get("model_type") == "gemma":
        cfg = {**GEMMA_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        _refuse_bidirectional(cfg)
        # "gelu" is the first releases' name for the tanh approximation (transformers 5.24 reads it so;
        # 5.17 took it for the exact GELU)
        act = cfg.get("hidden_act") or "gelu_pytorch_tanh"
        return {**cfg, "hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act}
    if cfg.get("model_type") == "gemma2":
        cfg = {**GEMMA2_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in KEPT_NONE}}
        _refuse_bidirectional(cfg)
        layers = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                           for i in range(layers)]  # fmt: skip
        return {**cfg, "hidden_act": cfg["hidden_activation"], "layer_types": list(types)}
    return _gemma3_text_config(cfg)


def _refuse_bidirectional(cfg: dict[str, Any]) -> None:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (an embedding model's) is not served: answers are generated causally")


def _gemma3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's text model: the RoPE of full layers as rope_theta/rope_scaling, the windowed
    layers' base as rope_local_base_freq, every layer's type in layer_types."""
    if cfg.get("model_type") == "gemma3":  # multimodal: the language model's part
        text = dict(cfg.get("text_config") or {})
        for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):  # named at the top level there
            if key in cfg and key not in text:
                text[key] = cfg[key]
        cfg = text
    # a None in the config is a default's, except where None means none (no window, no capping)
    cfg = {**TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in KEPT_NONE}}
    _refuse_bidirectional(cfg)
    layers = int(cfg["num_hidden_layers"])
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    params = cfg.pop("rope_parameters", None) or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    scaling = cfg.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    return {
        **cfg,
        "model_type": "gemma3_text",
        "hidden_act": cfg["hidden_activation"],
        "layer_types": list(types),
        "rope_theta": float(full.get("rope_theta", cfg["rope_theta"])),
        "rope_scaling": scaling,
        "rope_local_base_freq": float(local.get("rope_theta", cfg["rope_local_base_freq"])),
    }
