"""A config's rotary embedding, read as transformers reads it: the base, how many of each head's
dimensions rotate, and the scaling as each frequency's divisor and a factor on the attention.

Every scaling type is reduced to per-frequency divisors (Llama 3's keeps its own formula), so the
tables, the C kernels and the store's loader need nothing new: stored keys are pre-RoPE, whatever
frequencies rotate them later."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ('llama3'); None on the spec means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    llama3: RopeScaling | None = None
    divisors: tuple[float, ...] | None = None  # per rotating frequency (longrope: its short factors)
    # longrope: the factors past `short_window` tokens (transformers uses them for a whole sequence
    # longer than the pretraining window, the short ones otherwise)
    long_divisors: tuple[float, ...] | None = None
    short_window: int | None = None
    attention_factor: float = 1.0  # YaRN's and longrope's scale on cos and sin (so on q.k, squared)
    rotary_dim: int | None = None  # partial rotary: the first rotary_dim of each head's dimensions
    context: int | None = None  # the window the scaling stretches the model to (YaRN's, linear's), as vLLM derives it


SCALED = ("llama3", "yarn", "longrope")  # the types that name a pretraining window


# the families whose modeling rotates part of each head when the config asks
PARTIAL = ("phi3", "glm", "glm4", "glm4_moe")


def rope_settings(cfg: dict[str, Any], head_dim: int) -> RopeSettings:
    """The RoPE a config describes (ValueError for what is not implemented)."""
    # transformers 5 nests these under rope_parameters; 4.x used rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not 0 < theta < math.inf:  # (NaN too) every frequency would be NaN or infinite
        raise ValueError(f"rope_theta must be a positive finite number, got {theta}")
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if cfg.get("model_type") == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's config reads them so
        rope_type = "longrope"
    rotary_dim = _rotary_dim(cfg, params, scaling, head_dim)
    pairs = (rotary_dim or head_dim) // 2
    gguf = cfg.get("rope_freq_factors")  # a GGUF file's divisors, as llama.cpp applies them
    if gguf is not None and (rope_type == "llama3" or len(gguf) != pairs or not all(float(f) > 0 for f in gguf)):
        raise ValueError(f"rope_freq_factors must be {pairs} positive divisors, without Llama 3 scaling")
    if rope_type == "default":
        return RopeSettings(theta, divisors=_tuple(gguf), rotary_dim=rotary_dim)
    if rope_type == "linear":  # positions divided by the factor: every frequency is
        factor = _positive(scaling, "factor")
        stretched = int(int(cfg.get("max_position_embeddings") or 4096) * factor)
        return RopeSettings(theta, divisors=tuple(float(f) * factor for f in (gguf or [1.0] * pairs)),
                            rotary_dim=rotary_dim, context=stretched)  # fmt: skip
    if rope_type not in SCALED:
        raise ValueError(f"unsupported rope scaling {rope_type!r}: only default, 'linear', 'llama3', 'yarn' and "
                         "'longrope' are implemented (dynamic ones change every frequency with the sequence's "
                         "length, which a stored KV cache cannot follow)")  # fmt: skip
    # Phi-3 writes the pretraining window beside rope_scaling; transformers reads it there first
    original = int(cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings") or 4096)  # fmt: skip
    if rope_type == "llama3":
        low, high = _positive(scaling, "low_freq_factor"), _positive(scaling, "high_freq_factor")
        if not low < high:  # (the formula divides by their difference)
            raise ValueError(f"Llama 3's rope scaling needs low_freq_factor < high_freq_factor, got {low} and {high}")
        return RopeSettings(theta, llama3=RopeScaling(
            factor=_positive(scaling, "factor"), low_freq_factor=low, high_freq_factor=high,
            original_max_position_embeddings=int(_positive(scaling, "original_max_position_embeddings")),
        ), rotary_dim=rotary_dim)  # fmt: skip
    # both name their factor by the window's growth where the config gives none (DeepSeek's, Phi-3's)
    factor = float(scaling.get("factor") or int(cfg.get("max_position_embeddings") or original) / original)
    if rope_type == "yarn":
        return replace(_yarn(scaling, theta, factor, original, rotary_dim or head_dim, rotary_dim),
                       context=int(original * factor))  # fmt: skip
    return _longrope(scaling, theta, factor, original, pairs, rotary_dim)


def _rotary_dim(cfg: dict[str, Any], params: dict[str, Any], scaling: dict[str, Any], head_dim: int) -> int | None:
    """How many of each head's dimensions rotate, when not all of them (Phi-4-mini's three quarters,
    GLM's half)."""
    partial = scaling.get("partial_rotary_factor", params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")))
    if partial is None or float(partial) == 1.0:
        return None
    if cfg.get("model_type") not in PARTIAL:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor {partial}) are implemented only where "
                         f"transformers' modeling has them ({', '.join(PARTIAL)}), not for {cfg.get('model_type')!r}")
    dim = int(head_dim * float(partial))
    if not 0 < dim < head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor {partial} rotates {dim} of {head_dim} dimensions: it must be an even "
                         "number of them, above 0")  # fmt: skip
    return dim


def _yarn(scaling: dict[str, Any], theta: float, factor: float, original: int, dim: int,
          rotary_dim: int | None) -> RopeSettings:  # fmt: skip
    """YaRN (Qwen's long-context setting, DeepSeek's): low frequencies interpolated by the factor,
    high ones kept, a linear ramp between; cos and sin scaled by the attention factor."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the dimension that turns this often in the window
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    divisors = []
    for i in range(dim // 2):
        kept = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: extrapolated (unscaled), 0: interpolated
        divisors.append(1.0 / ((1.0 - kept) / factor + kept))
    return RopeSettings(theta, divisors=tuple(divisors), attention_factor=float(attention), rotary_dim=rotary_dim)


def _longrope(scaling: dict[str, Any], theta: float, factor: float, original: int, pairs: int,
              rotary_dim: int | None) -> RopeSettings:  # fmt: skip
    """LongRoPE (Phi-3.5, Phi-4-mini): a divisor per frequency, one set within the pretraining
    window and one past it; cos and sin scaled by sqrt(1 + ln(factor) / ln(window))."""
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if not isinstance(factors, list) or len(factors) != pairs or not all(
                isinstance(f, (int, float)) and f > 0 for f in factors):  # fmt: skip
            raise ValueError(f"longrope's {name} must be {pairs} positive numbers, one per rotating frequency")
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeSettings(theta, divisors=_tuple(short), long_divisors=_tuple(long), short_window=original,
                        attention_factor=float(attention), rotary_dim=rotary_dim)  # fmt: skip


def _positive(scaling: dict[str, Any], key: str) -> float:
    value = scaling.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"rope scaling's {key} must be a positive number, got {value!r}")
    return float(value)


def _tuple(values: list | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)
