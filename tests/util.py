"""Shared test helpers: logits capture from the real engine path, relative error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import cachedattention.engine.engine as engine_mod
from cachedattention.model.tokenizer import Tokenizer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def last_logits_after(hf, cache, rest: list[int], start: int) -> torch.Tensor:
    """transformers' logits for the last of `rest`, at positions from `start` on, over a given cache."""
    with torch.no_grad():
        return hf(torch.tensor([rest]), past_key_values=cache,
                  position_ids=torch.arange(start, start + len(rest))[None]).logits[0, -1]  # fmt: skip


def assert_logits_match(llm, hf, prompt: list[int], params, monkeypatch, limit: float = 1e-4) -> None:
    """Every logits row the engine samples from for this prompt equals transformers' at that
    position (a multimodal model's language part: called with input_ids only)."""
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], params)[0]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt + out.token_ids])).logits[0]
    monkeypatch.undo()
    assert len(seen) == len(out.token_ids)
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= limit, f"step {step}"


def capture_logits(monkeypatch) -> list[torch.Tensor]:
    """Record every logits row the engine samples from (in sampling order)."""
    seen: list[torch.Tensor] = []
    real = engine_mod.sample_batch

    def spy(logits, *rest):
        seen.extend(row.clone() for row in logits)
        return real(logits, *rest)

    monkeypatch.setattr(engine_mod, "sample_batch", spy)
    return seen


def generate_capturing(llm, prompt, params, monkeypatch, **kw) -> tuple:
    """One prompt's output and every logits row the engine sampled from for it."""
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], params, **kw)[0]
    monkeypatch.undo()
    return out, seen


def sentencepiece_like(add_bos: bool = False) -> Tokenizer:
    """A SentencePiece-style tokenizer built in memory: a word-start mark for spaces, byte pieces for
    characters outside the vocabulary (\u4e2d is <0xE4> <0xB8> <0xAD>); add_bos: <s> goes before
    an encoded prompt, as Llama's tokenizers put it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "\u2581Hello": 2, "\u2581world": 3, "<0xE4>": 4, "<0xB8>": 5, "<0xAD>": 6, "!": 7}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>"))


def mutate_json(rng, text: bytes) -> bytes | None:
    """One byte of a JSON text changed (to one of JSON's own characters), dropped or doubled; None
    when the result is not UTF-8 (inside strings any byte >= 0x80 passes: nothing to compare)."""
    out = bytearray(text)
    i = rng.randrange(len(out))
    edit = rng.choice(["change", "drop", "double"])
    if edit == "change":
        out[i] = rng.choice(b'{}[]",:0123456789-+.eE tfnrul\\x\n')
    elif edit == "drop":
        del out[i]
    else:
        out.insert(i, out[i])
    try:
        out.decode()
    except UnicodeDecodeError:
        return None
    return bytes(out)


def fail_sampling_for_seed(monkeypatch, seed: int) -> None:
    """Make the engine's sampler fail for any batch holding a request of this seed (a stand-in for a
    bug that strikes one request), and sample as usual otherwise."""
    from cachedattention.engine import engine as engine_module

    real = engine_module.sample_batch

    def failing(logits, params, *args):
        tokens = real(logits, params, *args)  # (its batch mates' random draws made first, as a bug mid-batch would)
        if any(p.seed == seed for p in params):
            raise RuntimeError("a sampler bug for this request")
        return tokens

    monkeypatch.setattr(engine_module, "sample_batch", failing)


def run_to_end(llm, request_ids: list[str]) -> list:
    """Step an LLM's engine until requests already added (engine.add_request) have finished: their
    outputs, in order."""
    done: dict = {}
    while len(done) < len(request_ids):
        for out in llm.engine.step():
            if out.finished and out.request_id in request_ids:
                done[out.request_id] = out
    return [done[r] for r in request_ids]


def quantized_checkpoint(path: Path, plain: dict, packed: dict, values: dict, quantization_config: dict):
    """Write `packed` (a quantized checkpoint's tensors) and its quantization_config over the tiny
    model saved in `path`; return transformers' model over `values` (the float32 values the packed
    weights stand for), loaded from a float32 checkpoint of them beside it (`path`/float32)."""
    import transformers
    from safetensors.torch import save_file

    reference = path / "float32"
    reference.mkdir()
    shutil.copy(path / "config.json", reference / "config.json")
    save_file({**plain, **values}, str(reference / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    save_file(packed, str(path / "model.safetensors"))
    saved = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**saved, "quantization_config": quantization_config}))
    return hf


def assert_stored_turns_equal_recompute(path: Path, monkeypatch) -> None:
    """Three turns of a session served from the store's host tier give recompute's tokens and
    logits, every turn after the first reusing its history."""
    from cachedattention import LLM, CacheConfig
    from tests.store.test_store_equivalence import run_turns

    ref_logits, got_logits = [], []
    no_device = CacheConfig(enable_prefix_cache=False)
    ref = run_turns(LLM(model=str(path), cache=no_device), None, 3, monkeypatch, ref_logits)
    llm = LLM(model=str(path), enable_store=True, cache=no_device)
    got = run_turns(llm, "session", 3, monkeypatch, got_logits)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(got_logits, ref_logits, strict=True))
    assert all(out.metrics.cached_tokens["host"] > 0 for out in got[1:])
    llm.engine.store.check_integrity()


def held_as_blocks(llm, kind: str) -> dict[str, bool]:
    """Whether each decoder layer's linear layer (a router aside) is held only as kernel blocks of
    `kind` (a float32 weight of 16-bit values only is held as BF16 or F16 ones instead)."""
    from cachedattention.model.layers import Linear

    return {n: bool(m.blocks_only) and m.quantized.kind == kind for n, m in llm.engine.model.named_modules()
            if isinstance(m, Linear) and n.startswith("model.layers.") and not n.endswith("mlp.gate")}  # fmt: skip


def assert_blocks_equal_float32_copies(llm, prompt: list[int], params, monkeypatch) -> None:
    """The layers held only as blocks (with no float32 copy) give the same tokens and logits, bit for
    bit, as the same layers over float32 copies of their values."""
    from cachedattention.model.layers import Linear

    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], params)[0]
    monkeypatch.undo()
    for m in llm.engine.model.modules():
        if isinstance(m, Linear) and m.blocks_only:
            assert m.weight.untyped_storage().nbytes() <= 4
            m.weight = torch.nn.Parameter(m.quantized.dequantize(), requires_grad=False)
            m.blocks_only, m.quantized = False, None
    plain = capture_logits(monkeypatch)
    assert llm.generate([prompt], params)[0].token_ids == out.token_ids
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(seen, plain, strict=True))


def assert_quantized_model_matches(path: Path, hf, kind: str, as_blocks: str, prompt: list[int], params,
                                   monkeypatch) -> None:  # fmt: skip
    """The quantized checkpoint in `path` served: its decoder layers held as `kind` blocks in `all`,
    `some` or `none` of them (none without the few-rows kernel), transformers' logits over the same
    values, and the blocks giving what float32 copies of them give, bit for bit."""
    from cachedattention import LLM
    from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel

    if FewRowsLinearKernel.load() is None:  # (no C compiler or AVX-512 here: every weight is widened)
        as_blocks = "none"
    llm = LLM(model=str(path))
    held = held_as_blocks(llm, kind)
    assert {"all": all(held.values()), "some": any(held.values()) and not all(held.values()),
            "none": not any(held.values())}[as_blocks], held  # fmt: skip
    assert_logits_match(llm, hf, prompt, params, monkeypatch)
    assert_blocks_equal_float32_copies(llm, prompt, params, monkeypatch)

