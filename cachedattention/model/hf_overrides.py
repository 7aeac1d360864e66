"""vLLM's hf_overrides (`--hf-overrides JSON`): values laid over the model's config.json (or a GGUF
file's metadata read as one) before the model's shape is read from it, e.g. a longer
`max_position_embeddings` or another `rope_scaling`. An object over an object merges key by key
(as vLLM updates a nested config), anything else replaces the value."""

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
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_hf_overrides(out[key], value)
        else:
            out[key] = value
    return out
