"""Shared test helpers: logits capture from the real engine path, relative error."""

from __future__ import annotations

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
