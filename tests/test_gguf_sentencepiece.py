"""GGUF files with a SentencePiece vocabulary, as Gemma's and Phi-3's are (`tokenizer.ggml.model`
"llama", no merges, byte pieces, control tokens, a chat template): served end to end, prompts as
transformers renders and tokenizes them, answers as it decodes them, each token's exact bytes, and
a session's next turn reusing its history."""

import pytest
from transformers import AutoTokenizer

from cachedattention import LLM, SamplingParams
from tests.gguf_files import written_once

KINDS = ["gemma3", "phi3-window"]
NORMAL_PIECES = {"gemma3": 7 + 256, "phi3-window": 8 + 256}  # after the special and byte pieces
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello world! Tell me a story about 中 cats."}]  # fmt: skip


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    files = written_once(tmp_path_factory, sentencepiece=True)
    return lambda kind: files(kind)[0] / "model.gguf"


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("kind", KINDS)
def test_a_sentencepiece_gguf_serves_a_session_as_transformers_tokenizes_it(kind, spm_files, tmp_path):
    path = spm_files(kind)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    vocab = len(hf)
    # a random model: keep the answers to whole pieces, so their text re-renders into the next turn
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1,
                            allowed_token_ids=list(range(NORMAL_PIECES[kind], vocab)))
    cached = LLM(model=str(path), enable_store=True, store_dir=str(tmp_path / "store"))
    plain = LLM(model=str(path), enable_store=False)
    tok = cached.engine.tokenizer
    messages, before = list(MESSAGES), None
    for _ in range(3):
        out = cached.chat(messages, params, session_id="s")[0]
        ref = plain.chat(messages, params)[0]
        assert out.prompt_token_ids == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False))
        assert out.prompt_token_ids.count(hf.bos_token_id) == (kind == "gemma3")  # the template's own, once
        assert out.token_ids == ref.token_ids and out.text == ref.text
        assert out.text == hf.decode(out.token_ids, skip_special_tokens=True)
        spelled = b"".join(tok.token_bytes(t) for t in out.token_ids).decode()
        # Phi-3's decoder drops the space its first piece starts with, Gemma's keeps it
        assert out.text == (spelled.removeprefix(" ") if kind.startswith("phi3") else spelled)
        if before is not None:
            # every history token that still matches is reused, but the last answer token (never computed)
            expected = min(_common(before, out.prompt_token_ids), len(before) - 1)
            assert sum(out.metrics.cached_tokens.values()) == expected > len(MESSAGES) * 8
        before = out.prompt_token_ids + out.token_ids
        messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": "What is the capital of France?"}]
    assert cached.stats()["store_hit_tokens"]["host"] > 0  # the pages' partial tails came from the store


@pytest.mark.parametrize("kind", KINDS)
def test_byte_pieces_spell_characters_outside_the_vocabulary(kind, spm_files):
    path = spm_files(kind)
    llm = LLM(model=str(path))
    tok = llm.engine.tokenizer
    ids = tok.encode("about 中 cats")
    assert [tok.pieces([i])[0] for i in ids if tok.pieces([i])[0].startswith("<0x")] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    assert "中".encode() in b"".join(tok.token_bytes(i) for i in ids)
    # a guided answer takes its characters from byte pieces and word pieces alike
    for choice in ("中 cats", "Paris"):
        out = llm.generate(["The capital of France?"], SamplingParams(max_tokens=16, temperature=0, choice=[choice]))[0]
        assert out.text == choice and out.finish_reason == "stop"
