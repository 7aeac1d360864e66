"""Model files damaged or of another kind (found by fuzzing the loader): each is a ValueError that
names the file, weight or field at fault, never another exception, a model that silently answers
garbage, or an allocation of absurd size."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cachedattention import LLM, SamplingParams
from cachedattention.cli import main
from tests.gguf_files import patched, rewritten_gguf, tensor_info_at, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _copy(tiny_dirs, tmp_path, config=None, state=None, kind="llama") -> Path:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs[kind][0], folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if state is not None:
        save_file(state(load_file(str(folder / "model.safetensors"))), str(folder / "model.safetensors"))
    return folder


K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, K_PROJ: s[K_PROJ][:-1]}, rf"weight {K_PROJ} is \[\d+, 64\], but the config makes it"),
    (lambda s: {k: v.to(torch.int8) for k, v in s.items()}, r"weight .* is int8: this engine reads float32, float16"),
    (lambda s: {**s, K_PROJ: s[K_PROJ].to(torch.float8_e4m3fn)}, rf"weight {K_PROJ} is float8_e4m3fn"),
])  # fmt: skip
def test_a_weight_of_another_shape_or_type_is_named(change, match, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match=match):
        LLM(model=str(_copy(tiny_dirs, tmp_path, state=change)))


def test_a_head_bias_the_model_has_no_place_for_is_refused(tiny_dirs, tmp_path):
    """lm_head.bias was dropped without a word (only model.* weights were checked for a place)."""
    head = "lm_head.weight"
    with pytest.raises(ValueError, match=r"no place for, e.g. \['lm_head.bias'\]"):
        LLM(model=str(_copy(tiny_dirs, tmp_path, state=lambda s: {**s, "lm_head.bias": s[head][:, 0].clone()})))


@pytest.mark.parametrize("config, match", [
    ({"eos_token_id": ["a"]}, "eos_token_id must be a token id or a list of them"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings must be a positive integer up to"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta must be a positive finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta must be"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive finite number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"a quantized checkpoint \('bitsandbytes'\) is not read"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "low_freq_factor < high"),
    ({"num_hidden_layers": 1000}, r"the config has 1000 layers, but the checkpoint's weights stop at layer \d+: a shard missing"),
    ({"num_hidden_layers": 10**9}, r"num_hidden_layers must be at most 16384, got 1000000000"),  # (before any list a layer)
])  # fmt: skip
def test_a_config_field_that_would_load_garbage_is_refused(config, match, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match=match):
        LLM(model=str(_copy(tiny_dirs, tmp_path, config=config)))


def test_a_truncated_safetensors_file_or_a_bad_shard_index_is_named(tiny_dirs, tmp_path, capsys):
    folder = _copy(tiny_dirs, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # a download cut one byte short
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        LLM(model=str(folder))
    assert main(["generate", str(folder), "--prompt", "hi"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    index = folder / "model.safetensors.index.json"
    for body, match in (("{not json", "is not a JSON object"), ('{"metadata": {}}', "has no weight_map"),
                        ('{"weight_map": {"x": "../m/model.safetensors"}}', "names shard files outside its folder")):
        index.write_text(body)
        with pytest.raises(ValueError, match=match):
            LLM(model=str(folder))


def test_a_damaged_tokenizer_is_named(chat_model_dir, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(chat_model_dir, folder)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match=r"tokenizer .* cannot be loaded: KeyError"):
        LLM(model=str(folder))


def test_nan_weights_end_the_request_with_an_error_not_garbage(tiny_dirs, tmp_path, caplog):
    def nan(state):
        return {**state, "model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))}

    llm = LLM(model=str(_copy(tiny_dirs, tmp_path, state=nan)))
    out = llm.generate([[5, 6, 7]], GREEDY)[0]
    assert out.finish_reason == "error" and out.token_ids == []
    assert "logits are NaN" in caplog.text
    assert not llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-damaged")
    write_tiny_gguf("qwen3", folder, types={"attn_q": "Q8_0"})
    return folder / "model.gguf"


def _patched(gguf_file: Path, tmp_path: Path, tensor: str, part: int, value: int) -> str:
    """A copy of the file with one field of a tensor's info changed (part 4: its type, 5: its offset)."""
    copy = tmp_path / "damaged.gguf"
    shutil.copy(gguf_file, copy)
    type_at, offset_at, _ = tensor_info_at(copy, tensor)
    patched(copy, type_at if part == 4 else offset_at, "<I" if part == 4 else "<Q", value)
    return str(copy)


def _offset(gguf_file: Path, tensor: str) -> int:
    return tensor_info_at(gguf_file, tensor)[2]


def test_gguf_tensor_data_out_of_place_is_refused(gguf_file, tmp_path):
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    cases = [(q, 5, _offset(gguf_file, k), "overlaps another tensor's"),
             (q, 5, _offset(gguf_file, q) + 3, "is not aligned to 32 bytes"),
             (q, 4, 0, "overlaps another tensor's"),  # Q8_0 read as F32: 4 bytes a weight, into the next tensor
             (k, 5, 2**64 - 32, "data runs past the file's end")]  # (no wrapping round into the header)
    for tensor, part, value, match in cases:
        with pytest.raises(ValueError, match=match):
            LLM(model=_patched(gguf_file, tmp_path, tensor, part, value))
    data = gguf_file.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) - 1])  # a download cut one byte short
    with pytest.raises(ValueError, match=r"short.gguf is not a readable GGUF file \(truncated or damaged\?\)"):
        LLM(model=str(tmp_path / "short.gguf"))


def test_a_gguf_type_gguf_cannot_dequantize_is_named(gguf_file, tmp_path):
    import gguf

    path = _patched(gguf_file, tmp_path, "blk.0.attn_norm.weight", 4, int(gguf.GGMLQuantizationType.I8))
    with pytest.raises(ValueError, match="tensor blk.0.attn_norm.weight is of GGUF type I8, which cannot be read"):
        LLM(model=path)


def test_the_untouched_files_load(gguf_file, tiny_dirs, tmp_path):
    assert LLM(model=str(gguf_file)).generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"
    assert np.isfinite(LLM(model=str(_copy(tiny_dirs, tmp_path))).engine.model.lm_head.weight.detach().numpy()).all()


@pytest.fixture(scope="module")
def moe_gguf_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-moe-damaged")
    write_tiny_gguf("qwen2-moe", folder)  # (experts stacked; a shared expert; layer 1 a plain MLP)
    return folder / "model.gguf"


SHARED = [f"blk.{i}.ffn_{p}_shexp.weight" for i in (0, 2) for p in ("gate", "up", "down", "gate_inp")]


@pytest.mark.parametrize("change, match", [
    (dict(meta={"{arch}.expert_count": 100000}), r"expert_count is 100000, but blk.0.ffn_gate_exps is \[64, 32, 8\]"),
    (dict(meta={"{arch}.block_count": 10**9}), r"block_count is 1000000000, but its tensors hold the layers 0, 1, 2$"),
    (dict(drop=["blk.2.attn_q.weight", "blk.2.attn_k.weight"]), None),  # (a layer's tensors partly gone: named at load)
    (dict(change={"blk.0.ffn_gate_exps.weight": np.ravel}), r"blk.0.ffn_gate_exps is \[\d+\], not \[in, out, 8\]"),
    (dict(change={"blk.0.ffn_gate_shexp.weight": np.ravel}), r"blk.0.ffn_gate_shexp is \[\d+\], not a matrix"),
    (dict(drop=SHARED, meta={"{arch}.expert_shared_feed_forward_length": 96}),
     r"expert_shared_feed_forward_length is 96, but its shared expert \(blk.0.ffn_gate_shexp\) is missing"),
    (dict(add={f"blk.{i}.exp_probs_b.bias": np.zeros(8, np.float32) for i in range(3)}),
     r"has 3 tensors its qwen2_moe model has no place for, e.g. \['blk.0.exp_probs_b.bias'"),
    (dict(add={"output.bias": np.zeros(49152, np.float32)}), r"no place for, e.g. \['lm_head.bias'\]"),
])  # fmt: skip
def test_a_mixture_gguf_whose_metadata_and_tensors_disagree_is_refused_at_once(moe_gguf_file, tmp_path, change, match):
    """Found by fuzzing: an IndexError (a flat expert tensor), loads that built every expert or layer
    the metadata named before refusing (an expert_count of 10^5: 82 s and 4.6 GB; a block_count of
    10^9: the OOM killer), tensors left out without a word (an expert-choice bias, a head's bias),
    and a Qwen2-MoE served without the shared expert its metadata names."""
    path = rewritten_gguf(moe_gguf_file, tmp_path / "moe.gguf", **change)
    with pytest.raises(ValueError, match=match or r"checkpoint lacks") as e:
        LLM(model=str(path))
    assert str(e.value).startswith("moe.gguf") or "checkpoint" in str(e.value)  # (the file's metadata, or its weights)


def test_a_gguf_metadata_field_at_fault_is_named_with_the_file(gguf_file, tmp_path):
    from cachedattention.model.gguf_reader import FastGGUFReader

    copy = tmp_path / "meta.gguf"
    shutil.copy(gguf_file, copy)
    field = FastGGUFReader(copy).fields["qwen3.attention.key_length"]
    patched(copy, field.end - 4, "<I", 0)  # (a uint32: the pair's last 4 bytes)
    with pytest.raises(ValueError, match=r"^meta.gguf: head_dim must be a positive integer, got 0"):
        LLM(model=str(copy))
