"""The OpenAI-compatible server, end to end over real sockets with the official openai client."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachedattention.server.auth import api_keys_from
from tests.server.conftest import (
    engine_config,
    launch_cli_server,
    needs_store,
    start_server,
    store_available,
)
from tests.util import fail_sampling_for_seed

MAX_TOKENS = 16
QUESTIONS = ["Tell me about cats.", "And dogs?", "Which one is better for a flat?"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def converse(url: str, session_id: str | None, questions: list[str], header: bool = False) -> list[tuple[str, object]]:
    """Greedy turns of one conversation; returns (text, usage) per turn."""
    c = client(url)
    messages: list[dict[str, str]] = []
    turns = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        ident = (
            {"extra_headers": {"X-Session-ID": session_id}} if header else {"extra_body": {"session_id": session_id}}
        )
        r = c.chat.completions.create(model="default", messages=messages, max_tokens=MAX_TOKENS, temperature=0, **ident)
        text = r.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        turns.append((text, r.usage))
    return turns


def reference_conversation(reference, questions: list[str]) -> list[str]:
    messages, texts = [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        texts.append(reference(messages, MAX_TOKENS))
        messages.append({"role": "assistant", "content": texts[-1]})
    return texts


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_idle(url: str, timeout_s: float = 15.0) -> dict:
    """Poll /health until nothing runs or waits and every device page is free (or evictable) again."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = httpx.get(f"{url}/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["pages_free"] == h["pages_total"]:
            return h
        assert time.monotonic() < deadline, f"the server did not go idle: {h}"
        time.sleep(0.05)


# -- basics -------------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == [server.app.state.model_name]
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["pages_total"] > 0 and "pages_free" in h


def test_health_answers_head_probes(server):
    assert httpx.head(f"{server.url}/health").status_code == 200  # a load balancer's probe
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert list(paths["/health"]) == ["get"]  # HEAD stays out of the schema: no duplicate operation id


def test_completions_with_text_and_token_ids(server, chat_model_dir):
    c = client(server.url)
    a = c.completions.create(model="default", prompt="The sky is", max_tokens=8, temperature=0)
    assert a.choices[0].finish_reason in ("length", "stop") and a.usage.completion_tokens >= 1
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(chat_model_dir)).encode("The sky is", add_special_tokens=False)
    b = c.completions.create(model=server.app.state.model_name, prompt=ids, max_tokens=8, temperature=0)
    assert b.choices[0].text == a.choices[0].text
    assert b.usage.prompt_tokens == len(ids)


# -- multi-turn reuse -----------------------------------------------------------------------------------
def test_three_turns_reuse_device_cache_and_match_recompute(server, reference):
    turns = converse(server.url, "conv-device", QUESTIONS)
    assert [t for t, _ in turns] == reference_conversation(reference, QUESTIONS)
    for _, usage in turns[1:]:
        assert usage.prompt_tokens_details.cached_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@needs_store
def test_three_turns_with_store_match_no_store_server(store_server, server):
    with_store = converse(store_server.url, "conv-store", QUESTIONS, header=True)
    without = converse(server.url, "conv-store-ref", QUESTIONS)
    assert [t for t, _ in with_store] == [t for t, _ in without]
    for _, usage in with_store[1:]:
        assert usage.prompt_tokens_details.cached_tokens > 0
    host_bytes = ("cachedattention_store_bytes", (("tier", "host"),))
    deadline = time.monotonic() + 10
    while (samples := metric_samples(store_server.url)).get(host_bytes, 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # saves run in the background
    assert samples[host_bytes] > 0  # the turns were saved to host DRAM
    assert ("cachedattention_evictions", (("stat", "host_evictions"), ("tier", "host"))) in samples


@needs_store
def test_usage_says_how_much_history_a_session_dropped(chat_model_dir, tmp_path):
    """A session outgrowing a 160-token window drops old history, never its system prompt; its usage
    says how many tokens."""
    config = replace(engine_config(chat_model_dir, store=True, store_dir=str(tmp_path)), max_model_len=160)
    srv = start_server(config)
    system = {"role": "system", "content": "You answer in one short sentence."}
    try:
        c, messages, dropped = client(srv.url), [system], []
        for i in range(4):
            messages.append({"role": "user", "content": f"Question {i}: " + "tell me more about the weather " * 5})
            r = c.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"session_id": "overflow"})
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
            details = r.usage.prompt_tokens_details
            dropped.append(details.truncated_tokens)
            assert r.usage.prompt_tokens + r.usage.completion_tokens <= 160
            if details.truncated_tokens:  # the retained history came from the store, at its new positions
                by_tier = details.cached_tokens_by_tier
                assert by_tier["host"] + by_tier["disk"] > 0, by_tier
        assert dropped[0] == 0 and max(dropped) > 0, dropped  # the first turn fits; a later one overflowed
        engine = srv.app.state.engine_loop.engine
        turns = engine.store.store.records["overflow"].logical
        # a message longer than the window is refused (as vLLM refuses such a prompt), not served cut
        too_long = [*messages, {"role": "user", "content": "tell me more about the weather " * 40}]
        with pytest.raises(openai.BadRequestError, match="keeping the system prompt and the newest turn"):
            c.chat.completions.create(model="default", messages=too_long, max_tokens=8,
                                      extra_body={"session_id": "overflow"})  # fmt: skip
        assert engine.store.store.records["overflow"].logical == turns  # the session lost nothing
        kept = engine.store.store.records["overflow"].head
        first = messages[:2]
        assert kept == engine.tokenizer.head_length(first, engine.tokenizer.encode_chat(first)) > 5
    finally:
        srv.stop()


# -- streaming ------------------------------------------------------------------------------------------
def test_stream_joins_to_non_stream_text(server):
    c = client(server.url)
    msgs = [{"role": "user", "content": "Stream me something."}]
    full = c.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="default",
            messages=msgs,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    last_choice = [ch for ch in chunks if ch.choices][-1]
    assert last_choice.choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_format(server):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert {e["object"] for e in events} == {"text_completion"}
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    full = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=30).json()
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]


def test_stop_string_streams_and_cuts_the_same(server):
    c = client(server.url)
    msgs = [{"role": "user", "content": "Say something with a stop in it."}]
    free = c.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a string the greedy answer is known to contain
    assert stop.strip()
    cut = c.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    stream = c.chat.completions.create(
        model="default", messages=msgs, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == cut.choices[0].message.content


# -- concurrency and disconnects ------------------------------------------------------------------------
def test_eight_concurrent_sessions_are_unmixed(server, reference):
    # (batches form as requests arrive, and a batch's sums differ from one request's in the last bits:
    # topics whose greedy answers have no near-tie, the top two logprobs at least 2e-3 apart at every
    # step; "owls" and "violins" had 2.4e-4 and 8e-4)
    topics = ["apples", "rivers", "robots", "castles", "deserts", "comets", "bridges", "oceans"]
    convs = [[f"Tell me about {t}.", f"Why do people like {t}?"] for t in topics]
    expected = [reference_conversation(reference, qs) for qs in convs]
    assert len({tuple(e) for e in expected}) == len(convs)  # distinct answers, so a mix-up would show
    barrier = threading.Barrier(len(convs))

    def run(i: int) -> list[str]:
        barrier.wait()
        return [t for t, _ in converse(server.url, f"par-{i}", convs[i], header=i % 2 == 0)]

    with ThreadPoolExecutor(len(convs)) as pool:
        got = list(pool.map(run, range(len(convs))))
    assert got == expected


def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    wait_idle(server.url)
    before = metric_samples(server.url).get(
        ("cachedattention_requests_finished_total", (("finish_reason", "abort"),)), 0
    )
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 2:
                    break
    # the client closed its connection: the request must be aborted and its pages given back
    h = wait_idle(server.url)
    assert h["in_flight"] == 0
    after = metric_samples(server.url)[("cachedattention_requests_finished_total", (("finish_reason", "abort"),))]
    assert after == before + 1


# -- errors ---------------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_MSGS = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    ("malformed json", CHAT, b'{"messages": [', 400),
    ("body not an object", CHAT, [1, 2], 400),
    ("absurdly nested json", CHAT, b"[" * 30000 + b"]" * 30000, 400),
    ("missing messages", CHAT, {"model": "default"}, 400),
    ("empty messages", CHAT, {"messages": []}, 400),
    ("messages not a list", CHAT, {"messages": "hi"}, 400),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("content not a string", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": OK_MSGS}, 404),
    ("max_tokens zero", CHAT, {"messages": OK_MSGS, "max_tokens": 0}, 400),
    ("max_tokens negative", CHAT, {"messages": OK_MSGS, "max_tokens": -3}, 400),
    ("max_tokens a string", CHAT, {"messages": OK_MSGS, "max_tokens": "10"}, 400),
    ("max_completion_tokens zero", CHAT, {"messages": OK_MSGS, "max_completion_tokens": 0}, 400),
    ("temperature a string", CHAT, {"messages": OK_MSGS, "temperature": "hot"}, 400),
    ("temperature negative", CHAT, {"messages": OK_MSGS, "temperature": -1}, 400),
    ("top_p zero", CHAT, {"messages": OK_MSGS, "top_p": 0}, 400),
    ("n too many", CHAT, {"messages": OK_MSGS, "n": 17}, 400),
    ("n two continuing a session", CHAT, {"messages": OK_MSGS, "n": 2, "session_id": "s"}, 400),
    ("stop a number", CHAT, {"messages": OK_MSGS, "stop": 5}, 400),
    ("stream not a bool", CHAT, {"messages": OK_MSGS, "stream": "yes"}, 400),
    ("stream_options without stream", CHAT, {"messages": OK_MSGS, "stream_options": {"include_usage": True}}, 400),
    ("session_id a number", CHAT, {"messages": OK_MSGS, "session_id": 5}, 400),
    ("session_id with a newline", CHAT, {"messages": OK_MSGS, "session_id": "a\nb"}, 400),  # (no DELETE could name it)
    ("prompt past the window", CHAT, {"messages": [{"role": "user", "content": "word " * 1500}]}, 400),
    (
        "streamed prompt past the window",
        CHAT,
        {"messages": [{"role": "user", "content": "a " * 1500}], "stream": True},
        400,
    ),
    ("completion without prompt", COMP, {"max_tokens": 4}, 400),
    ("completion empty prompt", COMP, {"prompt": ""}, 400),
    ("completion token id out of vocab", COMP, {"prompt": [1, 999999]}, 400),
    ("completion batched prompts, one of them malformed", COMP, {"prompt": ["a", 5]}, 400),
    ("completion prompt past the window", COMP, {"prompt": list(range(5, 1500))}, 400),
    ("prompt plus max_tokens past the window", COMP, {"prompt": list(range(5, 1020)), "max_tokens": 20}, 400),
    (
        "streamed prompt plus max_tokens past the window",
        COMP,
        {"prompt": list(range(5, 1020)), "max_tokens": 20, "stream": True},
        400,
    ),
    ("lone surrogate in content", CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400),
    ("lone surrogate in prompt", COMP, {"prompt": "a\ud800b"}, 400),
    ("image content part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("a tool without a name", CHAT, {"messages": OK_MSGS, "tools": [{"type": "function"}]}, 400),
    ("oversized body", CHAT, {"messages": [{"role": "user", "content": "x" * (100 << 10)}]}, 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_openai_error(server, name, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
    assert "code" in err
    ok = httpx.post(f"{server.url}{CHAT}", json={"messages": OK_MSGS, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200  # the server keeps serving


def test_a_long_prompt_fits_by_its_session_or_without_an_explicit_max_tokens(server):
    """As vLLM: an explicit max_tokens past the window is refused (above). Without one (a
    completion's 16 tokens), generation stops at the window; with a session, old history is
    dropped instead."""
    prompt = list(range(5, 1020))  # 1,015 of the window's 1,024 tokens
    r = httpx.post(f"{server.url}{COMP}", json={"prompt": prompt, "max_tokens": 20}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "1015" in r.json()["error"]["message"] and "max_tokens" in r.json()["error"]["message"]
    open_ended = httpx.post(f"{server.url}{COMP}", json={"prompt": prompt, "ignore_eos": True}, timeout=60)
    assert open_ended.status_code == 200 and open_ended.json()["choices"][0]["finish_reason"] == "length"
    session = httpx.post(f"{server.url}{COMP}", json={"prompt": prompt, "max_tokens": 20, "session_id": "roomy"},
                         timeout=60)
    assert session.status_code == 200, session.text
    assert wait_idle(server.url)["in_flight"] == 0  # the refused request was withdrawn, not left running


def test_odd_but_valid_requests(server):
    c = client(server.url)
    joined = [{"role": "user", "content": "h\ni"}]  # content parts, one a line (as vLLM joins them)
    greedy = c.chat.completions.create(model="default", messages=joined, max_tokens=6, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    tiny_t = c.chat.completions.create(
        model="default", messages=parts, max_tokens=6, temperature=1e-40, extra_body={"top_k": -1}
    )
    assert tiny_t.choices[0].message.content == greedy.choices[0].message.content
    seeded = [
        c.chat.completions.create(model="default", messages=OK_MSGS, max_tokens=6, temperature=0.9, seed=7)
        for _ in range(2)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content


def _raw_post(port: int, declared: int, parts: list[bytes], pause_s: float = 0.0) -> tuple[str, float]:
    """POST /v1/completions declaring `declared` body bytes, sending `parts` pause_s apart; the reply
    and how long after the last part it came."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % declared)  # fmt: skip
        for part in parts:
            time.sleep(pause_s)
            conn.sendall(part)
        start = time.monotonic()
        reply = conn.recv(65536)
        waited = time.monotonic() - start
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        while len(body) < length:  # the body may come in a later packet
            body += conn.recv(65536)
        return (head + b"\r\n\r\n" + body).decode(), waited


def test_a_stalled_body_gets_408_and_a_slow_one_is_served(chat_model_dir):
    """No part of the body for body_timeout_s: 408 (413 when it is also too big); a body sent in
    parts, more slowly than the timeout in all but never pausing that long, is served."""
    s = start_server(engine_config(chat_model_dir, store=False), body_timeout_s=1.0, max_body_bytes=1000)
    try:
        reply, waited = _raw_post(s.port, 100, [b'{"prompt":'])
        assert reply.startswith("HTTP/1.1 408") and '"request_timeout"' in reply and 0.8 < waited < 10, reply
        reply, waited = _raw_post(s.port, 5000, [b"{}"])
        assert reply.startswith("HTTP/1.1 413") and waited < 5, reply
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        parts = [body[i : i + 8] for i in range(0, len(body), 8)]  # 5 parts, 0.3 s apart: 1.5 s in all
        reply, _ = _raw_post(s.port, len(body), parts, pause_s=0.3)  # (0.7 s to spare for each part)
        assert reply.startswith("HTTP/1.1 200"), reply
    finally:
        s.stop()


def test_api_keys_guard_the_v1_routes_and_leave_the_probes_open(chat_model_dir):
    """vLLM's --api-key: a /v1 request without one of the keys gets OpenAI's 401 (before its body is
    read); each key works; /health, /metrics, /version and /tokenize answer without one. CORS: an
    allowed origin's preflight is answered without a key, another origin's is not, and a 401 carries
    the allow-origin header (the page can read why)."""
    s = start_server(engine_config(chat_model_dir, store=False), api_keys=("key-one", "key-two"),
                     allowed_origins=("https://chat.example",))  # fmt: skip
    try:
        preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        r = httpx.options(f"{s.url}{CHAT}", headers=preflight)  # a browser's preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example"
        r = httpx.options(f"{s.url}{CHAT}", headers={**preflight, "Origin": "https://elsewhere.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://chat.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://chat.example"  # readable by the page
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}, {"Authorization": "Bearer key-one-and-more"}):
            r = httpx.post(f"{s.url}{CHAT}", json={"messages": OK_MSGS, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(f"{s.url}{path}").status_code == 200, path
        assert httpx.post(f"{s.url}/tokenize", json={"prompt": "Hi"}).status_code == 200
        for key in ("key-one", "key-two"):
            c = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=60)
            assert c.chat.completions.create(model="default", messages=OK_MSGS, max_tokens=2).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).models.list()
        refused = ("cachedattention_http_requests_total", (("endpoint", CHAT), ("status", "401")))
        assert metric_samples(s.url).get(refused) == 4  # the 401s are counted too
    finally:
        s.stop()
    with pytest.raises(ValueError, match="API key"):
        start_server(engine_config(chat_model_dir, store=False), api_keys=("has space",))
    assert api_keys_from(["a", "b"], {"CACHEDATTENTION_API_KEY": "env"}) == ("a", "b")  # the flags win
    assert api_keys_from(None, {"CACHEDATTENTION_API_KEY": "env"}) == ("env",) and api_keys_from(None, {}) == ()
    assert api_keys_from(None, {"VLLM_API_KEY": "moved"}) == ("moved",)  # a deployment from vLLM stays guarded


def test_unknown_routes_and_methods_use_openai_errors(server):
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.url}{CHAT}")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_sees_typed_errors(server):
    c = client(server.url)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=OK_MSGS)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="default", messages=OK_MSGS, max_tokens=0)


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_parse_and_count(server):
    key = ("cachedattention_http_requests_total", (("endpoint", CHAT), ("status", "200")))
    before = metric_samples(server.url).get(key, 0)
    converse(server.url, "metrics-conv", QUESTIONS[:2])
    samples = metric_samples(server.url)
    assert samples[key] == before + 2
    names = {name for name, _ in samples}
    for name in (
        "cachedattention_time_to_first_token_seconds_count",
        "cachedattention_prompt_tokens_total",
        "cachedattention_generation_tokens_total",
        "cachedattention_num_requests_running",
        "cachedattention_num_requests_waiting",
        "cachedattention_kv_pages_free",
    ):
        assert name in names, name
    assert samples[("cachedattention_cached_prompt_tokens_total", (("tier", "device"),))] > 0
    assert samples[("cachedattention_time_to_first_token_seconds_count", ())] >= 2


def test_vllm_s_metric_names_count_the_same_requests(server):
    """Dashboards and autoscalers written for vLLM read vllm:* with model_name: the same counts."""
    before = metric_samples(server.url)
    converse(server.url, "vllm-metrics-conv", QUESTIONS[:2])
    after = metric_samples(server.url)
    model = (("model_name", httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]),)  # the served name

    def grew(name: str, labels: tuple = model) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    ours = (("cachedattention_prompt_tokens_total", ()), ("cachedattention_generation_tokens_total", ()))
    assert grew("vllm:prompt_tokens_total") == after[ours[0]] - before.get(ours[0], 0.0) > 0
    assert grew("vllm:generation_tokens_total") == after[ours[1]] - before.get(ours[1], 0.0) > 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens"):  # fmt: skip
        assert grew(f"vllm:{histogram}_count") == 2, histogram
    finished = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == "vllm:request_success_total")
    assert finished == 2 and grew("vllm:prefix_cache_hits_total") > 0  # the second turn reuses the first's pages
    assert 0.0 <= after[("vllm:kv_cache_usage_perc", model)] <= 1.0
    assert after[("vllm:num_requests_running", model)] >= 0 and ("vllm:num_requests_waiting", model) in after
    assert ("vllm:num_preemptions_total", model) in after
    info = [labels for name, labels in after if name == "vllm:cache_config_info"]
    assert len(info) == 1 and after[("vllm:cache_config_info", info[0])] == 1.0
    assert {"cache_dtype": "auto", "block_size": "16"}.items() <= dict(info[0]).items()



def test_ttft_is_observed_at_the_first_token_not_at_finish(server):
    """As vLLM's: a request still decoding has its TTFT in the histograms already (an alert on TTFT
    must not wait for long answers to end), and its latency to finish not yet."""
    model = (("model_name", httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]),)
    before = metric_samples(server.url)
    body = {"messages": OK_MSGS, "max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}{CHAT}", json=body, timeout=120) as r:
        lines = r.iter_lines()

        def has_text(line: str) -> bool:  # the role's chunk, sent at once, has empty content
            if not line.startswith("data: {"):
                return False
            return any(c["delta"].get("content") for c in json.loads(line[6:])["choices"])

        while not has_text(next(lines)):  # until a token is out
            pass
        during = metric_samples(server.url)
        for _ in lines:  # the answer goes on
            pass
    after = metric_samples(server.url)

    def grew(at: dict, name: str, labels: tuple = model) -> float:
        return at.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew(during, "vllm:time_to_first_token_seconds_count") == 1
    assert grew(during, "cachedattention_time_to_first_token_seconds_count", ()) == 1
    assert grew(during, "vllm:e2e_request_latency_seconds_count") == 0  # still running
    assert grew(after, "vllm:time_to_first_token_seconds_count") == 1  # counted once
    assert grew(after, "vllm:e2e_request_latency_seconds_count") == 1

# -- shutdown -------------------------------------------------------------------------------------------
def test_draining_refuses_new_requests_then_aborts_after_grace(chat_model_dir):
    s = start_server(engine_config(chat_model_dir, store=False))
    loop = s.app.state.engine_loop
    lines: list[str] = []
    first = threading.Event()

    def long_stream() -> None:
        body = {"messages": OK_MSGS, "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}{CHAT}", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=long_stream)
    try:
        reader.start()
        assert first.wait(30)
        loop.begin_drain()  # what SIGTERM does first
        r = httpx.post(f"{s.url}{CHAT}", json={"messages": OK_MSGS})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(f"{s.url}/health").status_code == 503
        loop.shutdown(grace_s=0.0)  # grace over at once: the running stream is aborted, the store flushed
        reader.join(timeout=30)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_aborted"
    finally:
        s.stop()


@pytest.mark.slow
def test_requests_past_the_grace_are_told_they_were_aborted(chat_model_dir, tmp_path):
    """SIGTERM to `cachedattention serve` with requests that outlast --shutdown-grace-s: each is
    answered as aborted (503 `request_aborted`; a stream's error event, then [DONE]). Before, uvicorn
    cancelled their handlers at the same moment: a plain-text 500 and a traceback, a stream cut."""
    srv = launch_cli_server(chat_model_dir, tmp_path / "server.log", "--no-store", "--shutdown-grace-s", "0")
    long = {"messages": OK_MSGS, "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{srv.url}{CHAT}", json={**long, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    started.set()

    try:
        with ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(stream)
            assert started.wait(30)
            whole = pool.submit(httpx.post, f"{srv.url}{CHAT}", json=long, timeout=60)
            deadline = time.monotonic() + 30
            while httpx.get(f"{srv.url}/health").json()["running"] < 2:  # both in flight at SIGTERM
                assert time.monotonic() < deadline and not whole.done()
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            r = whole.result(timeout=60)
            streamed.result(timeout=60)
        assert srv.proc.wait(timeout=45) == 0
    finally:
        srv.kill()
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted", r.text
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "request_aborted"


def test_served_name_and_stream_delta_rules():
    from types import SimpleNamespace

    from cachedattention.server.app import default_model_name
    from cachedattention.server.stream_text import stream_delta

    embedded = SimpleNamespace(config=SimpleNamespace(model=None), loaded=SimpleNamespace(name="smollm2-x"))
    assert default_model_name(embedded) == "SmolLM2-135M-Instruct"
    folder = SimpleNamespace(config=SimpleNamespace(model="/m/tiny"), loaded=SimpleNamespace(name="tiny"))
    assert default_model_name(folder) == "tiny"
    assert stream_delta("ab\ufffd", "a", ()) == "b"  # an unfinished UTF-8 character waits
    assert stream_delta("hello wo", "he", ("world",)) == "llo "  # "wo" may become the stop string
    assert stream_delta("hello", "hex", ()) == ""  # the text so far changed: wait for the final text


SESSION = "restart-session"


@pytest.fixture(scope="module")
def sigterm_run(chat_model_dir, tmp_path_factory):
    """A CLI server (with a disk store when the store exists): one turn, then SIGTERM during a long stream."""
    tmp = tmp_path_factory.mktemp("cli")
    store_flags = ["--store-dir", str(tmp / "store")] if store_available() else ["--no-store"]
    # (the grace, 30 s by default, is the longest the stream may take: room for a loaded machine)
    srv = launch_cli_server(chat_model_dir, tmp / "server1.log", *store_flags, "--shutdown-grace-s", "150")
    try:
        first = converse(srv.url, SESSION, QUESTIONS[:1])
        events: list[str] = []
        started = threading.Event()

        def long_stream() -> None:
            body = {"messages": OK_MSGS, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{srv.url}{CHAT}", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=long_stream)
        reader.start()
        assert started.wait(30)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(timeout=200)
        took = time.monotonic() - t0
        reader.join(timeout=60)
    finally:
        srv.kill()
    return dict(tmp=tmp, flags=store_flags, first=first, events=events, rc=rc, took=took, log=srv.log)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_and_exits_zero(sigterm_run):
    r = sigterm_run
    assert r["rc"] == 0, r["log"].read_text()[-3000:]
    assert r["took"] < 120  # (it exits when the stream ends, not at the grace's end, 150 s)
    assert "Waiting for connections to close" in r["log"].read_text()  # the stream was still running at SIGTERM
    assert r["events"][-1] == "data: [DONE]"  # the in-flight stream ran to its end
    finals = [json.loads(e[6:]) for e in r["events"][:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"


@needs_store
@pytest.mark.slow
def test_restart_on_same_store_dir_reuses_the_session(sigterm_run, chat_model_dir, reference):
    r = sigterm_run
    srv = launch_cli_server(chat_model_dir, r["tmp"] / "server2.log", *r["flags"], "--api-key", "x")  # client() sends "x"
    try:
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401 and httpx.get(f"{srv.url}/health").status_code == 200
        c = client(srv.url)
        first_text = r["first"][0][0]
        messages = [
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        resp = c.chat.completions.create(
            model="default", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"session_id": SESSION}
        )
        assert resp.usage.prompt_tokens_details.cached_tokens > 0  # nothing is on the new device: it came from disk
        assert resp.choices[0].message.content == reference(messages, MAX_TOKENS)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=45) == 0
    finally:
        srv.kill()


def test_any_origin_may_call_by_default_and_the_flag_reads_vllm_s_json_list(server):
    from cachedattention.cli import build_parser

    r = httpx.post(f"{server.url}{CHAT}", json={"messages": OK_MSGS, "max_tokens": 2}, headers={"Origin": "https://a.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    parse = build_parser().parse_args
    assert parse(["serve", "m", "--allowed-origins", '["https://a.example", "http://b"]']).allowed_origins == ["https://a.example", "http://b"]
    assert parse(["serve", "m", "--allowed-origins", "https://a.example,http://b"]).allowed_origins == ["https://a.example", "http://b"]
    assert parse(["serve", "m", "--allowed-origins", "[]"]).allowed_origins == [] and parse(["serve", "m"]).allowed_origins == ["*"]
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--allowed-origins", '["unclosed"'])


def test_a_request_whose_own_step_fails_gets_a_500_and_its_batch_mates_finish(server, monkeypatch):
    """One request's sampling failing (here: a stand-in bug for seed 13) ends that request alone with
    the server's error; a request streaming beside it finishes whole (before: the step failed and
    every running request was aborted)."""

    fail_sampling_for_seed(monkeypatch, 13)
    streamed = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
    running = threading.Event()

    def stream_all() -> list[str]:
        lines = []
        with httpx.stream("POST", f"{server.url}{COMP}", json=streamed, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    running.set()
        return lines

    with ThreadPoolExecutor(2) as pool:
        lines = pool.submit(stream_all)
        assert running.wait(60)
        bad = httpx.post(f"{server.url}{COMP}", json={"prompt": "Hi", "max_tokens": 8, "seed": 13, "temperature": 1},
                         timeout=60)  # fmt: skip
        chunks = lines.result()
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert chunks[-1] == "data: [DONE]"
    texts = [json.loads(c[6:]) for c in chunks[:-1]]
    assert not any("error" in t for t in texts)
    assert [c["finish_reason"] for t in texts for c in t["choices"] if c["finish_reason"]] == ["length"]
    assert texts[-1]["usage"]["completion_tokens"] == 400
    ok = httpx.post(f"{server.url}{COMP}", json={"prompt": "Hi", "max_tokens": 4, "seed": 14, "temperature": 1}, timeout=60)
    assert ok.status_code == 200  # the server goes on
