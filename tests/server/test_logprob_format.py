"""Token bytes and completions' text offsets for a SentencePiece-style tokenizer (a word-start mark
for spaces, byte pieces for characters outside the vocabulary), built in memory."""

from __future__ import annotations

from cachedattention.model.tokenizer import Tokenizer
from cachedattention.sampling import TokenLogprob
from cachedattention.server.logprobs import LogprobFormatter
from tests.util import sentencepiece_like


def test_sentencepiece_tokens_bytes_and_offsets_into_the_text():
    tok = sentencepiece_like()
    ids = [1, 2, 3, 4, 5, 6, 7]  # <s> Hello world 中 (three byte pieces) !
    text = tok.decode(ids)
    assert text == "Hello world\u4e2d!"  # the decoder drops the first word's space and the special token
    assert [tok.token_bytes(i) for i in ids] == [b"<s>", b" Hello", b" world", b"\xe4", b"\xb8", b"\xad", b"!"]
    out = LogprobFormatter(tok, chat=False).render([TokenLogprob(i, -1.0, 1) for i in ids])
    offsets = out["text_offset"]
    assert offsets == [0, 0, 5, 11, 12, 12, 12]
    assert text[offsets[2]:].startswith(" world") and text[offsets[3]] == "\u4e2d" and text[offsets[6]] == "!"
    assert out["tokens"][3] == "\ufffd"  # part of a character shows U+FFFD; its bytes say which part


def test_byte_level_detection_and_added_tokens():
    from cachedattention.model.embedded import embedded_model_dir

    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    assert tok.token_bytes(tok.encode(" hello")[0]) == b" hello"
    eos = tok.eos_token_id
    assert tok.token_bytes(eos) == tok.hf.convert_ids_to_tokens(eos).encode()  # an added token, as written
    assert sentencepiece_like().token_bytes(2) == b" Hello"  # not read through the byte-level alphabet
