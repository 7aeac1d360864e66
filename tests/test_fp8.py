"""FP8 checkpoints (transformers' fp8 with blocks or a scale a tensor, fbgemm_fp8, compressed-tensors):
each weight's values give transformers' logits over the same values; on a CPU with the few-rows kernel
a weight whose scales hold for whole runs of 32 inputs is held only as F8 blocks, which give what
float32 copies of its values give, bit for bit; quantizations this engine does not read are refused by
name (4-bit ones: tests/test_int4.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cachedattention import LLM, SamplingParams
from cachedattention.model.fp8 import fp8_weights
from cachedattention.model.quant_config import checkpoint_scheme
from cachedattention.model.spec import spec_from_hf_config
from tests.quantized_files import FP8_SCHEMES, llama_config_with, tiny_quantized_checkpoint
from tests.util import (
    assert_quantized_model_matches,
    assert_stored_turns_equal_recompute,
)

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 200 + 20 for i in range(40)]


@pytest.mark.parametrize("kind, scheme, overrides, as_blocks", [
    ("qwen3", "fp8-blocks", {"intermediate_size": 120}, "some"),  # blocks cut at the edges; down's 120 inputs widened
    ("llama", "fp8-tensor-static", {}, "all"),
    ("phi4-mini", "fbgemm-rows", {}, "some"),  # fused q/k/v and gate/up rows split at load: widened
    ("mistral", "compressed-channel", {}, "all"),
    ("qwen3-moe", "compressed-blocks", {}, "none"),  # experts' scales for each 16 inputs: widened
])  # fmt: skip
def test_an_fp8_checkpoint_gives_transformers_logits_over_its_values(kind, scheme, overrides, as_blocks, tmp_path, monkeypatch):
    hf, values = tiny_quantized_checkpoint(kind, scheme, tmp_path, **overrides)
    config = json.loads((tmp_path / "config.json").read_text())
    state = load_file(str(tmp_path / "model.safetensors"))
    read = dict(fp8_weights(state, checkpoint_scheme(config)))
    assert values and read.keys() == values.keys()
    assert all(torch.equal(read[name].dequantize(), v) for name, v in values.items())
    assert not any(name.endswith((".weight_scale", ".weight_scale_inv")) for name in state)  # (each taken with its weight)
    assert_quantized_model_matches(tmp_path, hf, "F8", as_blocks, PROMPT, GREEDY, monkeypatch)


def test_an_fp8_model_s_cached_turns_equal_recompute(tmp_path, monkeypatch):
    tiny_quantized_checkpoint("qwen3", "fp8-blocks", tmp_path)
    assert_stored_turns_equal_recompute(tmp_path, monkeypatch)


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
        spec_from_hf_config(llama_config_with(**quant))


def test_fp8_configs_read_as_their_blocks():
    assert checkpoint_scheme(llama_config_with(quant_method="fp8", weight_block_size=[128, 128])).block == (128, 128)
    assert checkpoint_scheme(llama_config_with(quant_method="fp8")).block is None
    assert checkpoint_scheme(llama_config_with(**FP8_SCHEMES["compressed-blocks"][0])).block == (32, 16)
    assert checkpoint_scheme({"model_type": "llama"}) is None


def test_an_fp8_weight_without_its_scale_or_with_a_misshapen_one_is_named(tmp_path):
    tiny_quantized_checkpoint("llama", "fp8-blocks", tmp_path)
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
    tiny_quantized_checkpoint("llama", "fp8-blocks", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is float8_e4m3fn, but config.json has no quantization_config saying how"):
        LLM(model=str(tmp_path))


def test_f8_blocks_are_copies_and_scales_past_the_kernel_s_range_are_widened(tmp_path):
    """The blocks own their bytes (the loaded tensor maps the checkpoint's file, which may change or
    be cut short while the server runs); a scale whose 256-fold overflows float32 is widened instead."""
    from cachedattention.model.fp8 import LARGEST_SCALE, Fp8Weight

    values = torch.randn(4, 64).to(torch.float8_e4m3fn)
    weight = Fp8Weight(values, torch.tensor([2.0]), None, "w")
    blocks = weight.blocks()
    assert blocks.quants.untyped_storage().data_ptr() != values.untyped_storage().data_ptr()
    assert torch.equal(blocks.dequantize(), weight.dequantize())
    assert Fp8Weight(values, torch.tensor([LARGEST_SCALE]), None, "w").blocks() is not None
    assert Fp8Weight(values, torch.tensor([LARGEST_SCALE * 2]), None, "w").blocks() is None
    assert Fp8Weight(values, torch.full((4, 1), 1e37), None, "w").blocks() is None


def test_weights_the_loader_changes_are_widened_one_at_a_time(tmp_path, monkeypatch):
    """(A mixture's left-out prediction layer, or every split of fused rows, never all float32 at once.)"""
    from cachedattention.model import loader

    tiny_quantized_checkpoint("phi4-mini", "fbgemm-rows", tmp_path)
    calls = []
    real = loader.to_our_weights
    monkeypatch.setattr(loader, "to_our_weights", lambda state, *a: calls.append(len(state)) or real(state, *a))
    LLM(model=str(tmp_path))
    assert len(calls) > 1 and all(n == 1 for n in calls[1:])  # (the first: the whole checkpoint)
