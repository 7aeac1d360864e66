"""More of vLLM's OpenAI-compatible server, as it documents and behaves: chat's echo and the answer's
role, chat's add_special_tokens, assistant messages sent back with empty tool_calls, the time between
tokens in vLLM's metrics, SageMaker's /ping and /invocations, --enable-request-id-headers and
--default-chat-template-kwargs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import RunningServer, engine_config, start_server, with_template

CHAT = "/v1/chat/completions"
OPEN = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


def _post(server: RunningServer, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def _streamed(server: RunningServer, **body) -> list[dict]:
    """A streamed chat's chunks (the [DONE] line left out)."""
    with httpx.stream("POST", f"{server.url}{CHAT}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- 1. chat's echo ----------------------------------------------------------------------------------------
def test_echo_starts_a_continued_answer_with_the_message_it_goes_on_with(server):
    """vLLM's echo: the last message's content before the answer, when its role is the answer's (a
    final message continued); whole and streamed, each choice."""
    body = {"messages": OPEN, "add_generation_prompt": False, "continue_final_message": True, **GREEDY}
    plain = _post(server, CHAT, **body).json()["choices"][0]["message"]["content"]
    echoed = _post(server, CHAT, **body, echo=True, n=2).json()
    assert [c["message"]["content"] for c in echoed["choices"]] == ["Once upon a time" + plain] * 2
    assert echoed["usage"]["completion_tokens"] == 2 * GREEDY["max_tokens"]  # the echo is no generated text
    chunks = _streamed(server, **body, echo=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Once upon a time"}  # at once, before the answer
    assert _text(chunks) == "Once upon a time" + plain


def test_echo_after_a_generation_prompt_adds_nothing_to_a_user_s_turn(server):
    """The answer is the assistant's, the last message the user's: nothing is echoed, as vLLM."""
    body = {"messages": OPEN[:1], **GREEDY}
    plain = _post(server, CHAT, **body).json()["choices"][0]["message"]["content"]
    assert _post(server, CHAT, **body, echo=True).json()["choices"][0]["message"]["content"] == plain
    assert _text(_streamed(server, **body, echo=True)) == plain


def test_without_a_generation_prompt_the_answer_takes_the_last_message_s_role(server):
    """vLLM's rule: the answer goes on with the last message, in its role (and echoes it)."""
    body = {"messages": OPEN[:1], "add_generation_prompt": False, **GREEDY}
    message = _post(server, CHAT, **body, echo=True).json()["choices"][0]["message"]
    assert message["role"] == "user" and message["content"].startswith("Tell me a story.")
    assert _streamed(server, **body)[0]["choices"][0]["delta"]["role"] == "user"


def test_echo_must_be_a_boolean(server):
    r = _post(server, CHAT, messages=OPEN[:1], echo="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text


# -- 2. chat's add_special_tokens ------------------------------------------------------------------------
BOS = 0  # <|endoftext|>: what the copy's tokenizer puts before an encoded text


def with_bos(chat_model_dir: Path, path: Path) -> Path:
    """A copy of the tiny chat model whose tokenizer puts a BOS before every text it encodes with its
    special tokens (as Llama's do); its chat template writes none."""
    import shutil

    shutil.copytree(chat_model_dir, path, dirs_exist_ok=True)
    tok = json.loads((path / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [BOS],
                                                                  "tokens": ["<|endoftext|>"]}}}  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


@pytest.fixture(scope="module")
def bos_server(chat_model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    s = start_server(engine_config(with_bos(chat_model_dir, tmp_path_factory.mktemp("bos-model")), store=False))
    yield s
    s.stop()


def test_add_special_tokens_puts_the_tokenizer_s_bos_before_the_template_s_text(bos_server):
    """vLLM's chat field: the rendered chat encoded with the tokenizer's special tokens too (off by
    default: the template writes its own); /tokenize gives the ids generation uses either way."""
    messages = OPEN[:1]
    plain = _post(bos_server, "/tokenize", messages=messages).json()["tokens"]
    added = _post(bos_server, "/tokenize", messages=messages, add_special_tokens=True).json()["tokens"]
    assert plain[0] != BOS and added == [BOS, *plain]
    for specials, ids in ((False, plain), (True, added)):
        r = _post(bos_server, CHAT, messages=messages, add_special_tokens=specials, max_tokens=1).json()
        assert r["usage"]["prompt_tokens"] == len(ids)
    assert _post(bos_server, "/tokenize", prompt="Hi").json()["tokens"][0] == BOS  # (a text prompt's, as before)
    r = _post(bos_server, CHAT, messages=messages, add_special_tokens="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_special_tokens", r.text


def test_a_session_s_truncation_keeps_the_added_bos_with_its_head(chat_model_dir, tmp_path):
    """What a session's overflow truncation keeps is learnt from probes rendered as the prompt is:
    with the BOS too, so the head (the system prompt) still ends where it did, one token later."""
    from cachedattention.model.messages import ChatOptions
    from cachedattention.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(with_bos(chat_model_dir, tmp_path / "m")))
    messages = [{"role": "system", "content": "Be brief."}, *OPEN, {"role": "user", "content": "Go on."}]
    heads = []
    for options in (ChatOptions(), ChatOptions(add_special_tokens=True)):
        prompt = tok.encode_chat(messages, options=options)
        heads.append(tok.kept_lengths(messages, prompt, options=options))
    assert heads[1].head == heads[0].head + 1 > 1 and heads[1].tail == heads[0].tail > 0


# -- 3. an assistant message with "tool_calls": [] ------------------------------------------------------
# a template that tells a message with tool_calls (even empty) from one without, as Llama 3's checks them
DEFINED = ("{% for m in messages %}[{{ m.role }}]{% if m.tool_calls is defined %}<calls {{ m.tool_calls | length }}>"
           "{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_empty_tool_calls_are_no_calls_to_the_template(chat_model_dir):
    """vLLM drops an assistant's empty tool_calls before rendering (templates stay on the plain
    answer's path: Llama 3's would fail on them); content may then be left out, as with calls."""
    from cachedattention.model.messages import validate_messages
    from cachedattention.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(chat_model_dir)).with_chat_template(DEFINED)
    sent_back = [*OPEN[:1], {"role": "assistant", "content": "Hi.", "tool_calls": []}, *OPEN[:1]]
    plain = [*OPEN[:1], {"role": "assistant", "content": "Hi."}, *OPEN[:1]]
    assert tok.render_chat(validate_messages(sent_back)) == tok.render_chat(validate_messages(plain))
    assert "[assistant]Hi.[user]" in tok.render_chat(validate_messages(sent_back))  # (not <calls 0>)
    bare = validate_messages([*OPEN[:1], {"role": "assistant", "tool_calls": []}, *OPEN[:1]])
    assert bare[1] == {"role": "assistant", "content": ""}


def test_an_answer_without_calls_carries_no_tool_calls(server):
    """As vLLM's since it fixed its empty list (vllm-project/vllm#44105: an OpenAI client took a
    present `tool_calls: []` for calls): the key is left out, whole and streamed, and a message sent
    back with one is served."""
    messages = [*OPEN[:1], {"role": "assistant", "tool_calls": []}, *OPEN[:1]]
    whole = _post(server, CHAT, messages=messages, **GREEDY)
    assert whole.status_code == 200, whole.text
    assert "tool_calls" not in whole.json()["choices"][0]["message"]
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in _streamed(server, messages=messages, **GREEDY)
                   if c["choices"])  # fmt: skip


# -- 4. the time between tokens in vLLM's metrics ----------------------------------------------------------
def _samples(server: RunningServer) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_the_time_between_tokens_is_observed_per_gap_and_per_request(server):
    """vLLM's inter_token_latency_seconds (and its earlier name, time_per_output_token_seconds): one
    observation per gap between a request's tokens; request_time_per_output_token_seconds: one per
    request, its first token to its last over the tokens after the first; vLLM's buckets."""
    model = httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"][0]["id"]
    label = (("model_name", model),)
    before = _samples(server)
    for n in (6, 1):  # a one-token answer has no gap: it observes 0 per request, as vLLM's
        _post(server, CHAT, messages=OPEN[:1], **{**GREEDY, "max_tokens": n})
    after = _samples(server)

    def grew(name: str) -> float:
        return after[(name, label)] - before.get((name, label), 0.0)

    for gaps in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert grew(f"{gaps}_count") == 5 and grew(f"{gaps}_sum") > 0, gaps
    assert grew("vllm:request_time_per_output_token_seconds_count") == 2
    mean = grew("vllm:request_time_per_output_token_seconds_sum")  # the 6-token answer's (the other's is 0)
    assert mean * 5 == pytest.approx(grew("vllm:inter_token_latency_seconds_sum"), rel=1e-6)
    bounds = sorted(float(dict(labels)["le"]) for name, labels in after
                    if name == "vllm:inter_token_latency_seconds_bucket")  # fmt: skip
    assert bounds[:3] == [0.01, 0.025, 0.05] and bounds[-2:] == [80.0, float("inf")] and len(bounds) == 20


# -- 5. SageMaker's /ping and /invocations -----------------------------------------------------------------
def test_ping_answers_as_health_does(server):
    for method in ("GET", "POST"):  # SageMaker probes with GET; vLLM takes POST too
        r = httpx.request(method, f"{server.url}/ping", timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ok", (method, r.text)
    paths = httpx.get(f"{server.url}/openapi.json", timeout=60).json()["paths"]
    assert list(paths["/ping"]) == ["get"] and list(paths["/invocations"]) == ["post"]  # one operation id each


def test_invocations_routes_by_the_body_s_shape(server):
    """vLLM's rule: a body with messages is a chat completion, one with a prompt a completion, each
    answered as its own route answers it (streamed too); neither is a 400."""
    chat = {"messages": OPEN[:1], **GREEDY}
    via = _post(server, "/invocations", **chat).json()
    direct = _post(server, CHAT, **chat).json()
    assert via["object"] == "chat.completion" and via["choices"][0]["message"] == direct["choices"][0]["message"]
    completion = {"prompt": "Once upon a time", **GREEDY}
    via = _post(server, "/invocations", **completion).json()
    assert via["object"] == "text_completion"
    assert via["choices"][0]["text"] == _post(server, "/v1/completions", **completion).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{server.url}/invocations", json={**chat, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert _text(chunks) == direct["choices"][0]["message"]["content"]
    r = _post(server, "/invocations", input="Hi")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_invocations_needs_the_api_key_and_ping_does_not(chat_model_dir):
    """/invocations generates: with --api-key it is guarded as /v1 is (as vLLM guards it); the probe is open."""
    s = start_server(engine_config(chat_model_dir, store=False), api_keys=["k-1"])
    try:
        body = {"messages": OPEN[:1], "max_tokens": 1}
        assert httpx.post(f"{s.url}/invocations", json=body, timeout=60).status_code == 401
        keyed = httpx.post(f"{s.url}/invocations", json=body, headers={"Authorization": "Bearer k-1"}, timeout=60)
        assert keyed.status_code == 200, keyed.text
        assert httpx.get(f"{s.url}/ping", timeout=60).status_code == 200
    finally:
        s.stop()


# -- 6. --enable-request-id-headers and --default-chat-template-kwargs ------------------------------------
GREETS = ("{% if greeting is defined %}<{{ greeting }}|{{ tone }}>{% endif %}"
          "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def flagged(chat_model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    """A server started with both flags, its model's template writing two variables."""
    model = with_template(chat_model_dir, tmp_path_factory.mktemp("greets-model"), GREETS)
    s = start_server(engine_config(model, store=False), request_id_headers=True,
                     default_chat_template_kwargs={"greeting": "Ahoy", "tone": "plain"})  # fmt: skip
    yield s
    s.stop()


def test_answers_carry_the_request_s_id_or_a_new_one(flagged, server):
    given = httpx.post(f"{flagged.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 1},
                       headers={"X-Request-Id": "gw-42"}, timeout=60)  # fmt: skip
    assert given.headers["x-request-id"] == "gw-42"
    new = httpx.post(f"{flagged.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 1}, timeout=60)
    assert len(new.headers["x-request-id"]) == 32 and new.headers["x-request-id"] != given.headers["x-request-id"]
    body = {"messages": OPEN[:1], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{flagged.url}{CHAT}", json=body, headers={"X-Request-Id": "s-1"}, timeout=60) as r:
        assert r.headers["x-request-id"] == "s-1"  # with the stream's start
    missing = httpx.get(f"{flagged.url}/v1/nothing-here", headers={"X-Request-Id": "e-1"}, timeout=60)
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "e-1"  # errors too
    assert "x-request-id" not in httpx.get(f"{server.url}/health", timeout=60).headers  # not without the flag


def test_the_x_request_id_header_is_the_answer_s_id(server):
    """vLLM's: the header (a gateway's id) names the answer, with or without the flag, over the
    body's request_id; an empty one is none; one that cannot be an id is refused."""
    heads = {"X-Request-Id": "gw-7"}
    chat = httpx.post(f"{server.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 1, "request_id": "body-1"},
                      headers=heads, timeout=60)  # fmt: skip
    assert chat.status_code == 200 and chat.json()["id"] == "chatcmpl-gw-7", chat.text
    done = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=heads, timeout=60)
    assert done.json()["id"] == "cmpl-gw-7"
    with httpx.stream("POST", f"{server.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 2, "stream": True},
                      headers=heads, timeout=60) as r:  # fmt: skip
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-gw-7"}
    empty = httpx.post(f"{server.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 1, "request_id": "body-1"},
                       headers={"X-Request-Id": ""}, timeout=60)  # fmt: skip
    assert empty.json()["id"] == "chatcmpl-body-1"
    long = httpx.post(f"{server.url}{CHAT}", json={"messages": OPEN[:1], "max_tokens": 1},
                      headers={"X-Request-Id": "x" * 257}, timeout=60)  # fmt: skip
    assert long.status_code == 400 and long.json()["error"]["param"] == "X-Request-Id"


def test_the_server_s_template_variables_lie_under_the_request_s(flagged):
    """vLLM's --default-chat-template-kwargs: every chat (and /tokenize) renders with them; a
    request's own chat_template_kwargs win, name by name."""

    def rendered(**body) -> str:
        ids = _post(flagged, "/tokenize", messages=OPEN[:1], **body).json()["tokens"]
        return _post(flagged, "/detokenize", tokens=ids).json()["prompt"]

    assert rendered().startswith("<Ahoy|plain>[user]")
    assert rendered(chat_template_kwargs={"tone": "loud"}).startswith("<Ahoy|loud>[user]")
    plain = _post(flagged, "/tokenize", messages=OPEN[:1]).json()["count"]
    assert _post(flagged, CHAT, messages=OPEN[:1], max_tokens=1).json()["usage"]["prompt_tokens"] == plain
    answer = _post(flagged, "/v1/responses", input=OPEN[0]["content"], max_output_tokens=1, store=False).json()
    assert answer["usage"]["input_tokens"] == plain  # the Responses API's chats too


def test_serve_makes_both_flags_real(chat_model_dir, monkeypatch):
    """From the command line through serve(): the middleware and the routes' defaults."""
    from cachedattention.cli import build_parser
    from cachedattention.server import app as app_module
    from cachedattention.server.request_id import RequestIdMiddleware

    seen = {}

    class FakeServer:  # what serve() would run, without binding a port
        def __init__(self, config, loop, *_grace) -> None:
            chat = next(r for r in config.app.routes if getattr(r, "path", "") == CHAT)
            seen.update(ids=any(m.cls is RequestIdMiddleware for m in config.app.user_middleware),
                        defaults=chat.endpoint.__self__.template_defaults)  # fmt: skip
            self.started = True

        def run(self) -> None:
            pass

    monkeypatch.setattr(app_module, "_DrainingServer", FakeServer)
    # (port 0: serve() checks a port before the model loads, and 8000 may be taken here)
    argv = ["serve", str(chat_model_dir), "--kv-pool-bytes", str(4 << 20), "--port", "0", "--enable-request-id-headers",
            "--default-chat-template-kwargs", '{"enable_thinking": false}']  # fmt: skip
    assert app_module.serve(build_parser().parse_args(argv)) == 0
    assert seen == {"ids": True, "defaults": {"enable_thinking": False}}
    assert app_module.serve(build_parser().parse_args(argv[:6])) == 0
    assert seen == {"ids": False, "defaults": {}}


def test_the_server_s_template_variables_are_checked_before_the_model_loads(chat_model_dir):
    from cachedattention.server.app import create_app

    with pytest.raises(ValueError, match="may not set 'messages'"):
        create_app(engine_config(chat_model_dir, store=False), default_chat_template_kwargs={"messages": []})
