"""Read a llama-architecture GGUF file: its config (as a config.json dict) and dequantized weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: str):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise ValueError("reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path: str) -> dict[str, Any]:
    """The file's metadata as a Hugging Face style config dict."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def p(name: str, default: Any = None) -> Any:
        return _field(r, f"llama.{name}", default)

    heads = p("attention.head_count")
    vocab = p("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {t.name for t in r.tensors}
    return {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(p("embedding_length")),
        "intermediate_size": int(p("feed_forward_length")),
        "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(p("attention.head_count_kv", heads)),
        "head_dim": int(p("rope.dimension_count", p("embedding_length") // heads)),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(p("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(p("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
    }


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved rotary row order for q/k projections (HF uses rotate_half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(path: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under Hugging Face parameter names."""
    from gguf.quants import dequantize

    r = _reader(path)
    state: dict[str, torch.Tensor] = {}
    for t in r.tensors:
        base, _, suffix = t.name.rpartition(".")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if base.startswith("blk."):
            _, idx, kind = base.split(".", 2)
            if kind not in _LAYER_NAMES:
                continue
            if kind == "attn_q":
                w = _unpermute(w, config["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute(w, config["num_key_value_heads"])
            name = f"model.layers.{idx}.{_LAYER_NAMES[kind]}.{suffix}"
        elif base in _GLOBAL_NAMES:
            name = f"{_GLOBAL_NAMES[base]}.{suffix}"
        else:
            continue
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state
