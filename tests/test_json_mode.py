"""JSON mode: the automaton agrees with Python's json on valid and broken objects, and the engine's
answers in JSON mode are JSON objects (or prefixes of one when cut by max_tokens)."""

from __future__ import annotations

import json
import random

import pytest

from cachedattention import LLM, SamplingParams
from cachedattention.engine.json_schema import JSON_OBJECT
from tests.util import mutate_json

BROKEN = ['[1, 2]', '"text"', '{"a" 1}', '{,}', '{"a": tru}', '{"a": 01}', '{"a": "x\ny"}', '{"a": 1,}',
          '{"a": -}', '{"a": 1.}', '{"a": "\\x"}', '{"a": 1} x', '{"a": [1 2]}', '{"a": NaN}', '{a: 1}',
          '{"a": "\\u12G4"}', '{"a": 1e}', "{'a': 1}"]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-(10**6), 10**6)
    if kind == "float":
        return rng.choice([rng.uniform(-1e3, 1e3), rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)])
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\tü中🙂\x01') for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}{rng.choice('xé')}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def _done(text: bytes) -> bool:
    state = JSON_OBJECT.advance(JSON_OBJECT.start, text)
    return state is not None and JSON_OBJECT.is_done(state)


def _python_says_object(text: bytes) -> bool:
    def refuse(name):
        raise ValueError(name)

    try:
        return isinstance(json.loads(text, parse_constant=refuse), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def test_every_prefix_of_a_json_object_is_followed_to_its_end():
    rng = random.Random(0)
    for _ in range(200):
        obj = {f"key{i}": _random_value(rng) for i in range(rng.randint(0, 4))}
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2])).encode()
        state = JSON_OBJECT.start
        for i, b in enumerate(text):
            assert not JSON_OBJECT.is_done(state), text[:i]  # not closed early
            state = JSON_OBJECT.step(state, b)
            assert state is not None, (text, i)
        assert JSON_OBJECT.is_done(state)


@pytest.mark.parametrize("text", BROKEN)
def test_broken_json_is_refused(text):
    assert not _done(text.encode()) and not _python_says_object(text.encode())


def test_the_automaton_agrees_with_python_on_mutated_objects():
    """One byte of a valid object changed, dropped or doubled: complete exactly when json.loads
    reads an object (no NaN or Infinity)."""
    rng = random.Random(1)
    for _ in range(1500):
        text = mutate_json(rng, json.dumps({"a": _random_value(rng), "b": [1, -2.5e3, "x"]}, ensure_ascii=False).encode())
        if text is not None:
            assert _done(text) == _python_says_object(text), text


def test_the_embedded_model_answers_with_a_json_object(embedded_llm):
    question = [{"role": "user", "content": "Give me a JSON object listing three fruits and their prices."}]
    free = embedded_llm.chat(question, SamplingParams(max_tokens=60, temperature=0))[0]
    assert not free.text.lstrip().startswith("{")  # left alone it writes a Markdown code block
    out = embedded_llm.chat(question, SamplingParams(max_tokens=200, temperature=0, json_object=True))[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_json_mode_without_a_tokenizer_is_refused_by_field(tiny_dirs):
    path, _ = tiny_dirs["llama"]  # saved without a tokenizer: no token bytes to steer by
    with pytest.raises(ValueError, match="tokenizer") as e:
        LLM(model=str(path)).generate([[1, 2, 3]], SamplingParams(json_object=True))
    assert e.value.param == "response_format"


def test_end_and_special_tokens_never_close_an_unfinished_object(embedded_llm):
    """A token that would end the answer (EOS, a stop token id) or that decoding skips (any added
    token marked special, also those all_special_ids leaves out) is never allowed mid-object."""
    import torch

    from cachedattention.engine.guided import GuidedConstraint

    tok = embedded_llm.tokenizer
    hidden = [i for i, t in tok.hf.added_tokens_decoder.items() if t.special and i not in tok.hf.all_special_ids]
    assert hidden and all(tok.is_special(i) for i in hidden)  # e.g. <filename>: skipped by decode
    quote = tok.encode('"')[0]
    rule = GuidedConstraint(JSON_OBJECT, tok.token_bytes, tok.is_special, enders=[tok.eos_token_id, quote])
    for t in tok.encode('{"a": "x'):
        rule.accept(t)
    row = torch.zeros(len(tok.hf))
    row[[tok.eos_token_id, quote, hidden[0]]] = 10.0  # the model wants to stop here
    masked = rule.mask(row)
    assert masked[[tok.eos_token_id, quote, hidden[0]]].eq(float("-inf")).all()
    assert masked.isfinite().sum() > 0  # other tokens still continue the string
