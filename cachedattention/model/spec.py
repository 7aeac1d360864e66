"""ModelSpec: the architecture facts the engine needs, parsed from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# Families whose positions are absolute (learned or sinusoidal): a pre-RoPE store cannot decouple them.
ABSOLUTE_POSITION = ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "bert", "gpt_bigcode")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ('llama3'); None on the spec means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k, before RoPE
    # each frequency's divisor: a GGUF file's rope_freqs (how llama.cpp writes Llama 3.1's scaling),
    # linear scaling's factor
    rope_freq_factors: tuple[float, ...] | None = None


    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def fingerprint(self) -> str:
        """Stable hash of the architecture, part of every stored record's identity."""
        fields = asdict(self)
        for name in ("qk_norm", "rope_freq_factors"):  # added later: models without them keep their fingerprints
            if not fields[name]:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _rope_params(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, Llama 3's scaling, linear scaling's factor)."""
    # transformers 5 nests these under rope_parameters; 4.x used rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None, None
    if rope_type == "linear":  # positions divided by the factor: every frequency is
        factor = float(scaling["factor"])
        if not factor > 0:
            raise ValueError(f"linear rope scaling needs a positive factor, got {factor}")
        return theta, None, factor
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r}: only default, 'linear' and 'llama3' are implemented")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    ), None


def _freq_factors(cfg: dict[str, Any], head_dim: int, scaling: RopeScaling | None,
                  linear: float | None) -> tuple[float, ...] | None:  # fmt: skip
    """Each rotary frequency's divisor: a GGUF file's rope_freqs, times linear scaling's factor."""
    factors = cfg.get("rope_freq_factors")
    if factors is None and linear is None:
        return None
    if factors is not None and (scaling is not None or len(factors) != head_dim // 2
                                or not all(float(f) > 0 for f in factors)):  # fmt: skip
        raise ValueError(f"rope_freq_factors must be {head_dim // 2} positive divisors, without Llama 3 scaling")
    return tuple(float(f) * (linear or 1.0) for f in (factors or [1.0] * (head_dim // 2)))


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _refuse_sliding_window(model_type: str, cfg: dict[str, Any]) -> None:
    """Every layer must attend to the whole context: the store keeps and reloads all of it."""
    sliding = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or ()
    if model_type in ("qwen2", "qwen3"):
        # their configs name a window but use it only when asked, and then (as transformers reads them)
        # in the layers from max_window_layers on, or those layer_types marks
        windowed = bool(cfg.get("use_sliding_window") and sliding) and (
            "sliding_attention" in layer_types if layer_types
            else int(cfg.get("max_window_layers") or 0) < int(cfg.get("num_hidden_layers", 0)))
    else:
        windowed = "sliding_attention" in layer_types or bool(
            sliding and sliding < cfg.get("max_position_embeddings", 0))
    if windowed:
        raise ValueError(
            f"{model_type} sliding-window attention ({sliding}) is not supported; "
            "set sliding_window to null (Mistral) or use_sliding_window to false (Qwen)"
        )


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Validate a config.json dict and turn it into a ModelSpec (ValueError if we cannot serve it)."""
    model_type = cfg.get("model_type")
    if model_type in ABSOLUTE_POSITION:
        raise ValueError(
            f"model_type {model_type!r} uses absolute position embeddings: its KV cache cannot be stored "
            "position-free, so CachedAttention refuses it. Supported: " + ", ".join(SUPPORTED)
        )
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    _refuse_sliding_window(model_type, cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling, linear = _rope_params(cfg)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return ModelSpec(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        rope_freq_factors=_freq_factors(cfg, head_dim, scaling, linear),
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
