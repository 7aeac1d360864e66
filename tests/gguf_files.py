"""A tiny random Hugging Face model written as a GGUF file the way llama.cpp's converter writes it:
its architecture's metadata, the tensors under llama.cpp's names (a Llama's q/k rows permuted), a
Llama-3 scaled model's `rope_freqs` divisors, and the embedded model's tokenizer (vocabulary 49152)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cachedattention.model.gguf_kquants import random_rows
from tests.tiny_models import make_tiny_model

_LAYER_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
    "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
}  # fmt: skip


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary row order of a Llama's q/k projections."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Each frequency's divisor for Llama 3's scaling, computed as llama.cpp's converter does."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(kind: str, folder: Path, types: dict[str, str] | None = None, **overrides):
    """Write `folder/model.gguf` of a tiny random `kind` model (llama, llama-linear, qwen2, qwen3);
    return the transformers model it holds (float32 tensors: the same weights exactly, unless
    `types` names a K-quant type for some tensors, by llama.cpp's short name: attn_q, ffn_down,
    output...; those hold random super-blocks instead). `overrides`: config fields."""
    import gguf

    from cachedattention.model.embedded import embedded_gguf_path

    arch = "llama" if kind.startswith("llama") else kind
    hf = make_tiny_model(kind, folder / "hf", vocab_size=49152, **overrides)
    cfg = hf.config
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(folder / "model.gguf"), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    src = gguf.GGUFReader(str(embedded_gguf_path()))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        w.add_string(key, src.fields[key].contents())
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _rope_freqs(head_dim, theta, rope))
    elif rope.get("rope_type") == "linear":  # as older converters wrote it: the factor, no type
        w.add_float32(f"{arch}.rope.scale_linear", rope["factor"])
    for name, t in hf.state_dict().items():
        if name != "lm_head.weight" or not cfg.tie_word_embeddings:  # a tied head is the embedding
            gname, a = _gguf_tensor(name, t.float().numpy(), cfg, arch)
            qtype = (types or {}).get(gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0])
            if qtype is None:
                w.add_tensor(gname, a)
            else:  # (random super-blocks: gguf's package does not quantize to K-quants)
                rows = random_rows(qtype, a.shape[0], a.shape[1], np.random.default_rng(len(gname)))
                w.add_tensor(gname, rows, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _gguf_tensor(name: str, a: np.ndarray, cfg, arch: str) -> tuple[str, np.ndarray]:
    if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        return {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                "model.norm.weight": "output_norm.weight"}[name], a  # fmt: skip
    _, _, layer, *_, module, kind = name.split(".")  # model.layers.i.self_attn.q_proj.weight
    if arch == "llama" and module in ("q_proj", "k_proj"):
        a = _permute(a, cfg.num_attention_heads if module == "q_proj" else cfg.num_key_value_heads)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}", np.ascontiguousarray(a)
