"""Configs of families that mix windowed and full layers (OLMo 3, EXAONE 4, Cohere 2) read into the
common keys: each layer's type in layer_types (transformers' defaults where a config names none)
and, for OLMo 3, the RoPE of each type (the full layers' as rope_theta / rope_scaling, the windowed
ones' base as rope_local_base_freq, as Gemma 3's)."""

from __future__ import annotations

from typing import Any

HYBRID = ("olmo3", "exaone4", "cohere2")


def hybrid_config(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {**cfg, "layer_types": _layer_types(cfg)}
    if cfg["model_type"] == "olmo3":
        cfg = _olmo3_rope(cfg)
    return cfg


def _layer_types(cfg: dict[str, Any]) -> list[str]:
    layers = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if cfg["model_type"] == "olmo3":  # every fourth layer full
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
    if cfg["model_type"] == "exaone4" and cfg.get("sliding_window") is None:  # without a window: every layer full
        return ["full_attention"] * layers
    pattern = cfg.get("sliding_window_pattern", 4)
    if isinstance(pattern, str):  # "LLLG": three local (windowed) layers, then a global one, repeated
        if not pattern or set(pattern) - {"L", "G"}:
            raise ValueError(f"sliding_window_pattern {pattern!r} must be made of L (windowed) and G (full)")
        return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(layers)]
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise ValueError(f"sliding_window_pattern must be a positive integer or a pattern like 'LLLG', got {pattern!r}")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _olmo3_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 nests the RoPE by layer type; a config written before names one, which is the
    full layers' (here the windowed ones rotate unscaled, with the same base; transformers 5 gives
    them its default base of 500,000 there, whatever rope_theta says: the released configs name
    500,000, where both readings agree)."""
    params = dict(cfg.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full = {**params, **(cfg.get("rope_scaling") or {})}
        local = {}
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 500_000.0)))
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"OLMo 3's windowed layers rotate with {local['rope_type']!r} scaling, which is not implemented")
    scaling = full if full.get("rope_type", full.get("type", "default")) != "default" else None
    rest = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
    return {**rest, "rope_theta": theta, "rope_scaling": scaling,
            "rope_local_base_freq": float(local.get("rope_theta", theta))}  # fmt: skip
