"""FP8 checkpoints (transformers' fp8 with blocks or a scale a tensor, fbgemm_fp8, compressed-tensors):
each weight widened and scaled at load gives transformers' logits over the same values; quantizations
this engine does not read are refused by name (4-bit ones: tests/test_int4.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cachedattention import LLM, SamplingParams
from cachedattention.model.fp8 import dequantize_fp8
from cachedattention.model.quant_config import checkpoint_scheme as fp8_scheme
from cachedattention.model.spec import spec_from_hf_config
from tests.tiny_models import make_tiny_model, tiny_config
from tests.util import assert_logits_match, assert_stored_turns_equal_recompute, quantized_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 200 + 20 for i in range(40)]
FP8_MAX = 448.0  # e4m3's largest value


def quantized(w: torch.Tensor, rows: int, cols: int, scale_dtype: torch.dtype):
    """`w` [..., R, C] as e4m3 with one scale for each rows x cols block (cut at the edges), the
    scales, and the values they stand for (each block's, one at a time: no broadcasting shared with
    the code under test)."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    values = torch.empty(w.shape)
    R, C = w.shape[-2:]
    scales = torch.empty((*w.shape[:-2], math.ceil(R / rows), math.ceil(C / cols)), dtype=scale_dtype)
    for i in range(0, R, rows):
        for j in range(0, C, cols):
            part = w[..., i : i + rows, j : j + cols]
            s = (part.abs().amax(dim=(-2, -1)) / FP8_MAX).clamp(min=1e-8).to(scale_dtype)
            q[..., i : i + rows, j : j + cols] = (part / s.float()[..., None, None]).to(torch.float8_e4m3fn)
            scales[..., i // rows, j // cols] = s
            values[..., i : i + rows, j : j + cols] = q[..., i : i + rows, j : j + cols].float() * s.float()[..., None, None]
    return q, scales, values


# how each way writes its weights: the config, the scales' name and layout, activation scales
SCHEMES = {
    "fp8-blocks": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 32]},
                   "weight_scale_inv", (16, 32), torch.float32, False),
    "fp8-tensor-static": ({"quant_method": "fp8", "activation_scheme": "static"}, "weight_scale", None, torch.float32, True),
    "fbgemm-rows": ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]}, "weight_scale", (1, None),
                    torch.float32, False),
    "compressed-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                            "quantization_status": "compressed",
                            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
                           "weight_scale", (1, None), torch.bfloat16, False),
    "compressed-blocks": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                           "quantization_status": "compressed",
                           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                               "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 16],
                               "symmetric": True}}}},
                          "weight_scale", (32, 16), torch.bfloat16, False),
}  # fmt: skip


def fp8_checkpoint(kind: str, scheme: str, path, **overrides):
    """A tiny model saved with its decoder layers' projections as FP8, the FP8 values each stands
    for, and transformers' model over those values."""
    config, scale_name, block, scale_dtype, static = SCHEMES[scheme]
    make_tiny_model(kind, path, **overrides)
    weights = load_file(str(path / "model.safetensors"))
    plain = dict(weights)
    values = {}
    for name, w in list(weights.items()):
        if not name.startswith("model.layers.") or not name.endswith("_proj.weight") or ".mlp.gate." in name:
            continue
        rows, cols = (w.shape[-2], w.shape[-1]) if block is None else (block[0], block[1] or w.shape[-1])
        q, scales, values[name] = quantized(w, rows, cols, scale_dtype)
        if block is not None and block[1] is None:
            scales = scales.reshape(*w.shape[:-1], 1)  # a scale a row, as [rows, 1]
        elif block is None:
            scales = scales.reshape(1)  # one for the tensor
        weights[name] = q
        owner = name.removesuffix(".weight")
        weights[f"{owner}.{scale_name}"] = scales
        if static:
            weights[f"{owner}.input_scale"] = torch.tensor([0.05])
    return quantized_checkpoint(path, plain, weights, values, config), values


@pytest.mark.parametrize("kind, scheme, overrides", [
    ("qwen3", "fp8-blocks", {"intermediate_size": 120}),  # blocks cut at the edges
    ("llama", "fp8-tensor-static", {}),
    ("phi4-mini", "fbgemm-rows", {}),  # fused q/k/v and gate/up rows split after widening
    ("mistral", "compressed-channel", {}),
    ("qwen3-moe", "compressed-blocks", {}),  # each expert's weight (or the stacked experts') by blocks
])  # fmt: skip
def test_an_fp8_checkpoint_gives_transformers_logits_over_its_values(kind, scheme, overrides, tmp_path, monkeypatch):
    hf, values = fp8_checkpoint(kind, scheme, tmp_path, **overrides)
    config = json.loads((tmp_path / "config.json").read_text())
    read = dequantize_fp8(load_file(str(tmp_path / "model.safetensors")), fp8_scheme(config))
    assert values and all(torch.equal(read[name], v) for name, v in values.items())
    assert not any(name.endswith(("_scale", "_scale_inv")) for name in read)
    llm = LLM(model=str(tmp_path))
    assert_logits_match(llm, hf, PROMPT, GREEDY, monkeypatch)


def test_an_fp8_model_s_cached_turns_equal_recompute(tmp_path, monkeypatch):
    fp8_checkpoint("qwen3", "fp8-blocks", tmp_path)
    assert_stored_turns_equal_recompute(tmp_path, monkeypatch)


def _config(**quant) -> dict:
    return {**tiny_config("llama").to_dict(), "quantization_config": quant}


@pytest.mark.parametrize("quant, match", [
    ({"quant_method": "hqq"}, r"a quantized checkpoint \('hqq'\) is not read"),
    ({"quant_method": "torchao"}, r"\('torchao'\) is not read by this engine: give its unquantized weights, an FP8, AWQ"),
    ({"quant_method": "fp8", "fmt": "e3m4"}, "fmt must be e4m3 or e5m2"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive integers"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size must be two positive integers"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 2, "type": "int",
      "strategy": "group", "group_size": 128}}}, "format": "pack-quantized"}, "read with 8-bit float weights"),
    ({"quant_method": "compressed-tensors"}, "has no config_groups"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
      "strategy": "token"}}}}, "weight strategy 'token'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
      "strategy": "channel", "symmetric": False}}}}, "asymmetrically"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"},
      "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}, "sparse"),
])  # fmt: skip
def test_quantizations_this_engine_does_not_read_are_refused_by_name(quant, match):
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config(_config(**quant))


def test_fp8_configs_read_as_their_blocks():
    assert fp8_scheme(_config(quant_method="fp8", weight_block_size=[128, 128])).block == (128, 128)
    assert fp8_scheme(_config(quant_method="fp8")).block is None
    assert fp8_scheme(_config(**SCHEMES["compressed-blocks"][0])).block == (32, 16)
    assert fp8_scheme({"model_type": "llama"}) is None


def test_an_fp8_weight_without_its_scale_or_with_a_misshapen_one_is_named(tmp_path):
    fp8_checkpoint("llama", "fp8-blocks", tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    scale = weights.pop(f"{name}.weight_scale_inv")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"weight {name}.weight is float8_e4m3fn but the checkpoint has no "):
        LLM(model=str(tmp_path))
    weights[f"{name}.weight_scale_inv"] = scale[:, :-1].contiguous()
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name}.weight's scale is \[4, 3\], but blocks of 16x32 over \[64, 128\] make it \[4, 4\]"):
        LLM(model=str(tmp_path))


def test_fp8_weights_under_a_config_that_does_not_say_so_are_refused(tmp_path):
    fp8_checkpoint("llama", "fp8-blocks", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is float8_e4m3fn, but config.json has no quantization_config saying how"):
        LLM(model=str(tmp_path))
