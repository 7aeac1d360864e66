"""JSON mode with a random-weight model (which left alone writes anything) and over HTTP."""

from __future__ import annotations

import json

import httpx

from cachedattention import SamplingParams
from cachedattention.engine.json_mode import START, advance


def test_a_random_model_in_json_mode_writes_only_json_object_prefixes(chat_model_dir):
    from cachedattention import LLM

    llm = LLM(str(chat_model_dir))
    prompt = [{"role": "user", "content": "Anything."}]
    free = llm.chat(prompt, SamplingParams(max_tokens=24, temperature=0))
    assert advance(START, free.text.encode()) is None  # left alone: not JSON
    finished = 0
    for seed in range(6):
        params = SamplingParams(max_tokens=48, temperature=1.0, seed=seed, json_object=True)
        out = llm.chat(prompt, params)
        assert advance(START, out.text.encode()) is not None, out.text  # a prefix of a JSON object
        if out.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(out.text), dict)
    greedy = llm.chat(prompt, SamplingParams(max_tokens=48, temperature=0, json_object=True, logprobs=1))
    assert advance(START, greedy.text.encode()) is not None
    assert greedy.text.startswith("{") and greedy.logprobs[0].rank > 1  # logprobs: the model's own distribution
    llm.close()


def test_response_format_json_object_over_http(server):
    body = {"messages": [{"role": "user", "content": "A JSON object, please."}], "max_tokens": 64, "temperature": 0,
            "response_format": {"type": "json_object"}}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    text = r["choices"][0]["message"]["content"]
    assert advance(START, text.encode()) is not None
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    schema = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}
    bad = httpx.post(f"{server.url}/v1/chat/completions", json=schema, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
