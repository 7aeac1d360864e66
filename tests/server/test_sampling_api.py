"""Logprobs, penalties, logit_bias and min_tokens over HTTP: OpenAI's formats, streamed and not,
and the same numbers as the in-process engine with the same parameters."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from cachedattention.config import CacheConfig
from tests.server.conftest import PAGES

MSGS = [{"role": "user", "content": "Name three colours."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(chat_model_dir):
    from cachedattention import LLM

    llm = LLM(str(chat_model_dir), cache=CacheConfig(num_pages=PAGES, enable_prefix_cache=False))
    yield llm
    llm.close()


def test_chat_logprobs_match_the_engine_and_stream_the_same(server, engine):
    from cachedattention import SamplingParams

    c = client(server.url)
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    want = engine.chat(MSGS, SamplingParams(max_tokens=8, temperature=0, logprobs=3))[0]
    assert len(content) == r.usage.completion_tokens == len(want.token_ids)
    for got, lp in zip(content, want.logprobs):
        assert got.token == engine.tokenizer.token_text(lp.token_id)
        assert got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [engine.tokenizer.token_text(t) for t, _ in lp.top]
        assert got.top_logprobs[0].logprob == pytest.approx(got.logprob, abs=1e-6)  # greedy: the top token
    stream = c.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, stream=True)  # fmt: skip
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # the second request reuses the first's cached prefix: equal up to float rounding
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = c.chat.completions.create(model="default", messages=MSGS, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_lists_and_offsets(server, engine):
    from cachedattention import SamplingParams

    body = {"prompt": "The sky is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    ids = engine.generate("The sky is", SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    assert lp["text_offset"] == [len(engine.tokenizer.decode(ids[:i])) for i in range(n)]  # into the text
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and value <= 0 and top[token] == pytest.approx(value, abs=1e-6)  # greedy: top-1
    sampled = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": "The sky is", "max_tokens": 8, "temperature": 1.5, "seed": 1, "logprobs": 0}).json()
    slp = sampled["choices"][0]["logprobs"]
    assert all(top == {tok: value} for tok, value, top in zip(slp["tokens"], slp["token_logprobs"], slp["top_logprobs"]))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    chunks = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for ch in chunks for t in ch["tokens"]] == lp["tokens"]
    assert [o for ch in chunks for o in ch["text_offset"]] == lp["text_offset"]  # offsets run on across chunks


def test_completion_echo_lists_the_prompt_tokens_then_the_answer(server, engine):
    """As lm-eval-harness asks for log-likelihoods: echo, logprobs=1, max_tokens=1."""
    from cachedattention import SamplingParams

    prompt = "The capital of France is Paris"
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    choice, tok = r["choices"][0], engine.tokenizer
    ids = tok.encode(prompt)
    want = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    assert choice["text"] == prompt + want.text and r["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.token_text(t) for t in ids + want.token_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
    assert lp["token_logprobs"][1:-1] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]], abs=1e-4)
    for token, top, e in zip(lp["tokens"][1:-1], lp["top_logprobs"][1:-1], want.prompt_logprobs[1:]):
        assert token in top and len(top) <= 2 and tok.token_text(e.top[0][0]) in top  # itself and the top 1
    assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))] + [len(prompt)]
    assert choice["text"][lp["text_offset"][-1] :] == want.text
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events]
    assert texts[0] == prompt and "".join(texts) == choice["text"]
    chunks = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for ch in chunks for t in ch["tokens"]] == lp["tokens"]
    assert [o for ch in chunks for o in ch["text_offset"]] == lp["text_offset"]
    plain = httpx.post(f"{server.url}/v1/completions", json={**body, "logprobs": None}, timeout=60).json()
    assert plain["choices"][0]["text"] == choice["text"] and plain["choices"][0]["logprobs"] is None


def test_echo_with_max_tokens_0_gives_the_prompt_alone(server):
    """What older lm-eval-harness sends to score a prompt: its text and tokens' logprobs, no answer."""
    body = {"prompt": "The capital of France is Paris", "temperature": 0, "logprobs": 1, "echo": True}
    one = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60).json()
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
    choice, lp = r["choices"][0], one["choices"][0]["logprobs"]
    assert choice["text"] == body["prompt"] and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {k: v[:-1] for k, v in lp.items()}  # the prompt's tokens, not the answer's
    assert r["usage"]["completion_tokens"] == 0 and r["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "max_tokens": 0, "stream": True},
                      timeout=60) as s:  # fmt: skip
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == body["prompt"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    both = {**body, "max_tokens": 0, "max_completion_tokens": 2}  # the latter wins: an answer of 2 tokens
    assert httpx.post(f"{server.url}/v1/completions", json=both, timeout=60).json()["usage"]["completion_tokens"] == 2
    zero = {**body, "max_completion_tokens": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=zero, timeout=60).json()["choices"][0] == choice
    for bad in ({"max_tokens": 0}, {"max_tokens": 0, "echo": False}):  # an answer of nothing is asked only with echo
        no = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", **bad}, timeout=60)
        assert no.status_code == 400 and no.json()["error"]["param"] == "max_tokens"


def test_prompt_logprobs_as_vllm_returns_them(server, engine):
    from cachedattention import SamplingParams

    want = engine.generate("Hello there", SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    body = {"prompt": "Hello there", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for entry, e in zip(got[1:], want.prompt_logprobs[1:]):
        mine = entry[str(e.token_id)]
        assert mine["logprob"] == pytest.approx(e.logprob, abs=1e-4) and mine["rank"] == e.rank
        assert mine["decoded_token"] == engine.tokenizer.token_text(e.token_id)
        assert {str(t) for t, _ in e.top} <= set(entry) and len(entry) <= 4
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": MSGS, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0}).json()  # fmt: skip
    prompt_ids = engine.tokenizer.encode_chat(MSGS)
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] == len(prompt_ids)
    assert all(list(e) == [str(t)] for e, t in zip(chat["prompt_logprobs"][1:], prompt_ids[1:]))


def test_a_token_holding_part_of_a_character_shows_its_bytes(server, engine):
    """' \U0001F600' is two tokens in this vocabulary; forcing the first shows its exact UTF-8 bytes."""
    first = engine.tokenizer.encode(" \U0001F600")[0]
    data = engine.tokenizer.token_bytes(first)
    assert data == " \U0001F600".encode()[: len(data)] and 1 < len(data) < 5
    c = client(server.url)
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=2, temperature=0, logprobs=True,
                                  logit_bias={str(first): 100})  # fmt: skip
    assert [t.bytes for t in r.choices[0].logprobs.content] == [list(data)] * 2
    assert r.choices[0].logprobs.content[0].token == data.decode(errors="replace")
    comp = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": "Hi", "max_tokens": 2, "temperature": 0, "logprobs": 0, "logit_bias": {str(first): 100}}).json()
    assert comp["choices"][0]["logprobs"]["text_offset"] == [0, len(engine.tokenizer.decode([first]))]


def test_penalties_and_bias_reach_the_sampler(server, engine):
    from cachedattention import SamplingParams

    c = client(server.url)
    blue = engine.tokenizer.encode(" blue")[0]
    bias = {str(blue): 10}  # " blue" wins every step unless a penalty takes it back
    forced = c.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0, logit_bias=bias)
    assert forced.choices[0].message.content == " blue" * 6
    for fields in ({"repetition_penalty": 10.0}, {"presence_penalty": 2.0, "frequency_penalty": 2.0}):
        r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0, logit_bias=bias,
                                      extra_body=fields)  # fmt: skip
        want = engine.chat(MSGS, SamplingParams(max_tokens=6, temperature=0, logit_bias={blue: 10}, **fields))[0]
        assert r.choices[0].message.content == want.text != forced.choices[0].message.content, fields
    eos = engine.tokenizer.eos_token_id
    forced = c.completions.create(model="default", prompt="Hello", max_tokens=8, temperature=0,
                                  logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})  # fmt: skip
    assert forced.usage.completion_tokens == 4 and forced.choices[0].finish_reason == "stop"  # EOS as 4th token


def test_n_choices_streamed_and_not(server, engine):
    from cachedattention import SamplingParams

    c = client(server.url)
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=1.0, seed=5, n=3,
                                  logprobs=True)  # fmt: skip
    texts = [ch.message.content for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len(set(texts)) == 3  # seeds 5, 6, 7
    assert texts[1] == engine.chat(MSGS, SamplingParams(max_tokens=8, temperature=1.0, seed=6))[0].text
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)  # every choice's tokens
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode_chat(MSGS))  # the prompt counted once
    stream = c.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=1.0, seed=5, n=3,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    joined = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
              for i in range(3)]  # fmt: skip
    assert joined == texts
    finished = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    greedy = c.completions.create(model="default", prompt="The sky is", max_tokens=5, temperature=0, n=2, logprobs=1)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.choices[0].logprobs.tokens == greedy.choices[1].logprobs.tokens
    assert greedy.choices[1].logprobs.text_offset[0] == 0  # each choice's offsets start at its own text


def test_a_batch_of_prompts_answers_each_as_alone(server, engine):
    """OpenAI's list of prompts (lm-eval-harness batches its log-likelihood requests so): each
    prompt's n choices in turn, each as that prompt sent alone, echoes and logprobs included, the
    usage of all of them; streamed, the same choices by index."""
    from cachedattention import SamplingParams

    prompts = ["The capital of France is Paris", [5, 9, 13, 17], "Red, green and"]
    body = {"prompt": prompts, "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True, "n": 2}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    alone = [httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": p, "n": 1}, timeout=60).json()
             for p in prompts]  # fmt: skip
    for k, choice in enumerate(r["choices"]):
        want = alone[k // 2]["choices"][0]
        assert choice["text"] == want["text"] and choice["logprobs"] == want["logprobs"], k
    assert r["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)  # each prompt once
    assert r["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)
    ids = engine.tokenizer.encode(prompts[0])
    first = engine.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0))[0]
    assert r["choices"][0]["text"] == prompts[0] + first.text and alone[0]["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=60) as s:  # fmt: skip
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["index"] == k)
             for k in range(6)]  # fmt: skip
    assert texts == [c["text"] for c in r["choices"]] and events[-1]["usage"] == r["usage"]
    too_long = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["Hello", [5] * 1020], "max_tokens": 10},
                          timeout=60)  # fmt: skip
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt[1]"  # which prompt
    c = client(server.url)  # the OpenAI client's own batch
    sdk = c.completions.create(model="default", prompt=["The sky is", "Grass is"], max_tokens=4, temperature=0)
    assert [ch.text for ch in sdk.choices] == [
        c.completions.create(model="default", prompt=p, max_tokens=4, temperature=0).choices[0].text
        for p in ("The sky is", "Grass is")]  # fmt: skip


BAD = [
    ("batch of prompts continuing a session", "/v1/completions", {"prompt": ["a", "b"], "session_id": "s"}, "prompt"),
    ("an empty prompt in a batch", "/v1/completions", {"prompt": ["a", ""]}, "prompt[1]"),
    ("a batch too long", "/v1/completions", {"prompt": ["a"] * 257}, "prompt"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": MSGS, "top_logprobs": 3}, "top_logprobs"),
    ("too many top_logprobs", "/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("completion logprobs a bool", "/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("presence_penalty out of range", "/v1/chat/completions", {"messages": MSGS, "presence_penalty": 3}, "presence_penalty"),
    ("repetition_penalty zero", "/v1/chat/completions", {"messages": MSGS, "repetition_penalty": 0}, "repetition_penalty"),
    ("logit_bias key not an id", "/v1/chat/completions", {"messages": MSGS, "logit_bias": {"a": 1}}, "logit_bias"),
    ("logit_bias value past float32", "/v1/chat/completions", {"messages": MSGS, "logit_bias": {"5": 1e39}},
     "logit_bias"),
    ("logit_bias out of vocabulary", "/v1/chat/completions", {"messages": MSGS, "logit_bias": {"999999": 1}},
     "logit_bias"),
    ("prompt ids out of vocabulary", "/v1/completions", {"prompt": [1, 999999]}, "prompt"),
    ("a message's bad role", "/v1/chat/completions",
     {"messages": [*MSGS, {"role": "wizard", "content": "hi"}]}, "messages[1].role"),
    ("a message's content not a string", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("presence_penalty past a float", "/v1/chat/completions", {"messages": MSGS, "presence_penalty": 10**400},
     "presence_penalty"),
    ("logit_bias value past a float", "/v1/chat/completions", {"messages": MSGS, "logit_bias": {"5": 10**400}},
     "logit_bias"),
    ("logit_bias key of 5,000 digits", "/v1/chat/completions", {"messages": MSGS, "logit_bias": {"9" * 5000: 1}},
     "logit_bias"),
    ("min_tokens past max_tokens", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "min_tokens": 5},
     "min_tokens"),
    ("prompt_logprobs streamed", "/v1/completions", {"prompt": "a", "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
    ("too many prompt_logprobs", "/v1/chat/completions", {"messages": MSGS, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("chat echo not a boolean", "/v1/chat/completions", {"messages": MSGS, "echo": 1}, "echo"),  # (true: served)
    ("min_p past 1", "/v1/chat/completions", {"messages": MSGS, "min_p": 1.5}, "min_p"),
    ("allowed_token_ids not ids", "/v1/chat/completions", {"messages": MSGS, "allowed_token_ids": ["a"]},
     "allowed_token_ids"),
    ("allowed_token_ids out of vocabulary", "/v1/completions", {"prompt": "a", "allowed_token_ids": [999999]},
     "allowed_token_ids"),
    ("stop_token_ids out of vocabulary", "/v1/completions", {"prompt": "a", "stop_token_ids": [999999]},
     "stop_token_ids"),
    ("truncate_prompt_tokens 0", "/v1/completions", {"prompt": "a", "truncate_prompt_tokens": 0},
     "truncate_prompt_tokens"),
    ("echo of a truncated prompt", "/v1/completions", {"prompt": "a b", "echo": True, "truncate_prompt_tokens": 1},
     "truncate_prompt_tokens"),
    ("truncate_prompt_tokens past the window", "/v1/completions", {"prompt": "a", "truncate_prompt_tokens": 10**6},
     "truncate_prompt_tokens"),
    ("max_tokens with a fraction", "/v1/completions", {"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ("seed past 64 bits, as a float", "/v1/completions", {"prompt": "a", "seed": 1e300}, "seed"),
]


def test_integer_fields_take_floats_without_a_fraction(server):
    """As vLLM's request models (pydantic) read them: 3.0 is 3 (clients that write every number as
    a float); the answer is the one the integers give."""
    ints = {"prompt": "Hello", "max_tokens": 3, "n": 2, "seed": 5, "logprobs": 2, "prompt_logprobs": 1,
            "temperature": 1.0}  # fmt: skip
    floats = {k: float(v) if k != "prompt" else v for k, v in ints.items()}
    got = [httpx.post(f"{server.url}/v1/completions", json=body, timeout=60) for body in (ints, floats)]
    assert [r.status_code for r in got] == [200, 200], got[1].text
    texts = [[c["text"] for c in r.json()["choices"]] for r in got]
    assert texts[0] == texts[1] and len(texts[0]) == 2
    tops = [[len(top) for top in r.json()["choices"][0]["logprobs"]["top_logprobs"]] for r in got]
    assert tops[0] == tops[1] and min(tops[0]) >= 2  # (the chosen token too where it is not among them)
    chat = {"messages": MSGS, "max_tokens": 2.0, "logprobs": True, "top_logprobs": 1.0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 1


@pytest.mark.parametrize("name,path,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_fields_get_400_naming_the_field(server, name, path, body, param):
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param  # also where only the engine can tell (the vocabulary's size)


def test_n_choices_save_the_prompt_once(store_server):
    """Only the first choice saves its KV: the others would store the same prompt again."""
    store = store_server.app.state.engine_loop.engine.store.store
    before = len(store.records)
    r = httpx.post(f"{store_server.url}/v1/completions", timeout=60, json={
        "prompt": "A prompt no other test sends, for three choices.", "max_tokens": 4, "temperature": 1.0, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert len(store.records) == before + 1
    store.check_integrity()


def test_vllm_sampling_extras_over_http(server, engine, caplog):
    """min_p, allowed_token_ids, stop_token_ids, include_stop_str_in_output, truncate_prompt_tokens;
    a field the server does not use is logged, as vLLM does, and the request served."""
    from cachedattention import SamplingParams

    prompt = "The days of the week are Monday, Tuesday,"
    free = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop = free.text[2:5]
    base = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with caplog.at_level("WARNING", logger="cachedattention.server.protocol"):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={**base, "stop": stop, "include_stop_str_in_output": True, "min_p": 0.1, "frobnicate": 1})
    assert r.json()["choices"][0]["text"].endswith(stop) and free.text.startswith(r.json()["choices"][0]["text"])
    assert "frobnicate" in caplog.text
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**base, "stop": stop, "include_stop_str_in_output": True, "stream": True}) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == r.json()["choices"][0]["text"]
    allowed = engine.tokenizer.encode(" Friday Saturday")
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={**base, "allowed_token_ids": allowed, "logprobs": 0}).json()  # fmt: skip
    assert set(r["choices"][0]["logprobs"]["tokens"]) <= {engine.tokenizer.token_text(t) for t in allowed}
    second = free.token_ids[1]
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={**base, "stop_token_ids": [second]}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 2
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={**base, "truncate_prompt_tokens": 3}).json()
    assert r["usage"]["prompt_tokens"] == 3


def test_skip_special_tokens_false_keeps_them_in_the_text(server, engine):
    """As vLLM: special tokens are left out of the text unless skip_special_tokens is false."""
    end = engine.tokenizer.eos_token_id
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {str(end): 100}}
    kept = httpx.post(f"{server.url}/v1/completions", json={**body, "skip_special_tokens": False}, timeout=60).json()
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert kept["choices"][0]["text"] == engine.tokenizer.token_text(end) * 3 and plain["choices"][0]["text"] == ""
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**body, "skip_special_tokens": False, "stream": True}) as s:  # fmt: skip
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == kept["choices"][0]["text"]
