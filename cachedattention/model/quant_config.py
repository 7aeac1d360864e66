"""A checkpoint's quantization_config, read into the scheme its weights are stored in.

Read: FP8 weights (transformers' `fp8`, Meta's `fbgemm_fp8`, compressed-tensors' 8-bit floats;
model/fp8.py) and 4-bit integer weights in groups (AutoAWQ's GEMM layout, GPTQ's, compressed-tensors'
pack-quantized; model/int4.py). Anything else is refused by name. No torch here: the config's check
runs before the command line loads torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "awq", "gptq")
FLOAT_STRATEGIES = ("tensor", "channel", "block")
INT_STRATEGIES = ("group", "channel")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # v1 stores each zero point minus one
# the scales for quantizing activations and the KV cache: not used (both stay in the model's dtype)
UNUSED_SUFFIXES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale", ".kv_scale")
# vLLM's --quantization values for the checkpoints read here, by the quant_method each reads (its
# Marlin kernels' names read the same checkpoints); gguf: a GGUF file
VLLM_QUANTIZATION = {"awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq", "marlin": "gptq",
                     "fp8": "fp8", "fbgemm_fp8": "fbgemm_fp8", "compressed-tensors": "compressed-tensors",
                     "compressed_tensors": "compressed-tensors", "gguf": "gguf", "mxfp4": "mxfp4"}  # fmt: skip


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint's FP8 weights are scaled. `block`: the rows and columns each scale covers
    (blocks at the right and bottom edges may be smaller); None: a scale a tensor or a row, as the
    scale's own shape says."""

    method: str
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class Int4Scheme:
    """How a checkpoint's 4-bit weights are packed and scaled: each value is (q - zero) * scale, with
    a scale and a zero point for each `group_size` inputs of a row (None: one for the whole row).
    `zero_offset`: added to the stored zero points (GPTQ's first format stores them minus one;
    compressed-tensors' symmetric weights store none: every one is 8)."""

    method: str
    group_size: int | None
    zero_offset: int = 0


def with_quantization_config(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """config.json's dict with its quantization_config where the checkpoint keeps it elsewhere, as
    vLLM finds it: compressed-tensors' earlier `compression_config`, a multimodal text_config's, or
    the quantize_config.json (AutoGPTQ) or quant_config.json (AutoAWQ) beside it, whose method is told
    by its fields where it does not say (GPTQ's desc_act, AWQ's w_bit or zero_point)."""
    if not isinstance(config, dict) or config.get("quantization_config") is not None:
        return config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    quant = config.get("compression_config") or text.get("quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        if quant is not None:
            break
        try:
            quant = json.loads((folder / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{folder / name} is not valid JSON: {e}") from None
        if isinstance(quant, dict) and "quant_method" not in quant:
            awq = "w_bit" in quant or "zero_point" in quant or "version" in quant
            quant = {**quant, "quant_method": "awq" if awq else "gptq"}
    return config if quant is None else {**config, "quantization_config": quant}


def checkpoint_scheme(cfg: dict[str, Any]) -> Fp8Scheme | Int4Scheme | None:
    """The scheme a config's quantization_config describes; None without one. A quantization that
    is neither FP8 nor 4-bit integer weights in groups is a ValueError saying what is read."""
    quant = cfg.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ValueError(f"config.json's quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"a quantized checkpoint ({method!r}) is not read by this engine: give its unquantized "
                         "weights, an FP8, AWQ, GPTQ or compressed-tensors (FP8 or 4-bit) checkpoint, or a GGUF file "
                         "(whose quantized blocks it reads)")  # fmt: skip
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    if method == "awq":
        return _awq(quant)
    if method == "gptq":
        return _gptq(quant)
    if method == "fp8":
        fmt = quant.get("fmt", "e4m3")
        if not isinstance(fmt, str) or fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"quantization_config's fmt must be e4m3 or e5m2, got {fmt!r}")
        block = quant.get("weight_block_size")
        return Fp8Scheme(method, None if block is None else _block(block, "weight_block_size"))
    return Fp8Scheme(method)


def _awq(quant: dict[str, Any]) -> Int4Scheme:
    """AutoAWQ's config: 4 bits, its GEMM layout (the one transformers and vLLM read), zero points."""
    bits = quant.get("bits", quant.get("w_bit"))
    version = str(quant.get("version", "gemm")).lower()  # (AutoAWQ writes GEMM)
    if bits != 4 or version != "gemm" or quant.get("zero_point", True) is not True:
        raise ValueError(f"AWQ checkpoints are read with 4-bit weights in the GEMM layout with zero points, not "
                         f"bits={bits!r}, version={version!r}, zero_point={quant.get('zero_point')!r}")  # fmt: skip
    return Int4Scheme("awq", _group_size(quant.get("group_size", quant.get("q_group_size"))))


def _gptq(quant: dict[str, Any]) -> Int4Scheme:
    """GPTQ's config: 4 bits, the gptq or gptq_v2 checkpoint format."""
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if quant.get("bits") != 4 or not isinstance(fmt, str) or fmt not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ checkpoints are read with 4-bit weights in the gptq or gptq_v2 format, not "
                         f"bits={quant.get('bits')!r}, format={fmt!r}")  # fmt: skip
    return Int4Scheme("gptq", _group_size(quant.get("group_size")), zero_offset=GPTQ_FORMATS[fmt])


def _group_size(size: Any) -> int | None:
    if size == -1:
        return None
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ValueError(f"quantization_config's group_size must be a positive integer or -1, got {size!r}")
    return size


def _compressed_tensors(quant: dict[str, Any]) -> Fp8Scheme | Int4Scheme:
    """compressed-tensors' config: every group's weights 8-bit floats, or every group's symmetric
    4-bit integers packed in int32s, one strategy and block (or group size) for all."""
    unread = ("compressed-tensors checkpoints are read with 8-bit float weights (FP8, FP8-dynamic) or symmetric "
              "4-bit integer ones (W4A16)")  # fmt: skip
    if quant.get("sparsity_config"):
        raise ValueError(f"a sparse compressed-tensors checkpoint is not read: {unread}")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"quantization_config has no config_groups: {unread}")
    schemes = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        kind = (weights.get("type"), weights.get("num_bits")) if isinstance(weights, dict) else None
        if kind not in (("float", 8), ("int", 4)):
            raise ValueError(f"quantization_config's group {name!r} quantizes its weights as {weights!r}: {unread}")
        if weights.get("symmetric") is False:  # (zero points: not read)
            raise ValueError(f"quantization_config's group {name!r} quantizes its weights asymmetrically: {unread}")
        strategy = weights.get("strategy")
        if kind == ("float", 8):
            if strategy not in FLOAT_STRATEGIES:
                raise ValueError(f"quantization_config's group {name!r} has weight strategy {strategy!r}: one of "
                                 f"{', '.join(FLOAT_STRATEGIES)} is read")  # fmt: skip
            block = weights.get("block_structure")
            schemes.add(Fp8Scheme("compressed-tensors", _block(block, "block_structure") if strategy == "block" else None))
            continue
        if strategy not in INT_STRATEGIES:
            raise ValueError(f"quantization_config's group {name!r} has weight strategy {strategy!r}: one of "
                             f"{', '.join(INT_STRATEGIES)} is read for 4-bit weights")  # fmt: skip
        fmt = group.get("format") or quant.get("format")
        if fmt != "pack-quantized":
            raise ValueError(f"quantization_config's group {name!r} stores its 4-bit weights as {fmt!r}: "
                             "pack-quantized is read")  # fmt: skip
        size = _group_size(weights.get("group_size")) if strategy == "group" else None
        schemes.add(Int4Scheme("compressed-tensors", size))
    if len(schemes) > 1:
        raise ValueError("quantization_config's groups store their weights in different ways: not read")
    return schemes.pop()


def _block(block: Any, field: str) -> tuple[int, int]:
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):  # fmt: skip
        raise ValueError(f"quantization_config's {field} must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def check_quantization(method: str | None, model: str | Path | None) -> None:
    """vLLM's `quantization`, when given, must name the checkpoint's own method (this engine
    quantizes nothing at load, as vLLM's online fp8 would): a ValueError otherwise. `model`: a local
    folder or .gguf file; None, the embedded model (a GGUF file)."""
    if method is None or method == "None":
        return
    if method not in VLLM_QUANTIZATION:
        raise ValueError(f"quantization {method!r} is not read by this engine (supported: {', '.join(VLLM_QUANTIZATION)})")
    own = checkpoint_method(model)
    if own is None:
        raise ValueError(f"quantization {method}: the model {str(model)!r} is not quantized, and this engine "
                         "quantizes no weights at load (vLLM's online quantization): give a checkpoint quantized "
                         "so, or leave quantization out")  # fmt: skip
    if VLLM_QUANTIZATION[method] != own:
        raise ValueError(f"quantization {method} does not match the model's own ({own}): leave it out, and the "
                         "checkpoint's is read")  # fmt: skip


def checkpoint_method(model: str | Path | None) -> str | None:
    """The quantization a local model's files hold: gguf for a GGUF file (the embedded model's too),
    a folder's quantization_config's quant_method (wherever the folder keeps it), None for an
    unquantized folder (or one whose config cannot be read: the loader says why)."""
    if model is None or str(model).endswith(".gguf"):
        return "gguf"
    folder = Path(model).expanduser()
    try:
        config = with_quantization_config(json.loads((folder / "config.json").read_text()), folder)
    except (OSError, ValueError, RecursionError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if isinstance(method, str) else None


def unused_scales_set_aside(state: dict[str, Any]) -> int:
    """Take the checkpoint's activation and KV-cache scales out of `state` (activations and the KV
    cache stay in the model's dtype here); how many there were."""
    unused = [name for name in state if name.endswith(UNUSED_SUFFIXES)]
    for name in unused:
        del state[name]
    return len(unused)
