"""OpenAI's Responses API through the official `openai` client: conversations kept on the server
(`previous_response_id`) run as sessions of the KV store, and answer as the same conversation
recomputed from scratch does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from cachedattention.server.responses import ResponsesRoutes
from cachedattention.server.responses_store import ResponseStore, StoredResponse
from tests.server.conftest import engine_config, needs_store, start_server, with_template

INSTRUCTIONS = "You answer briefly."


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def create(c: openai.OpenAI, text, previous=None, max_tokens: int = 8, **kwargs):
    return c.responses.create(model="default", input=text, previous_response_id=previous, max_output_tokens=max_tokens,
                              temperature=0, instructions=INSTRUCTIONS, **kwargs)  # fmt: skip


@needs_store
def test_a_chained_conversation_reuses_its_history_and_answers_as_recompute(store_server, reference):
    """Three turns, each sending only its new input: the answers equal a recomputed chat of the whole
    conversation, turns 2 and 3 reuse the history, and the streamed turn joins to its final text."""
    c = client(store_server.url)
    messages = [{"role": "system", "content": INSTRUCTIONS}]
    first = create(c, "Name three colors.")
    messages += [{"role": "user", "content": "Name three colors."}]
    assert first.output_text == reference(messages, 8)
    assert first.usage.input_tokens_details.cached_tokens == 0 and first.usage.output_tokens == 8
    messages.append({"role": "assistant", "content": first.output_text})
    second = create(c, [{"role": "user", "content": [{"type": "input_text", "text": "And one more?"}]}], first.id)
    messages.append({"role": "user", "content": "And one more?"})
    assert second.output_text == reference(messages, 8)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # the whole first turn
    messages.append({"role": "assistant", "content": second.output_text})

    events = list(c.responses.create(model="default", input="Why?", previous_response_id=second.id,
                                     max_output_tokens=8, temperature=0, instructions=INSTRUCTIONS, stream=True))
    messages.append({"role": "user", "content": "Why?"})
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip  (max_output_tokens reached)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert streamed == final.output_text == reference(messages, 8)
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens
    # the stored third turn continues like the others
    fourth = create(c, "Thanks.", final.id)
    messages += [{"role": "assistant", "content": final.output_text}, {"role": "user", "content": "Thanks."}]
    assert fourth.output_text == reference(messages, 8)


@needs_store
def test_instructions_are_not_carried_over_and_a_branch_answers_as_its_own_conversation(store_server, reference):
    c = client(store_server.url)
    root = create(c, "Pick a number.")
    a = c.responses.create(model="default", input="Double it.", previous_response_id=root.id, max_output_tokens=6,
                           temperature=0, instructions="You are terse.")  # fmt: skip
    b = create(c, "Halve it.", root.id, max_tokens=6)  # a second branch from the same turn
    base = [{"role": "user", "content": "Pick a number."}, {"role": "assistant", "content": root.output_text}]
    assert a.output_text == reference([{"role": "system", "content": "You are terse."}, *base,
                                       {"role": "user", "content": "Double it."}], 6)  # fmt: skip
    assert b.output_text == reference([{"role": "system", "content": INSTRUCTIONS}, *base,
                                       {"role": "user", "content": "Halve it."}], 6)  # fmt: skip
    assert b.usage.input_tokens_details.cached_tokens > 0  # the shared turn, verified token by token



@needs_store
def test_going_back_to_an_earlier_branch_reuses_it_from_the_store(chat_model_dir, reference):
    """Two branches from one turn, then the first continued: the store kept the branch the second
    left, so its whole history is reused (no device prefix cache here to serve it instead)."""
    s = start_server(engine_config(chat_model_dir, store=True, prefix_cache=False))
    try:
        c = client(s.url)
        root = create(c, "Pick a number.")
        first = create(c, "Halve it.", root.id, max_tokens=6)
        create(c, "Triple it.", root.id, max_tokens=6)  # the session's latest branch now
        back = create(c, "Once more.", first.id, max_tokens=6)
        assert back.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # all of its prompt
        messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Pick a number."},
                    {"role": "assistant", "content": root.output_text}, {"role": "user", "content": "Halve it."},
                    {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Once more."}]
        assert back.output_text == reference(messages, 6)
    finally:
        s.stop()

def test_stored_responses_are_retrieved_deleted_and_unknown_ones_are_404(server):
    c = client(server.url)
    r = create(c, "Hello there.")
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        create(c, "Go on.", r.id)
    assert e.value.body["param"] == "previous_response_id" and r.id in e.value.body["message"]
    unstored = create(c, "Hi.", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_the_response_object_echoes_the_request(server):
    c = client(server.url)
    r = c.responses.create(model="default", input="Hi.", max_output_tokens=5, temperature=0, top_p=0.5,
                           metadata={"user": "u1"}, instructions="Be kind.", user="someone")  # fmt: skip
    assert (r.object, r.instructions, r.max_output_tokens, r.temperature, r.top_p) == ("response", "Be kind.", 5, 0.0, 0.5)
    assert r.model == c.models.list().data[0].id
    assert r.metadata == {"user": "u1"} and r.user == "someone" and r.store is True
    assert r.text.format.type == "text" and r.tools == [] and r.truncation == "disabled"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "input[0].content[0]"),
        ({"background": True, "stream": True}, "background"),
        ({"background": True, "store": False}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": ""}, "input"),
        ({"truncation": "middle"}, "truncation"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {"k": "\ud800"}}, "metadata"),
        ({"user": "\udfff"}, "user"),
        ({"tools": [{"type": "function", "name": "f", "description": "\ud800"}]}, "tools"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "\ud800"}]}, "input"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"top_logprobs": "many"}, "top_logprobs"),
        # found by the input audit: empty or zero values were taken as the defaults, -1 echoed back
        ({"truncation": 0}, "truncation"), ({"truncation": ""}, "truncation"), ({"truncation": []}, "truncation"),
        ({"include": {}}, "include"), ({"include": ""}, "include"), ({"top_logprobs": -1}, "top_logprobs"),
        ({"service_tier": 5}, "service_tier"), ({"prompt_cache_key": []}, "prompt_cache_key"),
        ({"safety_identifier": {}}, "safety_identifier"), ({"stream_options": "x"}, "stream_options"),
        ({"max_tool_calls": "many"}, "max_tool_calls"), ({"max_tool_calls": 0}, "max_tool_calls"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]}, "input[0].output"),
        ({"input": [{"role": "user", "content": "x", "status": 5}]}, "input[0].status"),
        ({"input": [{"role": "user", "content": "x", "status": "done"}]}, "input[0].status"),
        ({"reasoning": "high"}, "reasoning"),
        ({"input": [{"role": "user"}]}, "input[0].content"),  # (these were 500s: found by fuzzing)
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": {"a": "b"}}]}, "input[0].content"),
        ({"input": [{"role": "assistant", "content": None}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": "x"}], "max_output_tokens": 4,
          "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "integer", "maximum": 10**400 + 1,
                                                                              "multipleOf": 0}}}}, "text.format"),
        # NaN and Infinity (which Python's JSON reads, as vLLM's server does) in what the response
        # repeats or the server stores: these were 500s (a stream carried them as bare NaN, not JSON)
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "number", "default": math.nan}}}}]}, "tools"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"maximum": math.inf}}], "stream": True}, "tools"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "f", "x": -math.inf}},
         "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "number", "default": math.nan}}}},
         "text"),
        ({"input": [{"role": "user", "content": "x", "extra": math.nan}]}, "input"),
        ({"temperature": math.nan}, "temperature"),
    ],
)  # fmt: skip
def test_what_is_not_supported_or_malformed_is_a_400_naming_the_field(server, extra, param):
    body = {"model": "default", "input": "Hi.", **extra}
    # ASCII JSON: lone surrogates travel as escapes, as a client's JSON may carry them
    r = httpx.post(f"{server.url}/v1/responses", content=json.dumps(body), timeout=60,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_fields_accepted_and_not_acted_on_are_served_when_of_their_type(server):
    body = {"model": "default", "input": "Hi.", "max_output_tokens": 2, "service_tier": "auto", "prompt_cache_key": "k",
            "safety_identifier": "u1", "stream_options": {"include_obfuscation": False}, "max_tool_calls": 3.0,
            "truncation": "disabled", "include": [], "store": False}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("completed", "incomplete")


def test_a_conversation_past_the_window_is_refused_unless_truncation_is_auto(chat_model_dir, tmp_path):
    config = replace(engine_config(chat_model_dir, store=True, store_dir=str(tmp_path)), max_model_len=160)
    srv = start_server(config)
    try:
        c = client(srv.url)
        long = "tell me more about the weather " * 12
        r = create(c, long, max_tokens=4)
        with pytest.raises(openai.BadRequestError) as e:
            create(c, long, r.id, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        ok = create(c, long, r.id, max_tokens=4, truncation="auto")
        details = ok.usage.input_tokens_details
        assert ok.truncation == "auto" and details.truncated_tokens > 0
        assert details.cached_tokens > 0  # the turns kept came from the store, at their new positions
        assert ok.usage.input_tokens + ok.usage.output_tokens <= 160
    finally:
        srv.stop()


def test_logprobs_come_with_the_text_when_included(server):
    c = client(server.url)
    r = c.responses.create(model="default", input="Count.", max_output_tokens=5, temperature=0,
                           include=["message.output_text.logprobs"], top_logprobs=2)  # fmt: skip
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 5
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)
    assert "".join(lp.token for lp in part.logprobs).strip() == part.text.strip() or part.text


def test_a_json_schema_text_format_is_held_to(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    c = client(server.url)
    r = c.responses.create(model="default", input="A number as JSON.", max_output_tokens=40, temperature=0,
                           text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}})
    assert isinstance(json.loads(r.output_text)["n"], int)


@pytest.fixture(scope="module")
def tool_server(chat_model_dir, tmp_path_factory):
    from tests.server.test_tool_calls import TEMPLATE

    srv = start_server(engine_config(with_template(chat_model_dir, tmp_path_factory.mktemp("tools"), TEMPLATE), False))
    yield srv
    srv.stop()


def test_function_calls_come_out_as_items_and_their_outputs_continue_the_conversation(tool_server):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    c = client(tool_server.url)
    # a bias towards '"' then '}' closes the random model's arguments soon (left alone it may write on for ever)
    tok = tool_server.app.state.engine_loop.engine.tokenizer
    bias = {"logit_bias": {str(tok.encode('"')[0]): 8, str(tok.encode("}")[0]): 8}}
    forced = dict(model="default", tools=tools, tool_choice="required", max_output_tokens=200, temperature=0,
                  extra_body=bias)  # fmt: skip
    r = c.responses.create(input="Weather in Paris?", **forced)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [o.type for o in r.output] == ["function_call"] and r.status == "completed"
    assert calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    nxt = c.responses.create(model="default", previous_response_id=r.id, tools=tools, max_output_tokens=6,
                             temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                    "output": "sunny, 21 C"}])  # fmt: skip
    assert nxt.output[0].type == "message" and nxt.usage.input_tokens > r.usage.input_tokens
    streamed = list(c.responses.create(input="Weather in Paris?", stream=True, **forced))
    kinds = [e.type for e in streamed]
    assert "response.output_text.delta" not in kinds and kinds[-1] == "response.completed"
    done = next(e for e in streamed if e.type == "response.function_call_arguments.done")
    assert (done.name, done.arguments) == (calls[0].name, calls[0].arguments)  # greedy: the same call


def test_items_in_the_input_become_the_conversation_they_stand_for():
    from cachedattention.server.responses_request import input_messages

    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "reasoning", "summary": []},
    ]  # fmt: skip
    out = input_messages(items)
    assert out[0] == {"role": "developer", "content": "Be brief."} and out[1] == {"role": "user", "content": "a\nb"}
    assert [c["id"] for c in out[2]["tool_calls"]] == ["c1", "c2"] and out[2]["role"] == "assistant"
    assert out[3] == {"role": "tool", "tool_call_id": "c1", "content": "one"} and len(out) == 4


def _stored(rid: str, words: int) -> StoredResponse:
    return StoredResponse({"id": rid}, [{"role": "user", "content": "w " * words}], None)


def test_the_responses_store_keeps_within_its_budget_dropping_the_least_recently_used():
    one = len(_stored("a", 100).to_json())
    store = ResponseStore(max_bytes=3 * one)
    for rid in "abc":
        assert store.put(rid, _stored(rid, 100))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("d", _stored("d", 100))
    store.check_integrity()
    assert "b" not in store and all(r in store for r in "acd") and store.evicted == 1
    assert not store.put("huge", _stored("huge", 10_000)) and "huge" not in store  # alone past the budget
    assert store.delete("a") and not store.delete("a")
    store.check_integrity()
    assert store.used_bytes <= store.max_bytes and len(store) == 2
    with pytest.raises(ValueError, match="budget"):
        ResponseStore(-1)


def test_a_server_with_no_room_for_responses_keeps_none(chat_model_dir):
    from cachedattention.cli import build_parser

    assert build_parser().parse_args(["serve", "--responses-store-bytes", "0"]).responses_store_bytes == 0
    srv = start_server(engine_config(chat_model_dir, store=False), responses_store_bytes=0)
    try:
        c = client(srv.url)
        r = create(c, "Hi.")
        assert r.output_text and r.store is True
        with pytest.raises(openai.NotFoundError):
            create(c, "More.", r.id)
    finally:
        srv.stop()


def test_shared_responses_survive_damage_and_an_unreachable_server(tmp_path, caplog):
    import torch

    from cachedattention.server.responses_store import SharedResponses
    from cachedattention.store.remote import RemoteTier
    from cachedattention.store.segment import KVLayout
    from tests.redis_server import RedisServer

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    redis = RedisServer(tmp_path)
    kept = StoredResponse({"id": "resp_1"}, [{"role": "user", "content": "hi"}], "resp_1")
    try:
        shared = SharedResponses(RemoteTier(redis.url, "responses", layout))
        assert shared.put("resp_1", kept)
        assert shared.get("resp_1") == kept and shared.get("resp_2") is None
        for damaged in (b"{not json", b'{"body": {"id": "resp_other"}, "conversation": []}', b"[1, 2]"):
            shared.tier.put_response("resp_3", damaged)
            assert shared.get("resp_3") is None  # a warning, never an error
        assert "not a stored response" in caplog.text
        assert shared.delete("resp_1") and shared.get("resp_1") is None and not shared.delete("resp_1")
        assert not list(shared.tier.client.scan_iter(match="*resp_1*"))  # nothing left behind
    finally:
        redis.stop()
    down = SharedResponses(RemoteTier(redis.url, "responses", layout, timeout_s=0.2))
    assert not down.put("resp_4", kept)  # the server is gone: not shared, nothing raised
    with pytest.raises(OSError):
        down.get("resp_4")  # the routes then serve this replica's own copy


def test_stored_responses_outlive_a_restart_in_their_file(tmp_path):
    path = tmp_path / "responses.db"
    store = ResponseStore(10_000, path)
    for rid in "abc":
        store.put(rid, _stored(rid, 10))
    store.get("a")  # the most recently used from now on
    store.delete("b")
    store.close()
    again = ResponseStore(10_000, path)
    assert again.get("a") == _stored("a", 10) and "b" not in again and "c" in again
    again.check_integrity()
    again.close()
    one = len(_stored("a", 10).to_json())
    smaller = ResponseStore(one, path)  # a smaller budget than the last run's: the least recently used go
    assert "a" in smaller and "c" not in smaller and len(smaller) == 1
    smaller.check_integrity()  # the file holds what memory holds
    smaller.close()


def test_an_unreadable_responses_file_is_set_aside_and_a_failing_one_leaves_memory_serving(tmp_path, caplog):
    path = tmp_path / "responses.db"
    path.write_bytes(b"this is not a database" * 100)
    store = ResponseStore(10_000, path)
    assert len(store) == 0 and "cannot be read" in caplog.text
    assert list(tmp_path.glob("responses.db.unreadable-*"))  # the damaged file is kept, aside
    store.put("a", _stored("a", 10))
    store._file._db.execute("INSERT INTO responses VALUES ('x', 'not json', 0)")
    store.close()
    reopened = ResponseStore(10_000, path)  # a row that is not a response is dropped, with a warning
    assert "a" in reopened and "x" not in reopened and "not a stored response" in caplog.text
    reopened.check_integrity()
    reopened._file._db.close()  # as if the disk failed underneath: memory keeps serving
    assert reopened.put("b", _stored("b", 10)) and reopened.get("b") is not None
    assert "kept in memory only" in caplog.text
    reopened.check_integrity()


@needs_store
def test_a_restarted_server_continues_a_stored_conversation_from_its_disk_tier(chat_model_dir, tmp_path, reference):
    config = engine_config(chat_model_dir, store=True, store_dir=str(tmp_path))
    srv = start_server(config)
    try:
        first = create(client(srv.url), "Name three colors.")
    finally:
        srv.stop()  # flushes the store's saves to disk
    srv = start_server(config)
    try:
        second = create(client(srv.url), "And one more?", first.id)
    finally:
        srv.stop()
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Name three colors."},
                {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And one more?"}]
    assert second.output_text == reference(messages, 8)
    assert second.usage.input_tokens_details.cached_tokens_by_tier["disk"] >= first.usage.input_tokens


def test_truncation_disabled_serves_a_conversation_whole_even_after_an_auto_branch(chat_model_dir, tmp_path,
                                                                                   reference):  # fmt: skip
    """'disabled' never cuts: not a prompt that fills most of the window (the store keeps a quarter
    of it for the answer when it may cut), nor a branch of a conversation another branch cut."""
    config = replace(engine_config(chat_model_dir, store=True, store_dir=str(tmp_path)), max_model_len=160)
    srv = start_server(config)
    try:
        c = client(srv.url)
        text = "tell me more about the weather " * 16  # about 125 tokens: past 3/4 of the window
        r = c.responses.create(model="default", input=text, max_output_tokens=4, temperature=0)
        assert r.usage.input_tokens_details.truncated_tokens == 0
        assert r.output_text == reference([{"role": "user", "content": text}], 4)
        cut = c.responses.create(model="default", input="And what about the rain and the snow? " * 3,
                                 previous_response_id=r.id, max_output_tokens=4, temperature=0, truncation="auto")
        assert cut.usage.input_tokens_details.truncated_tokens > 0  # this branch is cut...
        short = c.responses.create(model="default", input="Why?", previous_response_id=r.id, max_output_tokens=4,
                                   temperature=0)  # fmt: skip
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": r.output_text},
                    {"role": "user", "content": "Why?"}]  # fmt: skip
        assert short.usage.input_tokens_details.truncated_tokens == 0  # ...the other is not
        assert short.output_text == reference(messages, 4)
        items = [{"role": "user", "content": text}, {"role": "assistant", "content": "Sunny."},
                 {"role": "user", "content": "And what about the rain and the snow? " * 3}]  # fmt: skip
        unstored = c.responses.create(model="default", input=items, max_output_tokens=4, temperature=0,
                                      truncation="auto", store=False)  # fmt: skip
        assert unstored.usage.input_tokens_details.truncated_tokens > 0  # "auto" cuts without being stored too
        # "auto" drops the conversation's oldest items, not the newest: one too long for the window is refused
        with pytest.raises(openai.BadRequestError, match="keeping the system prompt and the newest turn"):
            c.responses.create(model="default", input=text * 2, max_output_tokens=4, truncation="auto", store=False)
    finally:
        srv.stop()


def test_an_auto_conversation_keeps_its_stored_text_bounded():
    from cachedattention.server.responses_request import trim_conversation

    turn = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a" * 100}]
    conversation = [{"role": "system", "content": "rules"}] + turn * 20
    assert trim_conversation(conversation, 1 << 20) is conversation  # within the bound: as it is
    trimmed = trim_conversation(conversation, 2000)
    assert trimmed[0]["role"] == "system" and trimmed[1]["role"] == "user"  # whole turns go, the system stays
    assert len(json.dumps(trimmed)) <= 1000 + 300 and trimmed[-2:] == turn


@needs_store
def test_with_the_remote_tier_down_responses_are_served_from_this_replica_and_not_deleted(chat_model_dir,
                                                                                          tmp_path):  # fmt: skip
    config = engine_config(chat_model_dir, store=True)
    config = replace(config, store=replace(config.store, remote_url=f"unix://{tmp_path}/no-server.sock"))
    srv = start_server(config)
    try:
        c = client(srv.url)
        r = create(c, "Hi.")
        nxt = create(c, "More.", r.id)  # this replica's own copy continues the conversation
        assert nxt.previous_response_id == r.id and c.responses.retrieve(r.id).id == r.id
        with pytest.raises(openai.InternalServerError) as e:  # a deletion that would not reach every replica
            c.responses.delete(r.id)
        assert e.value.status_code == 503 and c.responses.retrieve(r.id).id == r.id
    finally:
        srv.stop()


def test_parallel_tool_calls_false_keeps_one_call():
    from cachedattention.server.protocol import parse_chat
    from cachedattention.server.responses import _Answer
    from cachedattention.server.responses_request import read_request
    from cachedattention.server.tool_calls import HermesCalls
    from tests.server.test_tool_calls import CALL, _output

    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    two = _output(CALL + CALL.replace("Paris", "Oslo"), True)
    for parallel, n in ((True, 2), (False, 1)):
        req = read_request({"input": "Weather?", "tools": [tool], "parallel_tool_calls": parallel}, [])
        answer = _Answer("resp_1", "m", req, parse_chat(req.chat_body, None, 1024), None, HermesCalls)
        calls = [o for o in answer.output(two) if o["type"] == "function_call"]
        assert len(calls) == n and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
        assert len(answer.assistant_turn(two)["tool_calls"]) == n  # the conversation holds what was returned


def test_a_response_s_input_items_are_listed_back_a_page_at_a_time(server):
    """OpenAI's GET /v1/responses/{id}/input_items: this request's input (not the chain's), as items
    with ids and content parts, newest first by default; after/limit/order page through them."""
    c = client(server.url)
    first = create(c, "Hello there.")
    (item,) = c.responses.input_items.list(first.id).data
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert item.content[0].type == "input_text" and item.content[0].text == "Hello there."
    given = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": [{"type": "input_text", "text": "three"}]}]  # fmt: skip
    second = create(c, given, first.id)
    url = f"{server.url}/v1/responses/{second.id}/input_items"
    newest_first = httpx.get(url, timeout=30).json()
    texts = [i["content"][0]["text"] for i in newest_first["data"]]
    assert texts == ["three", "two", "one"] and not newest_first["has_more"]
    assert newest_first["data"][1]["content"][0] == {"type": "output_text", "text": "two", "annotations": []}
    page = httpx.get(url, params={"order": "asc", "limit": 2}, timeout=30).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["one", "two"] and page["has_more"]
    rest = httpx.get(url, params={"order": "asc", "after": page["last_id"]}, timeout=30).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["three"] and not rest["has_more"]
    assert rest["first_id"] == rest["last_id"] == newest_first["first_id"]
    for params, param in (({"order": "up"}, "order"), ({"limit": 0}, "limit"), ({"limit": "\u00b2"}, "limit"),
                          ({"after": "msg_x"}, "after")):
        r = httpx.get(url, params=params, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.get(f"{server.url}/v1/responses/resp_nope/input_items", timeout=30).status_code == 404


def test_responses_stored_before_input_items_were_kept_still_load():
    old = json.dumps({"body": {"id": "resp_1"}, "conversation": [{"role": "user", "content": "hi"}],
                      "session_id": None}).encode()  # fmt: skip
    assert StoredResponse.from_json(old, "resp_1").input_items == ()
    kept = replace(StoredResponse({"id": "resp_2"}, [], None), input_items=({"id": "msg_1", "type": "message"},))
    assert StoredResponse.from_json(kept.to_json(), "resp_2") == kept


def test_a_background_response_is_polled_to_its_end_and_one_can_be_cancelled(server):
    """OpenAI's background mode: the request returns at once (queued), GET shows it in progress and
    then finished, as the same request answered in the foreground; cancel stops one still running."""
    import time

    c = client(server.url)
    foreground = create(c, "Name three colors.", max_tokens=12)
    queued = create(c, "Name three colors.", max_tokens=12, background=True)
    assert queued.status in ("queued", "in_progress") and queued.background is True and not queued.output
    deadline = time.monotonic() + 60
    polled = c.responses.retrieve(queued.id)
    while polled.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        polled = c.responses.retrieve(queued.id)
    assert polled.status == foreground.status == "incomplete"  # 12 tokens: cut by max_output_tokens
    assert polled.output_text == foreground.output_text
    assert polled.usage.output_tokens == 12
    follow = create(c, "And one more?", polled.id)  # its conversation goes on like any stored response's
    assert follow.status in ("completed", "incomplete")
    long = create(c, "Count to a thousand.", max_tokens=900, background=True, extra_body={"ignore_eos": True})
    busy = httpx.post(f"{server.url}/v1/responses", json={"input": "x", "previous_response_id": long.id}, timeout=30)
    assert busy.status_code == 400 and busy.json()["error"]["param"] == "previous_response_id"  # still running
    cancelled = c.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.background is True
    assert c.responses.retrieve(long.id).status == cancelled.status
    r = httpx.post(f"{server.url}/v1/responses/{foreground.id}/cancel", timeout=30)
    assert r.status_code == 400  # only a background response can be cancelled
    assert httpx.post(f"{server.url}/v1/responses/resp_nope/cancel", timeout=30).status_code == 404


def test_a_response_still_streaming_is_neither_deleted_nor_continued_until_it_ends(server):
    """DELETE of a response still being generated was a 404, and the response was stored when it
    ended; continuing it was a 404 too. Both now say it is in progress; once it ends, both work."""
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=60,
                      json={"model": "default", "input": "Count to a thousand.", "stream": True, "temperature": 0,
                            "max_output_tokens": 200, "ignore_eos": True}) as stream:  # fmt: skip
        lines = stream.iter_lines()
        created = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
        rid = created["response"]["id"]
        gone = httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30)
        assert gone.status_code == 409 and gone.json()["error"]["code"] == "response_in_progress"
        follow = httpx.post(f"{server.url}/v1/responses", json={"input": "x", "previous_response_id": rid}, timeout=30)
        assert follow.status_code == 400 and follow.json()["error"]["param"] == "previous_response_id"
        for _ in lines:  # to its end
            pass
    assert client(server.url).responses.retrieve(rid).status == "incomplete"
    assert httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_whose_engine_request_ended_is_in_progress_until_it_is_stored(server, monkeypatch, stream):
    """Between the engine's last token and the response stored (a shared store's write may take a
    while), DELETE was a 404 and the response was stored after it; it is in progress until stored."""
    entered, release = threading.Event(), threading.Event()
    keep, seen = ResponsesRoutes._keep, {}

    async def slow_keep(self, response_id, stored):
        seen.update(routes=self, rid=response_id)
        entered.set()
        await asyncio.to_thread(release.wait, 30)
        await keep(self, response_id, stored)

    monkeypatch.setattr(ResponsesRoutes, "_keep", slow_keep)
    body = {"model": "default", "input": "Hi.", "max_output_tokens": 4, "temperature": 0, "stream": stream}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{server.url}/v1/responses", json=body, timeout=60)
        assert entered.wait(30)
        rid = seen["rid"]
        assert not seen["routes"].routes.loop.in_progress(rid)  # the engine request has ended
        gone = httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30)
        assert gone.status_code == 409 and gone.json()["error"]["code"] == "response_in_progress"
        release.set()
        assert answer.result().status_code == 200
    assert client(server.url).responses.retrieve(rid).id == rid
    assert httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30).status_code == 200
    assert not seen["routes"]._unstored


def test_a_stream_whose_client_leaves_is_no_longer_in_progress(server, monkeypatch):
    routes = []
    in_progress = ResponsesRoutes._in_progress
    monkeypatch.setattr(ResponsesRoutes, "_in_progress", lambda self, rid: routes.append(self) or in_progress(self, rid))
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=60,
                      json={"model": "default", "input": "Count.", "stream": True, "max_output_tokens": 500,
                            "ignore_eos": True}) as stream:  # fmt: skip
        lines = stream.iter_lines()
        rid = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))["response"]["id"]
        assert httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30).status_code == 409
    deadline = time.monotonic() + 30
    while routes[0]._in_progress(rid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not routes[0]._in_progress(rid) and rid not in routes[0]._unstored
    assert httpx.delete(f"{server.url}/v1/responses/{rid}", timeout=30).status_code == 404  # never stored
