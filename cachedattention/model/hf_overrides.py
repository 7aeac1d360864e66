"""vLLM's hf_overrides (`--hf-overrides JSON`): values laid over the model's config.json (or a GGUF
file's metadata read as one) before the model's shape is read from it, e.g. a longer
`max_position_embeddings` or another `rope_scaling`. As vLLM lays them over transformers' config: a
value replaces the config's (a dict such as rope_scaling whole), except over a sub-config
(text_config, vision_config...), whose keys are laid over its own, key by key all the way down. A
rope_theta also sets the one transformers 5 keeps in rope_parameters."""

from __future__ import annotations

from typing import Any


def check_hf_overrides(overrides: Any) -> dict[str, Any] | None:
    """`overrides` as given (a dict of config.json's names, or None), or a ValueError saying what is expected."""
    if overrides is None:
        return None
    if callable(overrides):
        raise ValueError("hf_overrides must be a dict of config.json's names (e.g. {\"max_position_embeddings\": "
                         "8192}): a function over transformers' config is not taken here, where the config is "
                         "read as JSON")  # fmt: skip
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides must be a dict of config.json's names, got {type(overrides).__name__}")
    bad = [key for key in overrides if not isinstance(key, str)]
    if bad:
        raise ValueError(f"hf_overrides' keys must be config.json's names (strings), got {bad[:3]!r}")
    return overrides


def apply_hf_overrides(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `config` with `overrides` laid over it (the config itself is left as it was)."""
    if not overrides:
        return config
    out = dict(config)
    for key, value in overrides.items():
        sub_config = key.endswith("_config") and key != "quantization_config" and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if sub_config and isinstance(value, dict) else value
    params = out.get("rope_parameters")
    if "rope_theta" in overrides and isinstance(params, dict) and "rope_theta" in params:
        out["rope_parameters"] = {**params, "rope_theta": overrides["rope_theta"]}
    return out


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `base` key by key, objects over objects all the way down."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
