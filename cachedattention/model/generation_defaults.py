"""The model's own sampling defaults, as vLLM's --generation-config: generation_config.json's
temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens), used where a
request (or an LLM call without SamplingParams) sets none; and its eos_token_id (EOS_KEY: each id it
lists ends an answer, as vLLM stops at them: gpt-oss's <|call|>, Llama 3.1's <|eom_id|>). "auto"
reads the model's folder, "vllm" ignores it, a folder reads that folder's file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cachedattention.sampling import is_int, is_number

log = logging.getLogger(__name__)

EOS_KEY = "eos_token_ids"  # the ids generation_config.json's eos_token_id lists (not a request's field)

# generation_config.json's key -> (the request field, whether a value is allowed)
FIELDS = {
    "temperature": ("temperature", lambda v: is_number(v) and 0.0 <= v <= 2.0),
    "top_p": ("top_p", lambda v: is_number(v) and 0.0 < v <= 1.0),
    "top_k": ("top_k", lambda v: is_int(v) and v >= -1),
    "min_p": ("min_p", lambda v: is_number(v) and 0.0 <= v <= 1.0),
    "repetition_penalty": ("repetition_penalty", lambda v: is_number(v) and 0.0 < v <= 10.0),
    "max_new_tokens": ("max_tokens", lambda v: is_int(v) and v > 0),
}


def generation_defaults(source: str, model_dir: Path | None, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request fields the model's generation config sets (those it sets outside their ranges are
    left out, with a warning); {} for "vllm", or where there is no such file in "auto"'s folder.
    `override` (vLLM's --override-generation-config, in generation_config.json's names) is laid over
    it; a value of its out of range is a ValueError."""
    out = _read(source, model_dir)
    for key, value in (override or {}).items():
        if key not in FIELDS:
            raise ValueError(f"override_generation_config: unknown key {key!r}; it takes {', '.join(FIELDS)}")
        field, allowed = FIELDS[key]
        if not allowed(value):
            raise ValueError(f"override_generation_config: {key}={value!r} is out of range")
        out[field] = max(value, 0) if field == "top_k" else value
    shown = {k: v for k, v in out.items() if k != EOS_KEY}
    if shown:
        log.info("sampling defaults from the model's generation config (a request's own values win): %s", shown)
    return out


def _read(source: str, model_dir: Path | None) -> dict[str, Any]:
    if source == "vllm":
        return {}
    folder = model_dir if source == "auto" else Path(source).expanduser()
    if folder is None:  # a GGUF file or the embedded model: no generation config beside it
        return {}
    path = folder / "generation_config.json"
    if not path.is_file():
        if source != "auto":
            raise ValueError(f"generation config folder {source!r} holds no generation_config.json")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if source != "auto":  # asked for by name: an error; beside the weights: served without (as vLLM)
            raise ValueError(f"{path} cannot be read as a JSON object: {e}") from None
        log.warning("%s cannot be read as a JSON object (%s); no sampling defaults from it", path, e)
        return {}
    out: dict[str, Any] = {}
    for key, (field, allowed) in FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if not allowed(value):
            log.warning("%s: %s=%r is out of range; the server's default is used instead", path, key, value)
            continue
        out[field] = max(value, 0) if field == "top_k" else value  # -1 and 0 both mean off
    eos = data.get("eos_token_id")
    ids = [eos] if is_int(eos) else eos if isinstance(eos, list) else []
    if all(is_int(i) and i >= 0 for i in ids):
        if ids:
            out[EOS_KEY] = tuple(ids)
    else:
        log.warning("%s: eos_token_id=%r is not a token id or a list of them; ignored", path, eos)
    return out
