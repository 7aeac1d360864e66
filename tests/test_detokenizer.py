"""The output text built token by token equals a whole decode, only grows, and decodes a few tokens per step."""

from __future__ import annotations

import pytest

from cachedattention.engine.detokenizer import IncrementalDetokenizer
from cachedattention.model.tokenizer import Tokenizer
from tests.util import sentencepiece_like

TEXT = "Héllo wörld! 中文字符 and emoji 🙂🚀 — \"quotes\"\n\tnew line   spaces, ünïcödé. " * 8


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    from cachedattention.model.embedded import embedded_model_dir

    return Tokenizer.from_pretrained(str(embedded_model_dir()))


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[IncrementalDetokenizer, list[str], list[int]]:
    """Feed ids one at a time; return the detokenizer, the deltas, and how many ids each decode took."""
    sizes: list[int] = []

    def decode(part):
        sizes.append(len(part))
        return tok.decode(part)

    detok = IncrementalDetokenizer(decode)
    deltas = [detok.update(ids[: i + 1]) for i in range(len(ids))]
    deltas.append(detok.update(ids, final=True))
    return detok, deltas, sizes


def test_byte_level_text_grows_to_the_whole_decode_without_broken_characters(byte_level):
    ids = byte_level.encode(TEXT)
    assert any("\ufffd" in byte_level.decode([t]) for t in ids)  # some tokens hold part of a character
    detok, deltas, sizes = _stream(byte_level, ids)
    assert detok.text == byte_level.decode(ids) == TEXT
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)  # a character cut in two waits for its other part
    assert max(sizes) <= 8  # a few tokens per update, not the whole output (len(ids) is hundreds)
    assert len(ids) > 300


def test_sentencepiece_keeps_word_spaces_and_joins_byte_pieces():
    tok = sentencepiece_like()
    ids = [2, 3, 4, 5, 6, 7, 3]  # Hello world 中 (three byte pieces) ! world
    detok, deltas, _ = _stream(tok, ids)
    assert deltas == ["Hello", " world", "", "", "\u4e2d", "!", " world", ""]
    assert detok.text == tok.decode(ids) == "Hello world\u4e2d! world"


def test_a_skipped_special_token_adds_nothing_and_the_next_word_keeps_its_space():
    tok = sentencepiece_like()
    detok, deltas, _ = _stream(tok, [2, 1, 3])  # Hello <s> world
    assert deltas == ["Hello", "", " world", ""]
    assert detok.text == tok.decode([2, 1, 3])


def test_the_final_update_writes_a_trailing_partial_character_as_a_whole_decode_does():
    tok = sentencepiece_like()
    detok = IncrementalDetokenizer(tok.decode)
    assert detok.update([2]) == "Hello"
    assert detok.update([2, 4]) == ""  # the first of a character's three bytes: wait
    assert detok.update([2, 4], final=True) == "\ufffd"
    assert detok.text == tok.decode([2, 4]) == "Hello\ufffd"


def test_catching_up_many_tokens_at_once_equals_the_whole_decode(byte_level):
    ids = byte_level.encode(TEXT)
    detok = IncrementalDetokenizer(byte_level.decode)
    detok.update(ids[:37])
    detok.update(ids[:250])
    detok.update(ids, final=True)
    assert detok.text == TEXT
    assert IncrementalDetokenizer(byte_level.decode).update(ids, final=True) == TEXT  # one call: a whole decode


def test_a_streamed_answer_with_stop_strings_decodes_a_few_tokens_per_step(embedded_llm, monkeypatch):
    """Engine level: each step's text extends the last; the final text is the whole decode; the
    tokenizer sees a few tokens per step, not the whole answer again (quadratic in its length)."""
    from cachedattention import SamplingParams

    engine = embedded_llm.engine
    decoded: list[int] = []
    real = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids, *a: decoded.append(len(ids)) or real(ids, *a))
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True, stop=("never in this text \x00",))
    engine.add_request("Write a long story about a dragon.", params, request_id="long", stream_text=True)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == "long"]
    final = outs[-1].text
    assert outs[-1].finished and len(outs[-1].token_ids) == 96
    assert all(final.startswith(o.text) for o in outs) and len({o.text for o in outs}) > 48  # grew step by step
    assert final == real(outs[-1].token_ids) and len(final) > 200
    assert max(decoded) <= 8 and sum(decoded) < 96 * 8  # a whole decode each step would sum to ~4,600


def _whole_decode_stop(tok: Tokenizer, ids: list[int], params) -> tuple[int, str, str]:
    """The reference: decode the whole output after each token and look for the stop strings (from
    the min_tokens-th token on, as vLLM)."""
    before = 0
    for k in range(len(ids)):
        text = tok.decode(ids[: k + 1])
        if k + 1 < params.min_tokens:
            before = len(text.rstrip("\ufffd"))  # a character still being written is not before min_tokens
        else:
            found = [i for i in (text.find(s, max(0, before - len(s) + 1)) for s in params.stop) if i >= 0]
            if found:
                return k, "stop", text[: min(found)]
        if k + 1 >= params.max_tokens:
            return k, "length", text
    raise AssertionError("max_tokens is at most len(ids)")


def test_stop_strings_are_found_where_a_whole_decode_finds_them(embedded_llm):
    """Random stop strings cut out of multilingual text (characters split over tokens, stop strings
    just before a split character, min_tokens), forced token by token through the engine."""
    import random

    from cachedattention import SamplingParams

    engine, tok, rng = embedded_llm.engine, embedded_llm.tokenizer, random.Random(0)
    texts = [TEXT[:60], "日本語のテキストです。東京は大きい都市。", "Привет мир, как дела? 🙂", "😀😃 ok 한국어 문장"]
    checked = 0
    for trial in range(300):
        ids = tok.encode(" ".join(rng.choice(texts) for _ in range(3)))
        full = tok.decode(ids)
        a = rng.randrange(len(full))
        stop = full[a : a + rng.randint(1, 3)]
        if "\ufffd" in stop:
            continue
        most = rng.randint(1, len(ids))
        params = SamplingParams(max_tokens=most, stop=(stop,), min_tokens=rng.choice([0, rng.randint(0, most)]),
                                ignore_eos=True)  # fmt: skip
        rid = engine.add_request([1, 2, 3], params, request_id=f"forced-{trial}")
        req = engine.requests[rid]
        for token in ids:
            engine._append_token(req, token)
            if req.finish_reason is not None:
                break
        last = len(req.output_token_ids) - 1
        assert (last, req.finish_reason, req.text) == _whole_decode_stop(tok, ids, params), (stop, params)
        checked += 1
    assert checked > 250


def test_a_run_of_skipped_special_tokens_does_not_grow_the_decoded_window(byte_level):
    ids = byte_level.encode("Hello there") + [byte_level.eos_token_id] * 300 + byte_level.encode(" friend")
    detok, deltas, sizes = _stream(byte_level, ids)
    assert detok.text == byte_level.decode(ids) == "Hello there friend"
    assert max(sizes) <= 4  # the end-of-text tokens add nothing and leave the context
    sp = sentencepiece_like()
    detok, _, sizes = _stream(sp, [2] + [1] * 50 + [3])  # Hello <s>... world: the space survives
    assert detok.text == sp.decode([2] + [1] * 50 + [3]) == "Hello world" and max(sizes) <= 3


def test_a_leading_bare_word_mark_keeps_its_space_and_min_tokens_counts_released_text(embedded_llm):
    """SentencePiece (Llama-2 style, the decoder strips one leading space): "▁" then "▁Sure" decodes
    to " Sure" whole, so the first, invisible alone, stays as context. And a stop string completed by
    the min_tokens-th token counts, though its character began before it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models
    from transformers import PreTrainedTokenizerFast

    from cachedattention import SamplingParams

    vocab = {"<unk>": 0, "<s>": 1, "\u2581": 2, "\u2581Sure": 3, "\u2581thing": 4}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>"))
    for ids in ([2, 3, 4], [2, 2, 3], [1, 2, 3]):
        detok, _, _ = _stream(tok, ids)
        assert detok.text == tok.decode(ids), ids
    engine, byte_level = embedded_llm.engine, embedded_llm.tokenizer
    ids = byte_level.encode("ab日x")
    assert "\ufffd" in byte_level.decode(ids[:2]) and len(ids) == 4  # 日 is split: it ends at the 3rd token
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, min_tokens=3, stop=("日",)), request_id="split")
    req = engine.requests[rid]
    for token in ids[:3]:
        engine._append_token(req, token)
    assert req.finish_reason == "stop" and req.text == "ab"
