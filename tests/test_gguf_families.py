"""GGUF files of each family served (Llama with its q/k rows un-permuted and Llama 3.1's rope_freqs
divisors or a linear scaling factor, Qwen2 with its biases, Qwen3 with its head norms, Gemma 2 and 3
with their norms' 1 added in and the windows and query scale llama.cpp assumes, Phi-3 fused) match
transformers on the same weights."""

import pytest
import torch

from cachedattention import LLM, SamplingParams
from tests.gguf_files import rewritten_gguf, write_tiny_gguf, written_once
from tests.util import assert_logits_match, capture_logits, rel_err

pytestmark = pytest.mark.slow  # (writing, quantizing and loading a GGUF file per test: seconds each)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """Each family's file, written once: (its folder, the transformers model it holds)."""
    return written_once(tmp_path_factory)


@pytest.mark.parametrize("kind", ["llama", "llama-linear", "qwen2", "qwen3"])
def test_a_gguf_file_of_each_family_matches_transformers(kind, gguf_files, monkeypatch):
    folder, hf = gguf_files(kind)
    llm = LLM(model=str(folder / "model.gguf"))
    spec = llm.engine.spec
    assert spec.model_type == kind.split("-")[0] and spec.qk_norm == (kind == "qwen3")
    assert spec.qkv_bias == (kind == "qwen2")
    # the tiny Llama is Llama-3 scaled (the file's rope_freqs), the other one linearly (its factor)
    assert (spec.rope_freq_factors is not None) == kind.startswith("llama")
    assert_logits_match(llm, hf, [(11 * i + 5) % 3000 + 20 for i in range(40)], GREEDY, monkeypatch)


@pytest.mark.parametrize("kind, model_type, windowed, query_scalar", [
    ("gemma2", "gemma2", (0, 2), 32), ("gemma2-27b-layers", "gemma2", tuple(range(0, 46, 2)), 16),
    ("gemma3", "gemma3_text", (0, 1, 2, 3, 4), 32),
    ("gemma3-scaled", "gemma3_text", (0, 1, 2, 3, 4), 32),
    ("gemma3-27b-layers", "gemma3_text", tuple(i for i in range(62) if i % 6 != 5), 16),
    ("gemma3-full", "gemma3_text", (), 32),
    ("phi3-window", "phi3", (0, 1, 2), None), ("phi4-mini", "phi3", (), None)])  # fmt: skip
def test_a_gguf_file_of_gemma_or_phi3_matches_transformers(kind, model_type, windowed, query_scalar, gguf_files, monkeypatch):
    """Gemma's norms are read without the 1 llama.cpp adds in; its windowed layers and query scale,
    which the file does not say, are llama.cpp's (Gemma 3: five in six, RoPE base 10000 unscaled, none
    when the file names no window;
    Gemma 2: one in two; the 27B models, told by their layer count, scale queries by hidden / heads);
    Phi-3's fused q/k/v and gate/up are split, its longrope factors read from their tensors."""
    folder, hf = gguf_files(kind)
    llm = LLM(model=str(folder / "model.gguf"))
    spec = llm.engine.spec
    assert spec.model_type == model_type and spec.window_layers == windowed
    if query_scalar is not None:
        assert (spec.attn_scale or spec.head_dim**-0.5) == pytest.approx(query_scalar**-0.5)
    # 46 or 62 random layers add float32 rounding up: 2.4e-4 at 62, as much as the same engine over
    # the checkpoint's folder (the wrong query scale: 1.06)
    limit = 1e-3 if spec.num_layers > 40 else 1e-4
    assert_logits_match(llm, hf, [(11 * i + 5) % 3000 + 20 for i in range(40)], GREEDY, monkeypatch, limit)


@pytest.mark.parametrize("kind, model_type", [("mixtral", "mixtral"), ("qwen2-moe", "qwen2_moe"),
                                              ("qwen3-moe", "qwen3_moe")])
def test_a_gguf_mixture_of_experts_matches_transformers(kind, model_type, gguf_files, monkeypatch):
    """Each layer's experts stacked in one tensor each (llama.cpp's layout), split at load; Mixtral's
    q/k rows un-permuted (its file is a Llama's), Qwen2-MoE's shared expert and its plain-MLP layer."""
    folder, hf = gguf_files(kind)
    llm = LLM(model=str(folder / "model.gguf"))
    moe = llm.engine.spec.moe
    assert llm.engine.spec.model_type == model_type and moe.num_experts == 8 and moe.top_k == 2
    assert moe.normalize_top_k == (kind != "qwen2-moe") and moe.dense_layers == ((1,) if kind == "qwen2-moe" else ())
    assert_logits_match(llm, hf, [(11 * i + 5) % 3000 + 20 for i in range(40)], GREEDY, monkeypatch)


K_QUANTS = {"attn_q": "Q4_K", "attn_k": "Q2_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
            "ffn_gate": "Q3_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K",
            "ffn_gate_exps": "Q2_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "Q6_K"}  # fmt: skip
OLDER_QUANTS = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q4_0", "attn_qkv": "Q5_0",
                "ffn_gate": "Q4_0", "ffn_up": "Q5_1", "ffn_down": "Q5_0",
                "ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q5_1", "ffn_down_exps": "Q5_0"}  # fmt: skip
IQ4_QUANTS = {"attn_q": "IQ4_XS", "attn_k": "IQ4_NL", "attn_v": "IQ4_XS", "attn_output": "IQ4_NL",
              "ffn_gate": "IQ4_XS", "ffn_up": "IQ4_XS", "ffn_down": "IQ4_NL",
              "ffn_gate_exps": "IQ4_XS", "ffn_up_exps": "IQ4_NL", "ffn_down_exps": "IQ4_XS"}  # fmt: skip
LOW_IQ_QUANTS = {"attn_q": "IQ2_XXS", "attn_k": "IQ1_S", "attn_v": "IQ3_S", "attn_output": "IQ2_XS",
                 "ffn_gate": "IQ2_S", "ffn_up": "IQ3_XXS", "ffn_down": "IQ1_M",
                 "ffn_gate_exps": "IQ2_XXS", "ffn_up_exps": "IQ1_M", "ffn_down_exps": "IQ3_S"}  # fmt: skip

TERNARY_QUANTS = {"attn_q": "TQ1_0", "attn_k": "TQ2_0", "attn_v": "TQ1_0", "attn_output": "TQ2_0",
                  "ffn_gate": "TQ1_0", "ffn_up": "TQ2_0", "ffn_down": "TQ1_0",
                  "ffn_gate_exps": "TQ2_0", "ffn_up_exps": "TQ1_0", "ffn_down_exps": "TQ2_0"}  # fmt: skip

HALF_TYPES = {"attn_q": "F16", "attn_k": "BF16", "attn_v": "F16", "attn_output": "BF16", "ffn_gate": "F16",
              "ffn_up": "BF16", "ffn_down": "F16", "ffn_gate_exps": "BF16", "ffn_up_exps": "F16", "ffn_down_exps": "BF16"}  # fmt: skip


@pytest.mark.parametrize("kind, types, blocks", [("llama", K_QUANTS, {"Q4_1", "Q8_M", "Q8_S16", "Q4_MS16"}),
                                                 ("qwen3-moe", K_QUANTS, {"Q4_1", "Q8_M", "Q8_S16", "Q4_MS16"}),
                                                 ("llama", OLDER_QUANTS, {"Q4_1", "Q8_0", "Q8_M"}),
                                                 ("gemma3", OLDER_QUANTS, {"Q4_1", "Q8_0", "Q8_M"}),
                                                 ("phi4-mini", OLDER_QUANTS, {"Q4_1", "Q8_0", "Q8_M"}),
                                                 ("qwen3-moe", OLDER_QUANTS, {"Q4_1", "Q8_0", "Q8_M"}),
                                                 ("llama", IQ4_QUANTS, {"Q8_0"}),
                                                 ("qwen3-moe", IQ4_QUANTS, {"Q8_0"}),
                                                 ("llama", LOW_IQ_QUANTS, {"Q8_0", "Q8_S16"}),
                                                 ("qwen3-moe", LOW_IQ_QUANTS, {"Q8_0", "Q8_S16"}),
                                                 ("llama", TERNARY_QUANTS, {"Q8_0"}),
                                                 ("qwen3-moe", TERNARY_QUANTS, {"Q8_0"}),
                                                 ("llama", HALF_TYPES, {"F16", "BF16"})])
def test_a_quantized_file_decodes_from_its_blocks_as_from_its_float32_weights(kind, types, blocks, tmp_path, monkeypatch):
    """A file of K-quant tensors, as llama.cpp's Q4_K_M, Q3_K_M and Q2_K mix them, of the older Q4_0,
    Q5_0 and Q5_1 (Gemma 3's QAT files are Q4_0), of IQ4_XS and IQ4_NL, of the IQ1-IQ3 types, or of the
    ternary TQ1_0 and TQ2_0 (a mixture's stacked experts too): every linear
    layer gets the few-rows kernel's blocks, re-expressed exactly, and decodes to the same logits,
    bit for bit, as the same engine over the float32 weights alone."""
    from cachedattention.model.layers import Linear

    sizes = {"llama": dict(hidden_size=256, intermediate_size=512),  # (K-quants: rows of 256)
             "qwen3-moe": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)}
    write_tiny_gguf(kind, tmp_path, types, **sizes.get(kind, {}))
    llm = LLM(model=str(tmp_path / "model.gguf"))
    named = [(n, m) for n, m in llm.engine.model.named_modules()
             if isinstance(m, Linear) and ".layers." in n and not n.endswith("mlp.gate")]  # (routers stay float32)
    # Phi-4-mini's q has longrope's factor folded in at load, so no blocks; its k's rows are
    # reordered (a partial rotary), and its blocks with them
    scaled_q = kind == "phi4-mini"
    assert named and all((m.quantized is None) == (scaled_q and n.endswith("q_proj")) for n, m in named)
    layers = [m for _, m in named if m.quantized is not None]
    assert {m.quantized.kind for m in layers} == blocks
    assert llm.engine.runner.decode_kernel is not None
    prompt = [(11 * i + 5) % 3000 + 20 for i in range(24)]  # within the kernel's float32 rows: no GEMM either way
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], GREEDY)[0]
    monkeypatch.undo()
    _on_float32(layers)
    plain = capture_logits(monkeypatch)
    again = llm.generate([prompt], GREEDY)[0]
    assert out.token_ids == again.token_ids
    assert all(torch.equal(a, b) for a, b in zip(seen, plain))


@pytest.mark.parametrize("kind, types, held", [
    ("qwen3-moe", {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "Q6_K"}, 3 * 8 * 3),
    ("llama", {**K_QUANTS, "token_embd": "Q4_K", "output": "Q6_K"}, 3 * 7 + 2),  # its own head
    ("qwen3", {"attn_q": "Q8_0", "token_embd": "Q4_0"}, 3 + 2),  # a tied head: the embedding's blocks
    ("llama", {**IQ4_QUANTS, "token_embd": "IQ4_XS", "output": "IQ4_NL"}, 3 * 7 + 2),
    ("llama", {**TERNARY_QUANTS, "token_embd": "TQ2_0", "output": "TQ1_0"}, 3 * 7 + 2),
    ("phi3-window", {**OLDER_QUANTS, "ffn_up": "Q4_0"}, 3 * 7)])  # fmt: skip
def test_a_gguf_files_layers_live_only_as_blocks(kind, types, held, tmp_path, monkeypatch):
    """On a CPU the decoder layers' quantized linear weights (a mixture's experts, a dense model's
    projections, Phi-3's fused ones split), the embedding and the head keep no float32 copy: the kernel serves their calls, a
    long prompt's too (more rows than it takes for a layer with float32; past MAX_ROWS_BLOCKS_ONLY,
    here lowered to 100, dequantized for the call), as the float32 path would within rounding, and
    a decode step's bit for bit."""
    from cachedattention.kernels import few_rows_linear

    if few_rows_linear.FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here (a C compiler and AVX-512): the layers keep float32")
    monkeypatch.setattr(few_rows_linear, "MAX_ROWS_BLOCKS_ONLY", 100)
    sizes = {"qwen3-moe": dict(hidden_size=256, moe_intermediate_size=256, head_dim=64),
             "llama": dict(hidden_size=256, intermediate_size=512)}.get(kind, {})  # fmt: skip
    write_tiny_gguf(kind, tmp_path, types, **sizes)
    llm = LLM(model=str(tmp_path / "model.gguf"))
    experts = [m for m in llm.engine.model.modules() if getattr(m, "blocks_only", False)]
    assert len(experts) == held and all(m.quantized is not None for m in experts)
    assert llm.engine.model.lm_head.blocks_only == ("token_embd" in types)
    assert all(m.weight.untyped_storage().nbytes() <= 4 for m in experts)  # a placeholder, no float32
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[(11 * i + 5) % 3000 + 20 for i in range(24)], [(7 * i + 3) % 3000 + 20 for i in range(400)]]
    seen = capture_logits(monkeypatch)
    outs = [llm.generate([p], params)[0] for p in prompts]
    monkeypatch.undo()  # (the row limit too: the float32 path takes the kernel up to MAX_ROWS_GGUF)
    _on_float32(experts)
    plain = capture_logits(monkeypatch)
    again = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]
    short = slice(0, params.max_tokens)  # 24 rows: the kernel either way
    assert all(torch.equal(a, b) for a, b in zip(seen[short], plain[short]))
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(seen, plain))  # 400 rows: GEMM on float32


def test_expert_blocks_that_differ_from_gguf_keep_float32(tmp_path, monkeypatch, caplog):
    """Blocks of a mixture's experts are checked against gguf's own values at load (they will have no
    float32 copy to be compared with): blocks that differ leave those experts on float32."""
    from cachedattention.model import gguf_loader
    from cachedattention.model.layers import Linear

    real = gguf_loader.reexpressed_weight

    def wrong(kind, rows, in_features):
        w = real(kind, rows, in_features)
        return type(w)(w.kind, w.quants, w.scales * 2, w.mins, w.shape)

    monkeypatch.setattr(gguf_loader, "reexpressed_weight", wrong)
    write_tiny_gguf("qwen3-moe", tmp_path, {"ffn_up_exps": "Q4_K"}, hidden_size=256, head_dim=64)
    llm = LLM(model=str(tmp_path / "model.gguf"))
    experts = [m for n, m in llm.engine.model.named_modules() if isinstance(m, Linear) and ".experts." in n]
    assert not any(m.blocks_only or m.quantized is not None for m in experts)
    assert "do not match gguf's values" in caplog.text


def _on_float32(layers) -> None:
    """The same linear layers over their dequantized float32 weights (a mixture's experts had none)."""
    from torch import nn

    for m in layers:
        if m.blocks_only:
            m.weight, m.blocks_only = nn.Parameter(m.quantized.dequantize(), requires_grad=False), False
        m.quantized = None


def test_a_phi3_file_with_one_of_its_longrope_factors_is_refused(gguf_files, tmp_path):
    rewritten_gguf(gguf_files("phi4-mini")[0] / "model.gguf", tmp_path / "m.gguf", drop=["rope_factors_short.weight"])
    with pytest.raises(ValueError, match="rope_factors_long without the other"):
        LLM(model=str(tmp_path / "m.gguf"))


def test_rope_freq_divisors_are_part_of_the_fingerprint(gguf_files):
    from cachedattention.model.gguf_loader import gguf_config
    from cachedattention.model.spec import spec_from_hf_config

    config = gguf_config(str(gguf_files("llama")[0] / "model.gguf"))
    scaled = spec_from_hf_config(config)
    plain = spec_from_hf_config({k: v for k, v in config.items() if k != "rope_freq_factors"})
    assert scaled.fingerprint() != plain.fingerprint()  # a store of one never serves the other
    with pytest.raises(ValueError, match="rope_freq_factors must be 8 positive divisors"):
        spec_from_hf_config({**config, "rope_freq_factors": [1.0] * 3})


def test_a_gguf_file_of_another_architecture_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3n")
    w.add_block_count(1)
    _write(w)
    with pytest.raises(ValueError, match="GGUF architecture 'gemma3n' is not supported .*qwen3"):
        LLM(model=str(tmp_path / "m.gguf"))


def _write(w) -> None:
    """Write a GGUFWriter's file: header, metadata, tensors."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_large_weight_held_only_as_blocks_is_never_dequantized_whole(tmp_path, monkeypatch):
    """A call of more rows than the kernel takes, on a weight held only as blocks whose float32 copy
    would be large (a big vocabulary's head, for prompt logprobs), runs through the kernel in slices
    of rows: the same values as the whole call over the float32 weight, and no dequantization."""
    from torch.nn import functional as F

    from cachedattention.kernels import few_rows_linear
    from cachedattention.model import layers

    if few_rows_linear.FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here (a C compiler and AVX-512)")
    write_tiny_gguf("qwen3", tmp_path, {"token_embd": "Q8_0"})
    head = LLM(model=str(tmp_path / "model.gguf")).engine.model.lm_head
    assert head.blocks_only
    monkeypatch.setattr(few_rows_linear, "MAX_ROWS_BLOCKS_ONLY", 100)
    monkeypatch.setattr(layers, "MAX_DEQUANTIZED", 1 << 20)  # the tiny head (49152 x 64) counts as large
    whole = head.quantized.dequantize()
    monkeypatch.setattr(few_rows_linear.FewRowsLinearKernel, "dequantize", lambda *a: pytest.fail("dequantized"))
    x = torch.randn(250, 64, generator=torch.Generator().manual_seed(0))
    assert rel_err(head(x), F.linear(x, whole)) <= 1e-5
    assert rel_err(head(x[None]), F.linear(x, whole)[None]) <= 1e-5  # leading dimensions: rows all the same
    assert head(x[:0]).shape == (0, whole.shape[0])  # a step where no prompt ends asks for no rows
