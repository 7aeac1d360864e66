"""A PEFT LoRA adapter folder read into our module layout.

PEFT saves, for each adapted linear layer W (out x in), A (r x in) and B (out x r); the layer then
computes x W^T + scale * (x A^T) B^T, scale = alpha / r (alpha / sqrt(r) with rsLoRA). The loader
changes some weights on their way to our modules (fused q/k/v and gate/up split, scales folded in,
q/k dimensions reordered for the rotation): every one of those acts on a weight's rows, so B (with
the scale folded in) goes through the very same changes, and A, over the inputs, stays as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cachedattention.lora.batch import ADAPTABLE
from cachedattention.model.hub_cache import expanded
from cachedattention.model.loader import to_our_weights
from cachedattention.model.spec import ModelSpec
from cachedattention.sampling import is_number

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT's names: base_model.model.<module>.lora_A.weight (an adapter's name may sit before .weight)
_PEFT_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)(\.[^.]+)?\.weight")
_REFUSED_OPTIONS = {  # adapter_config.json options that change what is computed: (the refusal's reason)
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "use_qalora": "QALoRA adapters (use_qalora) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2's Conv1D layers) are not supported",
    "lora_bias": "adapters with a bias on lora_B (lora_bias) are not supported",
    "modules_to_save": "adapters that replace whole modules (modules_to_save) are not supported",
    "trainable_token_indices": "adapters that train token embeddings (trainable_token_indices) are not supported",
    "target_parameters": "adapters on parameters (target_parameters: a mixture's experts) are not supported",
    "layer_replication": "adapters that replicate layers (layer_replication) are not supported",
    "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens: the base model before the "
                               "invocation) are not supported",
    "arrow_config": "Arrow routing among adapters (arrow_config) is not supported",
    "use_bdlora": "block-diagonal LoRA adapters (use_bdlora) are not supported",
    "kasa_config": "KaSA adapters (kasa_config) are not supported",
    "velora_config": "VeLoRA adapters (velora_config) are not supported",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported",
}
# PEFT's initialisations that leave the base model's weights as they are; the others (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA) take the adapter's start out of them, so the adapter is served only once PEFT has
# converted it to a plain LoRA (its path_initial_model_for_weight_conversion, which saves it as such)
_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal")


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """An adapter as the linear layers use it: for each of our module names, A (r x in) and B
    transposed (r x out) with the adapter's scale already in it. `fingerprint`: a digest of its
    config and weights, so a conversation's KV computed with it is found again by any engine (or
    replica) serving the same files, whatever name they give it."""

    name: str
    path: str
    rank: int
    fingerprint: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(name: str, folder: str, spec: ModelSpec, shapes: dict[str, tuple[int, int]], max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> LoRAAdapter:  # fmt: skip
    """The PEFT adapter in `folder` for the model of `spec`, whose adaptable linear layers have the
    (out, in) `shapes`; a ValueError that says why for anything it cannot serve exactly."""
    path = expanded(folder, f"LoRA adapter {name!r}")
    if not _is_dir(path):
        raise ValueError(f"LoRA adapter {name!r}: {folder} is not a folder (a PEFT adapter's: {CONFIG_FILE} and "
                         f"{WEIGHT_FILES[0]})")  # fmt: skip
    config_bytes, config = _read_config(name, path)
    weights_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights_file is None:
        raise ValueError(f"LoRA adapter {name!r}: {folder} has neither {' nor '.join(WEIGHT_FILES)}")
    try:
        weights_bytes = weights_file.read_bytes()  # (read once: for the fingerprint and the tensors)
    except OSError as e:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {weights_file}: {e.strerror or e}") from None
    state = _read_weights(name, weights_file, weights_bytes)
    pairs = _pairs(name, state)
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module, (a, b) in sorted(pairs.items()):
        r = a.shape[0]
        if r > max_rank:
            raise ValueError(f"LoRA adapter {name!r}: its rank {r} (at {module}) is greater than max_lora_rank "
                             f"{max_rank} (raise --max-lora-rank)")  # fmt: skip
        rank = max(rank, r)
        b = b.float() * _scale(config, module, r)
        try:
            ours_b = to_our_weights({f"{module}.weight": b}, spec)
        except RuntimeError as e:  # (a fused weight's rows split by the model's shapes: another model's)
            raise ValueError(f"LoRA adapter {name!r}: {module}'s lora_B {tuple(b.shape)} does not fit the model's "
                             f"layers ({e}): an adapter for another base model?") from None  # fmt: skip
        for weight_name, part_b in ours_b.items():
            target = weight_name.removesuffix(".weight")
            _check_target(name, module, target, a, part_b, shapes)
            ours[target] = (a.to(device, dtype).contiguous(), part_b.T.to(device, dtype).contiguous())
    _check_no_strays(name, state)  # (after the pairs: a head's or embedding's copy beside a pair refused there)
    if not ours:
        raise ValueError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    digest = hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()
    return LoRAAdapter(name, str(path), rank, digest, ours)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # (a name the system refuses, too long...: no folder)
        return False


def _read_config(name: str, path: Path) -> tuple[bytes, dict]:
    file = path / CONFIG_FILE
    try:
        raw = file.read_bytes()
        config = json.loads(raw)
    except OSError as e:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {file}: {e.strerror or e}") from None
    except (ValueError, RecursionError):
        raise ValueError(f"LoRA adapter {name!r}: {file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {file} must hold a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: {file} describes a {kind} adapter; only LoRA adapters are served")
    for option, reason in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise ValueError(f"LoRA adapter {name!r}: {reason}")
    init = config.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in _PLAIN_INITS):
        raise ValueError(f"LoRA adapter {name!r}: it was initialised by {init!r:.40}, which changes the base "
                         "model's weights; convert it to a plain LoRA first (PEFT's "
                         "path_initial_model_for_weight_conversion when saving)")  # fmt: skip
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {name!r}: adapters that train biases (bias={config['bias']!r}) are not supported")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if key in config and not _positive_number(v):
            raise ValueError(f"LoRA adapter {name!r}: {key} in {file} must be a positive number, got {v!r:.40}")
    for key in ("rank_pattern", "alpha_pattern"):
        _check_pattern(name, file, key, config.get(key) or {})
    return raw, config


def _check_pattern(name: str, file: Path, key: str, pattern: object) -> None:
    """rank_pattern's and alpha_pattern's keys are regular expressions, their values positive numbers."""
    if not isinstance(pattern, dict):
        raise ValueError(f"LoRA adapter {name!r}: {key} in {file} must be an object")
    for k, v in pattern.items():
        try:
            _pattern(k)
        except (re.error, TypeError) as e:
            raise ValueError(f"LoRA adapter {name!r}: {key} in {file}: {k!r} is not a regular expression ({e})") from None
        if not _positive_number(v):
            raise ValueError(f"LoRA adapter {name!r}: {key} in {file}: {k!r} must be a positive number, got {v!r:.40}")


def _positive_number(v: object) -> bool:
    """A JSON number > 0 that is finite as a float (no bool, no inf or NaN, no integer past float's range)."""
    return is_number(v) and v > 0


def _read_weights(name: str, file: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors in `data`, the bytes of `file` (safetensors, or a PyTorch state dict)."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data)
        except SafetensorError as e:
            raise ValueError(f"LoRA adapter {name!r}: {file} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # (a damaged or foreign pickle raises anything: UnpicklingError, IndexError, ...)
        raise ValueError(f"LoRA adapter {name!r}: {file} is not a readable PyTorch state dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"LoRA adapter {name!r}: {file} is not a state dict of tensors")
    return state


def _pairs(name: str, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted module's (A, B), by its name in the base model's checkpoint (other weights:
    _check_no_strays)."""
    embedding = next((key for key in state if "lora_embedding" in key), None)
    if embedding is not None:
        raise ValueError(f"LoRA adapter {name!r}: {embedding} is an embedding LoRA's; only linear layers' "
                         "lora_A and lora_B are served")  # fmt: skip
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _PEFT_NAME.fullmatch(key)
        if m is not None:
            parts.setdefault(m["module"], {})[m["part"]] = t
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name!r}: {module} has lora_{''.join(ab)} without its other half")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not a.shape[0] or not a.is_floating_point():
            raise ValueError(f"LoRA adapter {name!r}: {module}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             "are not an (r x in, out x r) pair of float matrices")  # fmt: skip
        pairs[module] = (a, b)
    return pairs


def _check_no_strays(name: str, state: dict[str, torch.Tensor]) -> None:
    stray = next((key for key in state if _PEFT_NAME.fullmatch(key) is None), None)
    if stray is not None:
        raise ValueError(f"LoRA adapter {name!r}: {stray} is no LoRA pair's weight (a whole module saved beside "
                         "them?); only linear layers' lora_A and lora_B are served")  # fmt: skip


def _scale(config: dict, module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA; alpha by alpha_pattern where one of its keys
    matches the module's name as PEFT matches them (the whole name, or its end after a dot)."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if key == module or _pattern(key).match(module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern(key: str) -> re.Pattern:
    """A rank_pattern or alpha_pattern key as PEFT matches it: the module's whole name, or its end
    after a dot."""
    return re.compile(rf"(.*\.)?({key})$")


def _check_target(name: str, module: str, target: str, a: torch.Tensor, b: torch.Tensor,
                  shapes: dict[str, tuple[int, int]]) -> None:  # fmt: skip
    if not ADAPTABLE.fullmatch(target) or target not in shapes:
        raise ValueError(f"LoRA adapter {name!r}: {module} is not a layer adapters may target here (the "
                         "attention's q/k/v/o projections and the dense MLPs' gate/up/down, fused or not; "
                         "not a mixture's experts or router, the embedding or the head)")  # fmt: skip
    out_features, in_features = shapes[target]
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise ValueError(f"LoRA adapter {name!r}: {module}'s lora_A {tuple(a.shape)} and lora_B (as {target}: "
                         f"{tuple(b.shape)}) do not fit the model's layer ({out_features} x {in_features}): an "
                         "adapter for another base model?")  # fmt: skip
