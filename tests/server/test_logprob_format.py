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


def _echoed(tok: Tokenizer, prompt: str | list[int], answer: list[int]) -> dict:
    """One non-streamed completion with echo and logprobs=1, formatted as the server does."""
    from cachedattention.outputs import RequestMetrics, RequestOutput
    from cachedattention.server.app import Echo, _Format

    ids = tok.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt
    entries = [None] + [TokenLogprob(t, -1.0, 1) for t in ids[1:]]
    out = RequestOutput("r", ids, answer, tok.decode(answer), True, "length", RequestMetrics(0.0, prompt_tokens=len(ids)),
                        logprobs=[TokenLogprob(t, -1.0, 1) for t in answer], prompt_logprobs=entries)  # fmt: skip
    fmt = _Format("r", "m", False, False, tok, logprobs=1, echoes=[Echo.of(prompt, tok, add_special_tokens=True)])
    return fmt.full([out])["choices"][0]


def test_echo_keeps_a_sentencepiece_answer_s_leading_space_and_offsets_follow():
    tok = sentencepiece_like()
    choice = _echoed(tok, [2, 3], [3, 7])  # "Hello world" + ▁world !
    assert choice["text"] == "Hello world world!" == tok.decode([2, 3, 3, 7])
    assert choice["logprobs"]["text_offset"] == [0, 5, 11, 17]
    assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
    bare = _echoed(tok, [1], [2, 7])  # a prompt that decodes to "": the answer starts the text
    assert bare["text"] == "Hello!" and bare["logprobs"]["text_offset"] == [0, 0, 5]


def test_echo_offsets_count_special_tokens_written_in_the_prompt():
    from cachedattention.model.embedded import embedded_model_dir

    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    prompt = "<|im_start|>user\nHi there"
    choice = _echoed(tok, prompt, tok.encode(" friend"))
    assert choice["text"] == prompt + " friend"
    lp = choice["logprobs"]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][offset:].startswith(token), (token, offset)
    plain = _echoed(tok, tok.encode(prompt), tok.encode(" friend"))  # ids: echoed as decoded, specials skipped
    assert plain["text"] == "user\nHi there friend" and plain["logprobs"]["text_offset"][:2] == [0, 0]


def test_a_bos_the_tokenizer_puts_before_a_prompt_sent_as_text_adds_no_text():
    tok = sentencepiece_like(add_bos=True)
    assert tok.encode("Hello world", add_special_tokens=True) == [1, 2, 3] and tok.added_prefix("Hello world") == 1
    choice = _echoed(tok, "Hello world", [3, 7])
    assert choice["text"] == "Hello world world!"
    assert choice["logprobs"]["tokens"][0] == "<s>" and choice["logprobs"]["text_offset"] == [0, 0, 5, 11, 17]
