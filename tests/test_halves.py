"""A bfloat16 or float16 checkpoint served in float32 on a CPU from its 16-bit weights (half the
memory and the bytes a decode step reads): the same logits as from float32 copies, bit for bit in
calls the kernel takes either way (up to 32 rows)."""

import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.layers import Embedding, Linear
from tests.tiny_models import make_tiny_model
from tests.util import assert_logits_match, capture_logits

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [(11 * i + 5) % 200 + 20 for i in range(24)]  # within the kernel's float32 rows: no GEMM either way


def saved_as(kind: str, dtype: torch.dtype, tmp_path):
    """A tiny model saved in `dtype`, and transformers' float32 model loaded from it."""
    import transformers

    make_tiny_model(kind, tmp_path / "made").to(dtype).save_pretrained(tmp_path / "checkpoint")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", dtype=torch.float32)
    return tmp_path / "checkpoint", hf.eval()


@pytest.mark.parametrize("kind, dtype, kinds", [("llama", torch.bfloat16, {"BF16"}), ("llama-tied", torch.bfloat16, {"BF16"}),
                                                ("qwen3-moe", torch.bfloat16, {"BF16"}), ("llama", torch.float16, {"F16"})])  # fmt: skip
def test_a_16_bit_checkpoint_is_served_from_its_16_bit_weights(kind, dtype, kinds, tmp_path, monkeypatch):
    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here (a C compiler and AVX-512): the weights stay float32")
    from cachedattention.model import loader

    path, hf = saved_as(kind, dtype, tmp_path)
    late = []  # weights found only after a float32 copy was made: none, they are taken while loading
    monkeypatch.setattr(loader, "hold_as_halves", lambda m, real=loader.hold_as_halves: late.append(real(m)))
    llm = LLM(model=str(path))
    monkeypatch.undo()
    assert late == [0]
    model = llm.engine.model
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (Linear, Embedding))]
    held = [m for n, m in layers if not n.endswith("mlp.gate")]  # (a router stays float32)
    assert all(m.blocks_only for m in held) and {m.quantized.kind for m in held} == kinds
    assert not any(m.blocks_only for n, m in layers if n.endswith("mlp.gate"))
    assert all(m.weight.untyped_storage().nbytes() <= 4 for m in held)  # no float32 copy left
    if kind == "llama-tied":
        assert model.lm_head.quantized is model.model.embed_tokens.quantized
        assert model.lm_head.weight is model.model.embed_tokens.weight  # (still one parameter)
    assert_logits_match(llm, hf, PROMPT, GREEDY, monkeypatch)
    seen = capture_logits(monkeypatch)
    out = llm.generate([PROMPT], GREEDY)[0]
    monkeypatch.undo()
    for m in held:  # the same layers over float32 copies of the same values
        m.weight, m.blocks_only, m.quantized = torch.nn.Parameter(m.quantized.dequantize(), requires_grad=False), False, None
    plain = capture_logits(monkeypatch)
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == out.token_ids
    assert all(torch.equal(a, b) for a, b in zip(seen, plain, strict=True))


@pytest.mark.parametrize("kind", ["glm", "ernie4_5", "phi4-mini", "gemma2", "cohere", "gpt_oss", "glm4_moe", "granitemoeshared"])
def test_16_bit_checkpoints_of_families_the_loader_reorders_or_rescales_match_transformers(kind, tmp_path, monkeypatch):
    """q and k's dimensions reordered (a partial rotary, adjacent pairs), scales folded in (Gemma 2's
    query, longrope's factor), fused experts split, MXFP4 experts: held where still 16-bit values."""
    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here")
    path, hf = saved_as(kind, torch.bfloat16, tmp_path)
    llm = LLM(model=str(path))
    assert sum(getattr(m, "blocks_only", False) for m in llm.engine.model.modules()) > 10
    assert_logits_match(llm, hf, PROMPT + PROMPT, GREEDY, monkeypatch)


def test_a_float32_checkpoint_of_16_bit_values_is_held_so_too(tmp_path):
    """A bfloat16 model saved in float32 (its values still bfloat16's) is held as BF16 after loading."""
    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here")
    make_tiny_model("llama", tmp_path / "made").to(torch.bfloat16).float().save_pretrained(tmp_path / "upcast")
    held = [m for m in LLM(model=str(tmp_path / "upcast")).engine.model.modules() if isinstance(m, (Linear, Embedding))]
    assert all(m.blocks_only and m.quantized.kind == "BF16" for m in held)


def test_a_tied_head_reads_the_embedding_whatever_copy_the_checkpoint_holds(tmp_path):
    """Found by a review: a tied checkpoint's own bfloat16 lm_head.weight (another tensor) was
    served where the float32 embedding should be."""
    from safetensors.torch import load_file, save_file

    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here")
    path, _ = saved_as("llama-tied", torch.bfloat16, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.embed_tokens.weight"] = torch.randn_like(state["model.embed_tokens.weight"].float())  # not 16-bit
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"]).bfloat16()  # another head
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = LLM(model=str(path)).engine.model
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.blocks_only


def test_weights_that_are_not_16_bit_values_stay_float32(tiny_dirs, tmp_path):
    """A float32 checkpoint's weights (random values) keep float32; so does, in a bfloat16 one, a
    weight the loader scales (Granite's multipliers folded into q, o and down)."""
    path, _ = tiny_dirs["llama"]
    held = [m for m in LLM(model=str(path)).engine.model.modules() if isinstance(m, (Linear, Embedding))]
    assert held and not any(m.blocks_only or m.quantized is not None for m in held)
    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here")
    path, _ = saved_as("granite", torch.bfloat16, tmp_path)
    layer = LLM(model=str(path)).engine.model.model.layers[0]
    assert not layer.self_attn.q_proj.blocks_only and layer.self_attn.k_proj.blocks_only


def test_a_cached_turn_of_a_16_bit_checkpoint_equals_recompute(tmp_path):
    if FewRowsLinearKernel.load() is None:
        pytest.skip("no few-rows kernel here")
    path, _ = saved_as("llama", torch.bfloat16, tmp_path)
    cached = LLM(model=str(path), enable_store=True, store_dir=str(tmp_path / "kv"))
    plain = LLM(model=str(path), enable_store=False)
    conv = list(PROMPT)
    for _ in range(3):
        out = cached.generate([conv], GREEDY, session_id="s")[0]
        cached.engine.store.store.flush()
        assert out.token_ids == plain.generate([conv], GREEDY)[0].token_ids
        conv += out.token_ids + [30, 31, 32]
    assert out.metrics.num_cached_tokens > len(PROMPT)
