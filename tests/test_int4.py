"""4-bit integer checkpoints (AutoAWQ's GEMM layout, GPTQ's two formats, compressed-tensors'
pack-quantized): each weight's values give transformers' logits over the same values; on a CPU with
the few-rows kernel a weight whose groups hold whole blocks of 32 inputs is held only as Q4_1 blocks,
which give the same tokens and logits as float32 copies of its values."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cachedattention import LLM, SamplingParams
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.int4 import unpack_int4
from cachedattention.model.quant_config import Int4Scheme, checkpoint_scheme
from cachedattention.model.spec import spec_from_hf_config
from tests.quantized_files import INT4_SCHEMES, int4_packed_weights, llama_config_with, tiny_quantized_checkpoint
from tests.tiny_models import make_tiny_model
from tests.util import (
    assert_logits_match,
    assert_quantized_model_matches,
    assert_stored_turns_equal_recompute,
    held_as_blocks,
)

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 200 + 20 for i in range(40)]


@pytest.mark.parametrize("kind, scheme, overrides, as_blocks", [
    ("llama", "awq", {}, "all"),
    ("qwen3", "gptq", {}, "all"),  # the first format's zero points stored minus one; sym
    ("mistral", "compressed", {}, "all"),
    ("mixtral", "awq", {"intermediate_size": 64}, "all"),  # experts renamed at load keep their blocks
    ("phi4-mini", "awq", {}, "some"),  # fused q/k/v and gate/up split at load: widened; o and down blocks
    ("llama", "gptq-v2-act-order", {}, "none"),  # shuffled groups: blocks of 32 span several, widened
])  # fmt: skip
def test_a_4_bit_checkpoint_gives_transformers_logits_over_its_values(kind, scheme, overrides, as_blocks, tmp_path, monkeypatch):
    hf, values = tiny_quantized_checkpoint(kind, scheme, tmp_path, **overrides)
    config = json.loads((tmp_path / "config.json").read_text())
    unpacked = dict(unpack_int4(load_file(str(tmp_path / "model.safetensors")), checkpoint_scheme(config)))
    assert unpacked.keys() == values.keys()
    assert all(torch.equal(unpacked[name].dequantize(), v) for name, v in values.items())
    assert_quantized_model_matches(tmp_path, hf, "Q4_1", as_blocks, PROMPT, GREEDY, monkeypatch)


def test_the_load_says_how_many_quantized_weights_are_held_as_blocks(tmp_path, caplog):
    tiny_quantized_checkpoint("phi4-mini", "awq", tmp_path)  # q/k/v and gate/up split at load: widened
    with caplog.at_level("INFO", logger="cachedattention.model.loader"):
        LLM(model=str(tmp_path))
    held = 3 * 2 if FewRowsLinearKernel.load() is not None else 0  # o_proj and down_proj, in each of 3 layers
    assert f"awq checkpoint: {held} of its 12 quantized weights held as the few-rows kernel's Q4_1 blocks" in caplog.text


def test_a_4_bit_model_s_cached_turns_equal_recompute(tmp_path, monkeypatch):
    tiny_quantized_checkpoint("qwen3", "awq", tmp_path)
    assert_stored_turns_equal_recompute(tmp_path, monkeypatch)


def test_on_a_gpu_dtype_every_4_bit_weight_is_widened_straight_to_it(tmp_path, monkeypatch):
    """(Blocks are for the CPU's float32 path: in bfloat16 each weight is its values, rounded, and
    the weights handed to the model are bfloat16 already: a large model never holds all of them as
    float32 at once.)"""
    from cachedattention.model import loader

    hf, values = tiny_quantized_checkpoint("llama", "awq", tmp_path)
    handed = {}
    real = loader.build_model
    monkeypatch.setattr(loader, "build_model", lambda spec, state, *a: handed.update(state) or real(spec, state, *a))
    llm = LLM(model=str(tmp_path), dtype="bfloat16")
    assert not any(held_as_blocks(llm, "Q4_1").values())
    assert {handed[name].dtype for name in values} == {torch.bfloat16}
    weight = llm.engine.model.get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(weight, values["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


def _rewrite(path, change) -> None:
    """The checkpoint's tensors, changed by `change` (a dict in place)."""
    weights = load_file(str(path / "model.safetensors"))
    change(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_zero_biases_of_early_gptq_checkpoints_are_left_out_and_others_refused(tmp_path, monkeypatch):
    """Early AutoGPTQ saved a bias of zeros for every quantized layer, even a Llama's (vLLM skips them)."""
    hf, _ = tiny_quantized_checkpoint("llama", "gptq", tmp_path)
    _rewrite(tmp_path, lambda w: w.update({n.replace(".qweight", ".bias"): torch.zeros(w[n].shape[1], dtype=torch.float16)
                                           for n in list(w) if n.endswith(".qweight")}))  # fmt: skip
    assert_logits_match(LLM(model=str(tmp_path)), hf, PROMPT, GREEDY, monkeypatch)
    _rewrite(tmp_path, lambda w: w["model.layers.0.mlp.up_proj.bias"].fill_(0.5))
    with pytest.raises(ValueError, match=r"has no place for, e.g. \['model.layers.0.mlp.up_proj.bias'\]"):
        LLM(model=str(tmp_path))


def test_a_quantized_head_of_a_tied_model_and_kv_cache_scales_are_set_aside(tmp_path, monkeypatch):
    """A tied model's quantized head copy (the embedding serves) and compressed-tensors' KV-cache
    scales (the KV cache stays in the model's dtype) load as the bfloat16 path loads them."""
    hf, _ = tiny_quantized_checkpoint("llama-tied", "compressed", tmp_path)

    def add(w):
        head = int4_packed_weights({"model.layers.0.x_proj.weight": w["model.embed_tokens.weight"]}, "compressed")[0]
        w.update({k.replace("model.layers.0.x_proj", "lm_head"): t for k, t in head.items()})
        w.update({f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.1) for i in range(3) for kv in "kv"})
    _rewrite(tmp_path, add)
    assert_logits_match(LLM(model=str(tmp_path)), hf, PROMPT, GREEDY, monkeypatch)


@pytest.mark.parametrize("where", ["quantize_config.json", "quant_config.json", "compression_config"])
def test_a_quantization_config_kept_where_vllm_finds_it_is_read(where, tmp_path, monkeypatch):
    """AutoGPTQ's quantize_config.json and AutoAWQ's quant_config.json beside config.json (their
    method told by their fields), compressed-tensors' earlier compression_config."""
    from cachedattention.model.quant_config import checkpoint_method

    scheme = {"quantize_config.json": "gptq", "quant_config.json": "awq", "compression_config": "compressed"}[where]
    hf, _ = tiny_quantized_checkpoint("llama", scheme, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quant = config.pop("quantization_config")
    if where == "compression_config":
        config[where] = quant
    else:
        (tmp_path / where).write_text(json.dumps({k: v for k, v in quant.items() if k != "quant_method"}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_method(tmp_path) == quant["quant_method"]
    assert_logits_match(LLM(model=str(tmp_path)), hf, PROMPT, GREEDY, monkeypatch)


@pytest.mark.parametrize("quant, match", [
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "AWQ checkpoints are read with 4-bit weights in the GEMM layout"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv", "group_size": 128}, "version='gemv'"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False, "group_size": 128}, "zero_point=False"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, "group_size must be a positive integer or -1"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ checkpoints are read with 4-bit weights"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "format='marlin'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {
      "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False}}}}, "asymmetrically"),
    ({"quant_method": "compressed-tensors", "format": "naive-quantized", "config_groups": {"g": {"weights": {
      "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}, "pack-quantized is read"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {
      "num_bits": 8, "type": "int", "strategy": "channel"}}}}, "symmetric 4-bit integer ones"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
      "a": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}},
      "b": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}, "in different ways"),
    ({"quant_method": "bitsandbytes"}, r"a quantized checkpoint \('bitsandbytes'\) is not read"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": ["gptq"]}, r"format=\['gptq'\]"),
])  # fmt: skip
def test_4_bit_schemes_this_engine_does_not_read_are_refused_by_name(quant, match):
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config(llama_config_with(**quant))


def test_a_quantization_config_that_is_no_object_is_refused():
    with pytest.raises(ValueError, match="quantization_config must be an object, got 'awq'"):
        spec_from_hf_config({**llama_config_with(), "quantization_config": "awq"})


def test_4_bit_configs_read_as_their_groups():
    assert checkpoint_scheme(llama_config_with(**INT4_SCHEMES["awq"])) == Int4Scheme("awq", 32)
    assert checkpoint_scheme(llama_config_with(**INT4_SCHEMES["gptq"])) == Int4Scheme("gptq", 32, zero_offset=1)
    assert checkpoint_scheme(llama_config_with(**INT4_SCHEMES["gptq-v2-act-order"])) == Int4Scheme("gptq", 32)
    assert checkpoint_scheme(llama_config_with(quant_method="gptq", bits=4, group_size=-1)) == Int4Scheme("gptq", None, 1)
    assert checkpoint_scheme(llama_config_with(**INT4_SCHEMES["compressed"])) == Int4Scheme("compressed-tensors", 32)


def test_a_packed_weight_missing_a_part_or_of_misfit_parts_is_named(tmp_path):
    tiny_quantized_checkpoint("llama", "awq", tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    zeros = weights.pop(f"{name}.qzeros")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"awq weight {name} has no qzeros"):
        LLM(model=str(tmp_path))
    weights[f"{name}.qzeros"] = zeros.float()
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name}.qzeros must hold integers, got torch.float32"):
        LLM(model=str(tmp_path))
    weights[f"{name}.qzeros"] = zeros
    weights[f"{name}.scales"] = weights[f"{name}.scales"][:1].contiguous()
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} has 1 groups of scales, but 128 inputs in groups of 32 make 4"):
        LLM(model=str(tmp_path))


def test_vllm_s_quantization_names_the_checkpoint_s_own_or_is_refused(tmp_path, capsys):
    from cachedattention.cli import main
    from cachedattention.model.quant_config import check_quantization

    tiny_quantized_checkpoint("llama", "awq", tmp_path / "awq")
    make_tiny_model("llama", tmp_path / "plain")
    llm = LLM(model=str(tmp_path / "awq"), quantization="awq")
    assert any(held_as_blocks(llm, "Q4_1").values())
    for method in ("awq_marlin", "None"):  # (vLLM's Marlin kernels read the same checkpoints)
        check_quantization(method, tmp_path / "awq")
    check_quantization("gguf", None)  # the embedded model is a GGUF file
    with pytest.raises(ValueError, match=r"quantization gptq does not match the model's own \(awq\)"):
        LLM(model=str(tmp_path / "awq"), quantization="gptq")
    with pytest.raises(ValueError, match="is not quantized, and this engine quantizes no weights at load"):
        LLM(model=str(tmp_path / "plain"), quantization="fp8")
    with pytest.raises(ValueError, match="quantization: 'bitsandbytes' is not supported"):
        LLM(model=str(tmp_path / "awq"), quantization="bitsandbytes")
    assert main(["serve", str(tmp_path / "awq"), "-q", "gptq_marlin"]) == 2  # refused before the model loads
    assert "quantization gptq_marlin does not match the model's own (awq)" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "plain"), "--quantization", "fp8", "--prompt", "hi"]) == 2
    assert "is not quantized" in capsys.readouterr().err
