"""`cachedattention router` in front of two real servers: each conversation stays on one replica
(its history reused there), the conversations spread over both, answers and streams come through
unchanged, a stored response is found where it was made, a session is forgotten everywhere, and a
replica that goes down is failed over."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cachedattention.router.affinity import rendezvous_order
from cachedattention.router.app import create_router_app
from cachedattention.router.keys import route_key
from cachedattention.router.replicas import RouterConfig
from tests.server.conftest import engine_config, serve_app, start_server
from tests.server.test_server import MAX_TOKENS, client, metric_samples

FIRST_QUESTIONS = ["Tell me about cats.", "What is rain?", "Name a colour.", "How do ships float?"]
SPARE_QUESTIONS = [f"Tell me about the number {n}." for n in range(64)]  # (to find one homed on a replica)
FOLLOW_UPS = ["And dogs?", "Why?"]


def start_router(urls: list[str], health_interval_s: float = 0.5):
    config = RouterConfig(tuple(urls), health_interval_s=health_interval_s, max_body_bytes=1 << 20)
    return serve_app(create_router_app(config))


@pytest.fixture(scope="module")
def replicas(chat_model_dir, tmp_path_factory):
    servers = [start_server(engine_config(chat_model_dir, store=True, store_dir=str(tmp_path_factory.mktemp(f"r{i}"))))
               for i in range(2)]  # fmt: skip
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def router(replicas):
    r = start_router([s.url for s in replicas])
    yield r
    r.stop()


def chat(url: str, messages: list[dict], **kw):
    return client(url).chat.completions.create(model="default", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0, **kw)  # fmt: skip


def routed(router_url: str) -> dict[str, float]:
    """Requests relayed per replica, by the router's metrics."""
    out: dict[str, float] = {}
    for (name, labels), v in metric_samples(router_url).items():
        if name == "cachedattention_router_requests_total":
            replica = dict(labels)["replica"]
            out[replica] = out.get(replica, 0) + v
    return out


def test_conversations_keep_their_replica_reuse_their_history_and_spread(router, replicas, reference):
    # The replicas' ports are random, so which of them a question hashes to is too: two questions
    # homed on each replica (else 1 run in 8 sent all four to one of them).
    questions = [q for s in replicas for q in _homed_on(router, s.url, 2)]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    last_prompt = [0] * len(conversations)
    before = routed(router.url)
    for turn in range(1 + len(FOLLOW_UPS)):
        for i, messages in enumerate(conversations):  # (interleaved, as concurrent users' turns arrive)
            r = chat(router.url, messages)
            text = r.choices[0].message.content
            assert text == reference(messages, MAX_TOKENS)
            if turn:  # the last turn's prompt (and answer) came from this replica's tiers
                assert r.usage.prompt_tokens_details.cached_tokens >= last_prompt[i], (turn, i)
            last_prompt[i] = r.usage.prompt_tokens
            messages.append({"role": "assistant", "content": text})
            if turn < len(FOLLOW_UPS):
                messages.append({"role": "user", "content": FOLLOW_UPS[turn]})
    after = routed(router.url)
    spread = {u: after.get(u, 0) - before.get(u, 0) for u in (s.url for s in replicas)}
    assert all(n > 0 for n in spread.values()), spread  # (both replicas took conversations)


def test_a_stream_comes_through_as_the_replica_sends_it(router):
    messages = [{"role": "user", "content": "Count to five."}]
    whole = chat(router.url, messages).choices[0].message.content
    chunks = list(chat(router.url, messages, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_a_client_that_leaves_mid_stream_ends_its_request_on_the_replica(router):
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and next(r.iter_lines()).startswith("data:")
    in_flight = router.app.state.router.replicas.in_flight
    deadline = time.monotonic() + 10
    while any(in_flight.values()):  # (the relay closed: the replica's request and the router's count end)
        assert time.monotonic() < deadline, in_flight
        time.sleep(0.05)


def test_a_replica_s_error_comes_back_unchanged(router, replicas):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}
    via_router = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)
    direct = httpx.post(f"{replicas[0].url}/v1/chat/completions", json=body, timeout=30)
    assert via_router.status_code == direct.status_code == 400 and via_router.json() == direct.json()
    garbled = httpx.post(f"{router.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert garbled.status_code == 400 and "error" in garbled.json()
    limit = router.app.state.router.config.max_body_bytes
    huge = httpx.post(f"{router.url}/v1/chat/completions", content=b" " * (limit + 1), timeout=60)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_a_session_keeps_its_replica_and_is_forgotten_on_every_replica(router, replicas):
    messages = [{"role": "user", "content": "Remember the number 7."}]
    first = chat(router.url, messages, extra_headers={"X-Session-ID": "routed-1"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Which number?"}]  # fmt: skip
    second = chat(router.url, messages, extra_headers={"X-Session-ID": "routed-1"})
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    gone = httpx.delete(f"{router.url}/v1/sessions/routed-1", timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert httpx.delete(f"{router.url}/v1/sessions/routed-1", timeout=30).status_code == 404


def test_stored_responses_are_found_where_they_were_made(router):
    ids = []
    for q in FIRST_QUESTIONS:  # (several, so that both replicas hold some)
        r = httpx.post(f"{router.url}/v1/responses", json={"model": "default", "input": q, "max_output_tokens": 8},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    for rid in ids:
        nxt = httpx.post(f"{router.url}/v1/responses", timeout=60, json={
            "model": "default", "input": "Go on.", "previous_response_id": rid, "max_output_tokens": 8})  # fmt: skip
        assert nxt.status_code == 200, nxt.text
        assert httpx.get(f"{router.url}/v1/responses/{rid}", timeout=30).json()["id"] == rid
    router_state = router.app.state.router
    assert all(router_state.response_homes.get(rid) is not None for rid in ids)


def test_a_streamed_response_s_id_is_learned_from_its_first_event(router):
    body = {"model": "default", "input": "Stream me a line.", "max_output_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{router.url}/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    rid = json.loads(events[0][5:])["response"]["id"]
    homes = router.app.state.router.response_homes
    assert homes.get(rid) is not None
    nxt = httpx.post(f"{router.url}/v1/responses", timeout=60, json={
        "model": "default", "input": "And another.", "previous_response_id": rid, "max_output_tokens": 8})  # fmt: skip
    assert nxt.status_code == 200 and nxt.json()["previous_response_id"] == rid


def test_a_replica_that_goes_down_is_failed_over_and_none_left_is_a_503(chat_model_dir, reference):
    servers = [start_server(engine_config(chat_model_dir, store=False)) for _ in range(2)]
    r = start_router([s.url for s in servers], health_interval_s=600)  # (a failed connection tells it first)
    try:
        question = _homed_on(r, servers[0].url, 1)[0]  # (one whose replica we stop)
        messages = [{"role": "user", "content": question}]
        assert chat(r.url, messages).choices[0].message.content == reference(messages, MAX_TOKENS)
        servers[0].stop()
        assert chat(r.url, messages).choices[0].message.content == reference(messages, MAX_TOKENS)
        samples = metric_samples(r.url)
        assert samples[("cachedattention_router_failovers_total", (("replica", servers[0].url),))] >= 1
        assert httpx.get(f"{r.url}/health", timeout=10).json()["replicas_up"] == 1
        servers[1].stop()
        down = httpx.post(f"{r.url}/v1/chat/completions", timeout=30,
                          json={"model": "default", "messages": messages, "max_tokens": 4})  # fmt: skip
        assert down.status_code == 503 and down.json()["error"]["code"] == "no_replica"
        assert httpx.get(f"{r.url}/health", timeout=10).status_code == 503
    finally:
        r.stop()
        for s in servers:
            s.stop()


def _home(router, question: str) -> str:
    key = route_key("/v1/chat/completions", {}, {"messages": [{"role": "user", "content": question}]})
    return rendezvous_order(key.value, router.app.state.router.replicas.urls)[0]


def _homed_on(router, url: str, n: int) -> list[str]:
    """`n` first questions whose conversations the router sends to the replica at `url`."""
    found = [q for q in FIRST_QUESTIONS + SPARE_QUESTIONS if _home(router, q) == url][:n]
    assert len(found) == n, f"fewer than {n} of {len(FIRST_QUESTIONS + SPARE_QUESTIONS)} questions hash to {url}"
    return found


@pytest.mark.slow
def test_the_router_command_relays_to_its_replicas_and_stops_on_sigterm(router, replicas, tmp_path):
    log = tmp_path / "router.log"
    cmd = [sys.executable, "-m", "cachedattention.cli", "router", "--port", "0",
           *(arg for s in replicas for arg in ("--replica", s.url))]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 300  # (a start takes seconds: room for a loaded machine)
        while not (found := re.search(r"running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{found.group(1)}"
        assert httpx.get(f"{url}/health", timeout=10).json() == {"replicas_up": 2, "replicas": 2}
        assert chat(url, [{"role": "user", "content": "hi"}]).choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # no line per relayed request or health check (httpx's INFO lines): a router's log stays readable
    assert "HTTP Request:" not in log.read_text(errors="replace")
