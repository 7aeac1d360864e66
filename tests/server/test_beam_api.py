"""vLLM's use_beam_search on the server: its choices are the offline search's best beams (n of them,
best first) for completions, batches and chat, streamed or not, with their logprobs; what a search
cannot honour is refused by name; a client that goes away stops the search and its steps."""

from __future__ import annotations

import json
import shutil
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from cachedattention import LLM, BeamSearchParams, LoRARequest
from cachedattention.beam_search import BeamSearchSequence
from cachedattention.config import CacheConfig, EngineConfig, LoRAConfig, StoreConfig
from cachedattention.sampling import TokenLogprob
from cachedattention.server.beam import _Search
from cachedattention.server.protocol import parse_completion
from tests.server.conftest import PAGES, engine_config, start_server

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "Tell me about the moon."}]


@pytest.fixture(scope="module")
def offline(chat_model_dir):
    llm = LLM(str(chat_model_dir), cache=CacheConfig(num_pages=PAGES))
    yield llm
    llm.close()


def _post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kw)


def _beams(offline, ids: list[int], width: int, steps: int, length_penalty: float = 1.0) -> list[BeamSearchSequence]:
    params = BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True, length_penalty=length_penalty)
    return offline.beam_search([{"prompt_token_ids": ids}], params)[0].sequences


def test_a_completion_s_choices_are_the_search_s_best_beams(server, offline):
    tok = offline.get_tokenizer()
    prompts = ["Once upon a time", "The capital of France is"]
    body = {"prompt": prompts, "use_beam_search": True, "n": 3, "max_tokens": 5, "ignore_eos": True,
            "length_penalty": 0.5, "logprobs": 2}  # fmt: skip
    r = _post(server, COMP, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for k, prompt in enumerate(prompts):
        ids = tok.encode(prompt)
        want = _beams(offline, ids, 3, 5, length_penalty=0.5)
        got = out["choices"][3 * k : 3 * k + 3]
        assert [c["text"] for c in got] == [tok.decode(b.tokens[len(ids) :]) for b in want]
        for c, beam in zip(got, want):
            assert c["finish_reason"] == "length"
            lps = c["logprobs"]
            assert len(lps["tokens"]) == 5 and all(len(top) <= 3 for top in lps["top_logprobs"])
            assert sum(lps["token_logprobs"]) == pytest.approx(beam.cum_logprob, abs=1e-3)
    assert out["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    assert out["usage"]["completion_tokens"] == 6 * 5


def test_a_chat_s_beams_streamed_or_not_are_the_same_choices(server, offline):
    tok = offline.get_tokenizer()
    ids = tok.encode_chat(HI)
    want = _beams(offline, ids, 2, 4)
    body = {"messages": HI, "use_beam_search": True, "n": 2, "max_tokens": 4, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 1}  # fmt: skip
    full = _post(server, CHAT, body).json()
    texts = [c["message"]["content"] for c in full["choices"]]
    assert texts == [tok.decode(b.tokens[len(ids) :]) for b in want]
    content = full["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [tok.token_text(t) for t in want[0].tokens[len(ids) :]]
    assert all(len(e["top_logprobs"]) == 1 for e in content)
    streamed = ["", ""]
    finished = [None, None]
    with httpx.stream("POST", f"{server.url}{CHAT}", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += c["delta"].get("content") or ""
                    finished[c["index"]] = c["finish_reason"] or finished[c["index"]]
    assert streamed == texts and finished == ["length", "length"]


@pytest.mark.parametrize("field, value", [("session_id", "s1"), ("stop", ["."]), ("echo", True),
                                          ("response_format", {"type": "json_object"}), ("n", 11),
                                          ("min_tokens", 2), ("logit_bias", {"5": 3})])  # fmt: skip
def test_what_a_search_cannot_honour_is_refused_by_name(server, field, value):
    r = _post(server, COMP, {"prompt": "hi", "use_beam_search": True, "max_tokens": 3, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field
    assert "beam" in error["message"]


def test_a_required_tool_call_is_refused_with_beam_search(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = _post(server, CHAT, {"messages": HI, "tools": tools, "tool_choice": "required", "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_a_prompt_past_the_window_is_refused_before_searching(server):
    r = _post(server, COMP, {"prompt": [5] * 1000, "use_beam_search": True, "max_tokens": 100})
    assert r.status_code == 400 and "window" in r.json()["error"]["message"]


def test_a_client_that_goes_away_stops_the_search(server):
    """A search of 4 beams x 900 steps, left after its first steps: no more tokens are generated."""
    loop = server.app.state.engine_loop
    registry = server.app.state.metrics.registry

    def generated() -> float:
        return registry.get_sample_value("cachedattention_generation_tokens_total")

    before = generated()
    body = {"prompt": "Once upon a time", "use_beam_search": True, "n": 4, "max_tokens": 900, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}{COMP}", json=body, timeout=120) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while generated() < before + 8 and time.monotonic() < deadline:  # two steps or so under way
            time.sleep(0.01)
    settled, last = time.monotonic(), generated()
    while time.monotonic() - settled < 1.0:  # no token for a second: the search stopped
        time.sleep(0.05)
        if generated() != last:
            settled, last = time.monotonic(), generated()
        assert last - before < 400, "the search went on after its client left"
    assert not loop.engine.requests


def test_a_beam_that_ended_is_a_stop_choice_without_its_end_token(offline):
    """The choice a beam that wrote the end of sequence makes: "stop" (the end token its stop_reason,
    as vLLM's), its tokens and logprobs without the end unless include_stop_str_in_output."""
    eos = offline.get_tokenizer().eos_token_id
    prompt = [1, 2, 3]
    first = offline.generate([prompt], offline.get_default_sampling_params())[0]
    entries = [TokenLogprob(7, -0.5, 1, ((7, -0.5), (eos, -0.9))), TokenLogprob(eos, -0.1, 1, ((eos, -0.1), (9, -2.0)))]
    beam = BeamSearchSequence(prompt + [7, eos], entries, -0.6, finish_reason="stop")

    def choice(include: bool):
        parsed = parse_completion({"prompt": prompt, "use_beam_search": True, "max_tokens": 4, "logprobs": 1,
                                   "include_stop_str_in_output": include}, None, 1024)  # fmt: skip
        search = _Search(SimpleNamespace(engine=offline.engine), 1024, parsed, None)
        return search._choice("c-0", beam, first, len(prompt), eos)

    out = choice(False)
    assert out.finish_reason == "stop" and out.stop_reason == eos and out.token_ids == [7]
    assert [lp.token_id for lp in out.logprobs] == [7] and out.logprobs[0].top == ((7, -0.5),)
    assert out.text == offline.get_tokenizer().decode([7]) and out.metrics.generated_tokens == 1
    kept = choice(True)
    assert kept.token_ids == [7, eos] and kept.text == out.text and kept.logprobs[1].logprob == -0.1


def test_a_search_under_way_finishes_while_the_server_drains(chat_model_dir):
    """After SIGTERM's drain begins, new requests are refused but a search's later steps are taken,
    and shutdown waits for the search (not only for the step under way)."""
    s = start_server(engine_config(chat_model_dir, store=False))
    loop = s.app.state.engine_loop
    registry = s.app.state.metrics.registry
    answers: list[httpx.Response] = []
    body = {"prompt": "Once upon a time", "use_beam_search": True, "n": 2, "max_tokens": 60, "ignore_eos": True}
    try:
        reader = threading.Thread(target=lambda: answers.append(_post(s, COMP, body)))
        reader.start()
        deadline = time.monotonic() + 30
        while not (registry.get_sample_value("cachedattention_generation_tokens_total") or 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.begin_drain()
        assert _post(s, COMP, {"prompt": "hi", "max_tokens": 2}).status_code == 503
        loop.shutdown(grace_s=120)  # returns once the search ended
        reader.join(timeout=30)
        out = answers[0].json()
        assert answers[0].status_code == 200, out
        assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
        assert out["usage"]["completion_tokens"] == 2 * 60
    finally:
        s.stop()


def test_a_search_sent_while_the_server_drains_is_refused_as_any_request(chat_model_dir):
    s = start_server(engine_config(chat_model_dir, store=False))
    try:
        s.app.state.engine_loop.begin_drain()
        for body in ({"prompt": "hi", "max_tokens": 2}, {"prompt": "hi", "max_tokens": 2, "use_beam_search": True}):
            r = _post(s, COMP, body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    finally:
        s.stop()


def test_a_search_is_aborted_when_the_grace_ends_between_two_steps(chat_model_dir):
    """SIGTERM's grace over (abort_in_flight) while no step of the search is in the engine: its next
    step is refused, and the client is told the request was aborted."""
    s = start_server(engine_config(chat_model_dir, store=False))
    loop = s.app.state.engine_loop
    submit = loop.submit

    def grace_over_before_step_3(job, event_loop, follow_up=False):
        if job.request_id.endswith("-step3-0"):
            loop.begin_drain()
            loop.abort_in_flight()
        return submit(job, event_loop, follow_up=follow_up)

    loop.submit = grace_over_before_step_3
    try:
        body = {"prompt": "Once upon a time", "use_beam_search": True, "n": 2, "max_tokens": 40, "ignore_eos": True}
        r = _post(s, COMP, body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted", r.text
    finally:
        s.stop()


def test_a_non_streamed_search_whose_client_left_ends_its_handler(server):
    tasks = server.server.server_state.tasks  # (uvicorn's: the requests it is still answering)
    registry = server.app.state.metrics.registry
    before = registry.get_sample_value("cachedattention_generation_tokens_total")
    body = {"prompt": "Once upon a time", "use_beam_search": True, "n": 4, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{COMP}", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert registry.get_sample_value("cachedattention_generation_tokens_total") > before  # (it was searching)
    deadline = time.monotonic() + 20
    while (server.app.state.engine_loop.engine.requests or tasks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.app.state.engine_loop.engine.requests and not tasks


def test_a_generation_config_s_penalty_does_not_refuse_a_search(chat_model_dir):
    """A model's generation config may set repetition_penalty for every request: the search, which
    cannot honour it, is not refused for what its client did not send (vLLM's ignores it)."""
    config = EngineConfig(model=str(chat_model_dir), cache=CacheConfig(num_pages=PAGES),
                          store=StoreConfig(enable=False), override_generation_config={"repetition_penalty": 1.1})  # fmt: skip
    s = start_server(config)
    try:
        body = {"prompt": "Once upon a time", "use_beam_search": True, "n": 2, "max_tokens": 3}
        assert _post(s, COMP, body).status_code == 200
        refused = _post(s, COMP, {**body, "repetition_penalty": 1.1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "repetition_penalty"
    finally:
        s.stop()


def test_a_search_keeps_its_adapter_when_it_is_unloaded_meanwhile(chat_model_dir, tmp_path, monkeypatch):
    """Every step runs with the adapter the search began with: unloaded (its folder removed too)
    while the search runs, it is not read again, and the answer equals the offline search's."""
    from tests.lora_files import ATTENTION, MLP, write_adapter

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    folder = tmp_path / "sql"
    write_adapter(chat_model_dir, folder, ATTENTION + MLP, r=8, seed=3)
    config = EngineConfig(model=str(chat_model_dir), cache=CacheConfig(num_pages=PAGES),
                          store=StoreConfig(enable=False), lora=LoRAConfig(enable=True))  # fmt: skip
    llm = LLM(str(chat_model_dir), cache=CacheConfig(num_pages=PAGES), enable_lora=True)
    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=2, max_tokens=120, ignore_eos=True)
    want = llm.beam_search(["Once upon a time"], params, lora_request=LoRARequest("sql", 1, str(folder)))[0]
    llm.close()
    s = start_server(config, lora_modules=[("sql", str(folder))])
    answers: list[httpx.Response] = []
    try:
        body = {"model": "sql", "prompt": "Once upon a time", "use_beam_search": True, "n": 2, "max_tokens": 120,
                "ignore_eos": True}  # fmt: skip
        reader = threading.Thread(target=lambda: answers.append(_post(s, COMP, body)))
        reader.start()
        registry = s.app.state.metrics.registry
        deadline = time.monotonic() + 30
        while (registry.get_sample_value("cachedattention_generation_tokens_total") or 0) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        shutil.rmtree(folder)
        reader.join(timeout=120)
        assert answers[0].status_code == 200, answers[0].text
        prompt = len(tok.encode("Once upon a time"))
        assert [c["text"] for c in answers[0].json()["choices"]] == [tok.decode(b.tokens[prompt:]) for b in want.sequences]
    finally:
        s.stop()
