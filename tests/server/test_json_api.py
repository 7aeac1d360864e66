"""JSON mode and structured outputs (a JSON schema, a choice) with a random-weight model (which left
alone writes anything) and over HTTP, with vLLM's and OpenAI's fields."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from cachedattention import SamplingParams
from cachedattention.engine.json_schema import JSON_OBJECT, schema_automaton

ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer"}},
          "required": ["answer", "score"], "additionalProperties": False}  # fmt: skip


def test_a_random_model_in_json_mode_writes_only_json_object_prefixes(chat_model_dir):
    from cachedattention import LLM

    llm = LLM(str(chat_model_dir))
    prompt = [{"role": "user", "content": "Anything."}]
    free = llm.chat(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert JSON_OBJECT.advance(JSON_OBJECT.start, free.text.encode()) is None  # left alone: not JSON
    finished = 0
    for seed in range(6):
        params = SamplingParams(max_tokens=48, temperature=1.0, seed=seed, json_object=True)
        out = llm.chat(prompt, params)[0]
        assert JSON_OBJECT.advance(JSON_OBJECT.start, out.text.encode()) is not None, out.text  # a prefix of a JSON object
        if out.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(out.text), dict)
    greedy = llm.chat(prompt, SamplingParams(max_tokens=48, temperature=0, json_object=True, logprobs=1))[0]
    assert JSON_OBJECT.advance(JSON_OBJECT.start, greedy.text.encode()) is not None
    assert greedy.text.startswith("{") and greedy.logprobs[0].rank > 1  # logprobs: the model's own distribution
    llm.close()


def test_response_format_json_object_over_http(server):
    body = {"messages": [{"role": "user", "content": "A JSON object, please."}], "max_tokens": 64, "temperature": 0,
            "response_format": {"type": "json_object"}}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    text = r["choices"][0]["message"]["content"]
    assert JSON_OBJECT.advance(JSON_OBJECT.start, text.encode()) is not None
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def _held_to(schema: dict, text: str, finish: str) -> None:
    """The answer is a prefix of a document valid under the schema; a finished one is valid."""
    automaton = schema_automaton(schema)
    assert automaton.advance(automaton.start, text.encode()) is not None, text
    if finish == "stop":
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
def test_response_format_json_schema_and_vllm_guided_json_over_http(server):
    """A close bias makes the random model end its integer (left alone it may write digits for ever)."""
    close = server.app.state.engine_loop.engine.tokenizer.encode("}")[0]
    base = {"max_tokens": 64, "temperature": 0, "logit_bias": {str(close): 20}}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": ANSWER, "strict": True}}
    chat = {**base, "messages": [{"role": "user", "content": "Yes or no?"}], "response_format": fmt}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]
    _held_to(ANSWER, r["message"]["content"], r["finish_reason"])
    assert r["finish_reason"] == "stop"
    for extra in ({"guided_json": ANSWER}, {"guided_json": json.dumps(ANSWER)}, {"structured_outputs": {"json": ANSWER}}):
        r = httpx.post(f"{server.url}/v1/completions", json={**base, "prompt": "Verdict:", **extra}, timeout=60)
        choice = r.json()["choices"][0]
        _held_to(ANSWER, choice["text"], choice["finish_reason"])


@pytest.mark.parametrize("field", [{"guided_choice": ["red", "green", "blue"]},
                                   {"structured_outputs": {"choice": ["red", "green", "blue"]}}])  # fmt: skip
def test_guided_choice_answers_with_one_of_the_strings(server, field):
    body = {"messages": [{"role": "user", "content": "A colour?"}], "max_tokens": 16, "n": 3, "temperature": 1.0,
            "seed": 5, **field}  # fmt: skip
    choices = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["choices"]
    assert {c["finish_reason"] for c in choices} == {"stop"}
    assert all(c["message"]["content"] in ("red", "green", "blue") for c in choices)


@pytest.mark.parametrize("field", [{"guided_regex": r"[0-9]{3}-[a-z]{2}"},
                                   {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}])  # fmt: skip
def test_guided_regex_answers_match_the_pattern_whole(server, field):
    body = {"prompt": "Code:", "max_tokens": 16, "n": 3, "temperature": 1.0, "seed": 3, **field}
    choices = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"]
    assert {c["finish_reason"] for c in choices} == {"stop"}  # nothing may follow a whole match: it ends
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", c["text"]) for c in choices), choices


@pytest.mark.parametrize("field", [{"guided_grammar": 'root ::= ("yes" | "no") " " [0-9]{2}'},
                                   {"structured_outputs": {"grammar": 'root ::= ("yes" | "no") " " [0-9]{2}'}}])  # fmt: skip
def test_guided_grammar_answers_are_derived_by_the_grammar(server, field):
    body = {"prompt": "Answer:", "max_tokens": 16, "n": 3, "temperature": 1.0, "seed": 4, **field}
    choices = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"]
    assert {c["finish_reason"] for c in choices} == {"stop"}
    assert all(re.fullmatch(r"(yes|no) [0-9]{2}", c["text"]) for c in choices), choices


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(a)\\1"}}}},
         "response_format", "schema.pattern: backreferences are not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
        ({"response_format": {"type": "yaml"}}, "response_format", "response_format must be"),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "'uniqueItems' is not supported"),
        ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_regex": "(?=a)b"}, "guided_regex", "lookahead '(?=' is not supported"),
        ({"guided_regex": 5}, "guided_regex", "must be a string"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_regex", "cannot be combined"),
        ({"guided_json": {}, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", "the rule 'x' is used but not defined"),
        ({"guided_grammar": "expr ::= expr \"+\" [0-9] | [0-9]"}, "guided_grammar", "no 'root' rule"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {}}, "structured_outputs", "none are specified"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs", "none are specified"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice", "cannot be combined"),
    ],
)
def test_structured_output_fields_that_cannot_be_held_to_get_400_naming_them(server, extra, param, words):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert words in r.json()["error"]["message"]


def test_an_answer_that_can_only_end_ends_even_with_ignore_eos_and_min_tokens(chat_model_dir):
    """A random model pushed to write "0" as an integer: nothing may follow it but the end, so the
    answer ends there ("stop") whatever ignore_eos and min_tokens say, instead of writing anything."""
    from cachedattention import LLM

    llm = LLM(str(chat_model_dir))
    zero = llm.tokenizer.encode("0")[0]
    params = SamplingParams(max_tokens=12, temperature=0, json_schema={"type": "integer"}, ignore_eos=True,
                            min_tokens=6, logit_bias={zero: 100})  # fmt: skip
    out = llm.generate(["Count:"], params)[0]
    assert out.text == "0" and out.finish_reason == "stop"
    llm.close()


@pytest.mark.parametrize("include, text", [(False, "hello "), (True, "hello wor")])
def test_a_stop_string_in_the_token_that_completes_a_guided_answer_still_cuts_it(server, include, text):
    """The guided choice's last token holds the stop string: as vLLM (the grammar ends the answer
    only with the end token that follows), the stop string cuts the text and is its stop_reason,
    streamed or not."""
    body = {"prompt": "Say:", "max_tokens": 16, "temperature": 0, "guided_choice": ["hello world"], "stop": ["wor"],
            "include_stop_str_in_output": include}  # fmt: skip
    choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text, "stop", "wor")
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert chunks[-1]["choices"][0]["stop_reason"] == "wor"
