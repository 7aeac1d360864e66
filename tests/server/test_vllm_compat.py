"""Where vLLM's server documents a behaviour a client may rely on, this one behaves so: completions'
default length, refused logits processors, vLLM's value ranges, content parts
joined by lines, null content, RAG documents for the chat template, and /v1/models' cards."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest

from cachedattention import SamplingParams
from cachedattention.model.messages import ChatOptions, validate_messages
from cachedattention.server.api_error import APIError
from cachedattention.server.protocol import COMPLETION_MAX_TOKENS, parse_chat, parse_completion
from tests.server.conftest import RunningServer, engine_config, start_server, with_template

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
# writes each document's fields before the conversation, as RAG templates (Command R's, Granite's) do
DOCUMENTS = (
    "{% if documents %}{% for d in documents %}<doc {{ d.title }}>{{ d.text }}</doc>\n{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
DOCS = [{"title": "moon", "text": "The moon is made of rock."}, {"title": "sun", "text": "The sun is a star."}]


@pytest.fixture(scope="module")
def docs_server(chat_model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    """The tiny chat model behind a template that writes the request's documents."""
    model = with_template(chat_model_dir, tmp_path_factory.mktemp("docs-model"), DOCUMENTS)
    s = start_server(engine_config(model, store=False))
    yield s
    s.stop()


def _post(server: RunningServer, path: str, body: dict) -> httpx.Response:
    """As a client's JSON library may write it: NaN too (Python's does, as vLLM's server reads it)."""
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def _error_param(r: httpx.Response) -> str | None:
    assert r.status_code == 400, r.text
    return r.json()["error"]["param"]


# -- 1. completions' default length ----------------------------------------------------------------
def test_completions_default_to_16_tokens_and_chat_to_the_window():
    assert parse_completion({"prompt": "a"}, None, 1024).params.max_tokens == COMPLETION_MAX_TOKENS == 16
    assert parse_chat({"messages": HI}, None, 1024).params.max_tokens == 1024
    # the model's generation config bounds both (its max_new_tokens), as before
    assert parse_completion({"prompt": "a"}, None, 1024, defaults={"max_tokens": 3}).params.max_tokens == 3
    assert parse_completion({"prompt": "a"}, None, 1024, defaults={"max_tokens": 100}).params.max_tokens == 16
    assert parse_chat({"messages": HI}, None, 1024, defaults={"max_tokens": 100}).params.max_tokens == 100
    assert parse_completion({"prompt": "a"}, None, 8).params.max_tokens == 8  # never past the window
    asked = parse_completion({"prompt": "a", "max_tokens": 40}, None, 1024)
    assert asked.params.max_tokens == 40 and asked.max_tokens_asked == 40
    # the default is no length asked for: a long prompt is cut short by the window, not refused
    assert parse_completion({"prompt": "a"}, None, 1024).max_tokens_asked is None
    with pytest.raises(APIError, match="min_tokens"):  # above the default length, as vLLM refuses it
        parse_completion({"prompt": "a", "min_tokens": 17}, None, 1024)


def test_a_completion_without_max_tokens_answers_16_tokens_over_http(docs_server):
    r = _post(docs_server, COMP, {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"


# -- 2, 3. what this server cannot do is refused, naming the field ---------------------------------------
@pytest.mark.parametrize("path, base", [(CHAT, {"messages": HI}), (COMP, {"prompt": "hi"})])
def test_logits_processors_are_refused_by_name(docs_server, path, base):
    procs = _post(docs_server, path, {**base, "max_tokens": 2, "logits_processors": ["my.module:Processor"]})
    assert _error_param(procs) == "logits_processors"
    assert "--logits-processor-pattern" in procs.json()["error"]["message"]
    neutral = _post(docs_server, path, {**base, "max_tokens": 2, "use_beam_search": False, "logits_processors": []})
    assert neutral.status_code == 200, neutral.text


# -- 4. vLLM's value ranges ----------------------------------------------------------------------------------
def test_vllm_s_ranges_of_temperature_repetition_penalty_and_logit_bias(docs_server):
    tok = docs_server.app.state.engine_loop.engine.tokenizer
    forced = tok.encode(" moon")[0]
    body = {"prompt": "The", "max_tokens": 3, "seed": 3}
    assert _post(docs_server, COMP, {**body, "temperature": 7.5}).status_code == 200  # vLLM: any finite value >= 0
    assert _post(docs_server, COMP, {**body, "repetition_penalty": 40.0}).status_code == 200  # any value > 0
    # a bias past OpenAI's 100 is taken and acts (vLLM refuses none): the token it lifts is every token
    lifted = _post(docs_server, COMP, {**body, "temperature": 5.0, "logit_bias": {str(forced): 1000}}).json()
    assert lifted["choices"][0]["text"] == tok.decode([forced] * 3)
    for field, value in (("temperature", math.nan), ("temperature", -0.5), ("repetition_penalty", 0)):
        assert _error_param(_post(docs_server, COMP, {**body, field: value})) == field
    # a bias past float32's range would be an infinite logit: refused, as a non-finite one
    assert _error_param(_post(docs_server, COMP, {**body, "logit_bias": {str(forced): 1e39}})) == "logit_bias"
    many = _post(docs_server, COMP, {**body, "n": 17})
    assert _error_param(many) == "n" and "most choices" in many.json()["error"]["message"]


def test_sampling_params_take_any_finite_logit_bias():
    assert dict(SamplingParams(logit_bias={3: 1000.0, 4: -250}).logit_bias) == {3: 1000.0, 4: -250.0}
    for value in (math.inf, 1e39, math.nan):
        with pytest.raises(ValueError, match="logit_bias values must be finite"):
            SamplingParams(logit_bias={3: value})


# -- 5, 6. content parts and null content --------------------------------------------------------------------
def test_text_parts_are_joined_by_lines_and_null_content_is_empty():
    parts = [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    assert validate_messages([{"role": "user", "content": parts}])[0]["content"] == "A\nB"
    for role in ("system", "user", "assistant", "tool"):
        assert validate_messages([{"role": role, "content": None}])[0]["content"] == ""
    called = validate_messages([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}])
    assert called[0]["content"] == "" and called[0]["tool_calls"][0]["function"]["name"] == "f"
    with pytest.raises(ValueError, match=r"messages\[0\].content is missing"):  # no content at all: a client bug
        validate_messages([{"role": "user"}])
    with pytest.raises(ValueError, match="a string, a list of text parts or null"):
        validate_messages([{"role": "user", "content": 5}])


def test_parts_and_null_content_reach_the_prompt_as_vllm_renders_them(docs_server):
    def ids(messages: list[dict]) -> list[int]:
        r = _post(docs_server, "/tokenize", {"messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    parts = [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    assert ids([{"role": "user", "content": parts}]) == ids([{"role": "user", "content": "A\nB"}])
    nulls = [{"role": "system", "content": None}, {"role": "user", "content": None}]
    assert ids(nulls) == ids([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
    r = _post(docs_server, CHAT, {"messages": [{"role": "user", "content": None}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


# -- 7. documents -----------------------------------------------------------------------------------------------
def test_documents_reach_the_chat_template_in_chat_and_tokenize(docs_server):
    tok = docs_server.app.state.engine_loop.engine.tokenizer
    body = {"messages": HI, "documents": DOCS}
    tokens = _post(docs_server, "/tokenize", body).json()["tokens"]
    text = tok.decode(tokens, skip_special_tokens=False)
    assert text.startswith("<doc moon>The moon is made of rock.</doc>\n<doc sun>The sun is a star.</doc>\n[user] hi")
    without = _post(docs_server, "/tokenize", {"messages": HI}).json()["tokens"]
    assert tok.decode(without, skip_special_tokens=False).startswith("[user] hi")
    r = _post(docs_server, CHAT, {**body, "max_tokens": 2}).json()
    assert r["usage"]["prompt_tokens"] == len(tokens)  # the chat's prompt is the one rendered with them


@pytest.mark.parametrize(
    "documents, param",
    [("The moon is made of rock.", "documents"), ({"text": "x"}, "documents"), ([DOCS[0], "x"], "documents[1]")],
)
def test_documents_other_than_a_list_of_objects_are_refused_by_name(docs_server, documents, param):
    for path in (CHAT, "/tokenize"):
        assert _error_param(_post(docs_server, path, {"messages": HI, "documents": documents, "max_tokens": 2})) == param


def test_truncation_keeps_the_documents_a_template_writes_in_its_head(docs_server):
    """A session cut to fit the window keeps the prompt's head: with the documents written there."""
    tok = docs_server.app.state.engine_loop.engine.tokenizer
    options = ChatOptions(documents=DOCS)
    messages = validate_messages([*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}])
    prompt = tok.encode_chat(messages, options=options)
    head = tok.head_length(messages, prompt, options=options)
    assert "The sun is a star.</doc>" in tok.decode(prompt[:head], skip_special_tokens=False)


# -- 8. /v1/models -------------------------------------------------------------------------------------------------
def test_model_cards_carry_vllm_s_root_parent_and_permission(docs_server):
    card = httpx.get(f"{docs_server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["root"] == docs_server.app.state.engine_loop.engine.config.model and card["parent"] is None
    assert card["max_model_len"] == 1024 and card["object"] == "model"
    (permission,) = card["permission"]
    assert permission["id"].startswith("modelperm-") and permission["object"] == "model_permission"
    assert {k: permission[k] for k in ("allow_create_engine", "allow_sampling", "allow_logprobs",
                                       "allow_search_indices", "allow_view", "allow_fine_tuning", "organization",
                                       "group", "is_blocking")} == {  # fmt: skip
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
        "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}
    assert isinstance(permission["created"], int)


# -- vLLM's cache_salt and stop_reason -------------------------------------------------------------
@pytest.fixture(scope="module")
def store_server(chat_model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    s = start_server(engine_config(chat_model_dir, store=True, store_dir=str(tmp_path_factory.mktemp("kv"))))
    yield s
    s.stop()


def _cached(server: RunningServer, body: dict) -> int:
    r = _post(server, COMP, {"prompt": "One two three four five six seven eight nine ten eleven twelve " * 3,
                             "max_tokens": 2, "temperature": 0, **body})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_salt_keeps_tenants_apart(store_server):
    assert _cached(store_server, {"cache_salt": "a"}) == 0
    assert _cached(store_server, {"cache_salt": "a"}) > 0
    assert _cached(store_server, {"cache_salt": "b"}) == 0  # (another tenant's: the same prompt, nothing cached)
    assert _error_param(_post(store_server, COMP, {"prompt": "x", "cache_salt": ""})) == "cache_salt"
    # a session under a salt is that salt's; forgotten by naming it
    turn = {"messages": HI, "max_tokens": 2, "temperature": 0, "session_id": "t", "cache_salt": "a"}
    assert _post(store_server, CHAT, turn).status_code == 200
    assert httpx.delete(f"{store_server.url}/v1/sessions/t", params={"cache_salt": "b"}).status_code == 404
    assert httpx.delete(f"{store_server.url}/v1/sessions/t", params={"cache_salt": "a"}).status_code == 200


def test_stop_reason_names_the_stop_string_or_token(store_server):
    free = _post(store_server, COMP, {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    choice = free.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    stop = choice["text"].strip()[:3]
    by_string = _post(store_server, COMP, {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "stop": [stop]})
    assert by_string.json()["choices"][0]["stop_reason"] == stop
    body = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    ids = _post(store_server, COMP, {**body, "logprobs": 0, "return_tokens_as_token_ids": True}).json()
    token = int(ids["choices"][0]["logprobs"]["tokens"][2].removeprefix("token_id:"))
    by_token = _post(store_server, COMP, {**body, "stop_token_ids": [token]}).json()["choices"][0]
    assert by_token["finish_reason"] == "stop" and by_token["stop_reason"] == token
    chat = _post(store_server, CHAT, {"messages": HI, "max_tokens": 2, "temperature": 0}).json()["choices"][0]
    assert "stop_reason" in chat and chat["stop_reason"] is None
    with httpx.stream("POST", f"{store_server.url}{COMP}", json={"prompt": "Hello there", "max_tokens": 6,
                      "temperature": 0, "stop": [stop], "stream": True}, timeout=60) as r:  # fmt: skip
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [c["stop_reason"] for c in last] == [stop]


def test_token_id_lists_take_floats_without_a_fraction_as_ints():
    """As vLLM's `list[int]` fields (pydantic) read them: a client writing every number as a float
    sends [1.0, 2.0]; the engine gets ints, and 2.5 is still refused."""
    from cachedattention.server.responses_request import read_request
    from cachedattention.server.tokenize import detokenize

    parsed = parse_completion({"prompt": [1.0, 2.0], "stop_token_ids": [3.0], "allowed_token_ids": [4.0, 5]}, None, 64)
    assert parsed.prompt == [1, 2] and all(type(t) is int for t in parsed.prompt)
    assert parsed.params.stop_token_ids == (3,) and parsed.params.allowed_token_ids == (4, 5)
    assert all(type(t) is int for t in parsed.params.stop_token_ids + parsed.params.allowed_token_ids)
    batch = parse_completion({"prompt": [[1.0], [2.0, 3.0]]}, None, 64).batch
    assert batch == [[1], [2, 3]] and all(type(t) is int for ids in batch for t in ids)
    for body, param in (({"prompt": [1.5]}, "prompt"), ({"prompt": "a", "stop_token_ids": [2.5]}, "stop_token_ids"),
                        ({"prompt": [[1], [True]]}, "prompt[1]")):  # fmt: skip
        with pytest.raises(APIError) as e:
            parse_completion(body, None, 64)
        assert e.value.param == param

    class Decoder:
        def decode(self, ids, skip_special_tokens):
            assert all(type(t) is int for t in ids)
            return " ".join(map(str, ids))

    assert detokenize(Decoder(), {"tokens": [1.0, 2]}, 10) == {"prompt": "1 2"}
    with pytest.raises(APIError):
        detokenize(Decoder(), {"tokens": [1.5]}, 10)
    # the Responses API repeats its integer fields as integers (a typed client's int field cannot read 100.0)
    req = read_request({"input": "hi", "max_output_tokens": 100.0, "top_logprobs": 2.0}, [], False)
    assert type(req.echo["max_output_tokens"]) is int and type(req.echo["top_logprobs"]) is int
    assert (req.echo["max_output_tokens"], req.echo["top_logprobs"]) == (100, 2)
