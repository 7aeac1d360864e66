"""Tools in chat: definitions and tool messages reach a tool-aware chat template, <tool_call> blocks
in an answer come back as OpenAI's tool_calls (whole and streamed), and bad tool fields get 400s."""

from __future__ import annotations

import asyncio
import json
import re
import warnings

import httpx
import pytest

from cachedattention.model.messages import validate_messages
from cachedattention.outputs import RequestMetrics, RequestOutput
from cachedattention.server.tool_calls import HermesCalls, Llama3JsonCalls
from tests.server.conftest import engine_config, start_server, with_template

parse_tool_calls, plain_text_end = HermesCalls.parse, HermesCalls.plain_text_end

# Hermes-style (as Qwen2.5's): the tools in the system turn, calls in <tool_call> blocks, results as <tool_response>
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_hermes_blocks_parse_into_calls_and_anything_else_stays_text():
    content, calls = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert content == "Let me check.\n" and [c.name for c in calls] == ["get_weather"] * 2
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert parse_tool_calls(CALL)[0] is None and parse_tool_calls("\n" + CALL)[0] == "\n"  # as streamed
    unclosed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{}"}')  # stopped after the JSON
    assert unclosed[0] is None and unclosed[1][0].arguments == "{}"
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": null}</tool_call>')[1][0].arguments == "{}"
    for text in ("no calls here", "I would write <tool_call> here", "<tool_call>{\"arguments\": {}}</tool_call>"):
        assert parse_tool_calls(text) == (text, [])  # not a call: the answer stays as it was
    assert plain_text_end("Sure <tool") == len("Sure ") and plain_text_end("a <tool_call>{") == 2
    assert plain_text_end("a <b>") == len("a <b>")


@pytest.fixture(scope="module")
def tool_model_dir(chat_model_dir, tmp_path_factory):
    """The tiny chat model with a tool-aware template."""
    return with_template(chat_model_dir, tmp_path_factory.mktemp("tool-chat"), TEMPLATE)


@pytest.fixture(scope="module")
def tool_server(tool_model_dir):
    srv = start_server(engine_config(tool_model_dir, store=False))
    yield srv
    srv.stop()


def test_llm_chat_takes_tools_and_tool_messages(tool_model_dir):
    from cachedattention import LLM, SamplingParams

    llm = LLM(str(tool_model_dir))
    user = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(max_tokens=2, temperature=0)
    with_tools = llm.chat(user, params, tools=[WEATHER])[0]
    assert with_tools.prompt_token_ids == llm.tokenizer.encode_chat(user, tools=[WEATHER])
    assert len(with_tools.prompt_token_ids) > len(llm.chat(user, params)[0].prompt_token_ids)
    result = [*user, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}]  # fmt: skip
    assert "Sunny" in llm.tokenizer.decode(llm.chat(result, params, tools=[WEATHER])[0].prompt_token_ids)
    # clients send arguments as JSON text: the template gets the object (as vLLM does), as the model wrote it
    as_text = [dict(m) for m in result]
    as_text[1] = {**result[1], "tool_calls": [{**result[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}  # fmt: skip
    same = [llm.tokenizer.encode_chat(validate_messages(m), tools=[WEATHER]) for m in (as_text, result)]
    assert same[0] == same[1]
    rendered = llm.tokenizer.render_chat(validate_messages(as_text), tools=[WEATHER])
    assert '"arguments": {"city": "Paris"}' in rendered
    empty = [*user, {"role": "assistant", "content": "Hi.", "tool_calls": []}, *user]  # no calls, as vLLM takes it
    assert llm.chat(empty, params)[0].finished
    with pytest.raises(ValueError, match="tools"):
        llm.chat(user, params, tools=[{"type": "function"}])
    llm.close()


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"max_tokens": 4, "temperature": 0, **body}, timeout=60)


def test_tools_and_tool_messages_reach_the_template_and_history_is_reused(tool_server):
    engine = tool_server.app.state.engine_loop.engine
    user = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = _chat(tool_server.url, messages=user).json()
    asked = _chat(tool_server.url, messages=user, tools=[WEATHER]).json()
    want = len(engine.tokenizer.encode_chat(user, tools=[WEATHER]))
    assert asked["usage"]["prompt_tokens"] == want > plain["usage"]["prompt_tokens"] + 20  # the tools are in it
    called = [*user, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip
    r = _chat(tool_server.url, messages=called, tools=[WEATHER])
    assert r.status_code == 200, r.text
    body = r.json()
    rendered = engine.tokenizer.render_chat(validate_messages(called), tools=[WEATHER])
    assert "<tool_response>\nSunny, 21 C" in rendered and '"arguments": {"city": "Paris"}' in rendered
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(rendered))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= want - 16  # the first turn's prefix, reused
    none = _chat(tool_server.url, messages=user, tools=[WEATHER], tool_choice="none").json()
    assert none["usage"]["prompt_tokens"] == want  # tool_choice none: described, not parsed


BAD_TOOLS = [
    ("a function not among the tools", {"tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ("a tool_choice of another kind", {"tool_choice": "always"}, "tool_choice"),
    ("required with json_object", {"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("a tool given twice", {"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ("required beside a structured answer", {"tool_choice": "required", "response_format": {"type": "text"},
                                             "guided_choice": ["a"]}, "guided_choice"),
    ("a tool without a name", {"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ("a tool name with a space", {"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0]"),
]


@pytest.mark.parametrize("name,extra,param", BAD_TOOLS, ids=[b[0] for b in BAD_TOOLS])
def test_bad_tool_fields_get_400_naming_the_field(tool_server, name, extra, param):
    r = _chat(tool_server.url, messages=[{"role": "user", "content": "hi"}], **{"tools": [WEATHER], **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_bad_tool_call_in_the_history_gets_400_naming_it(tool_server):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]
    r = _chat(tool_server.url, messages=msgs, tools=[WEATHER])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.name"


def _output(text: str, finished: bool) -> RequestOutput:
    return RequestOutput("r", [1, 2], [5] * len(text), text, finished, "stop" if finished else None,
                         RequestMetrics(0.0, prompt_tokens=2))  # fmt: skip


def test_answers_with_calls_come_back_as_tool_calls_whole_and_streamed():
    """The server's own formatting and streaming over outputs as the engine hands them out."""
    from cachedattention.server.app import OpenAIRoutes, _Format
    from cachedattention.server.engine_loop import RequestStream
    from cachedattention.server.protocol import parse_chat

    answer = "Checking. " + CALL
    fmt = _Format("c", "m", True, False, tool_calls=True)
    msg = fmt.full([_output(answer, True)])["choices"][0]
    assert msg["finish_reason"] == "tool_calls" and msg["message"]["content"] == "Checking. "
    assert msg["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    off = _Format("c", "m", True, False, tool_calls=False).full([_output(answer, True)])["choices"][0]
    assert off["message"] == {"role": "assistant", "content": answer} and off["finish_reason"] == "stop"

    async def stream() -> list[dict]:
        parsed = parse_chat({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "stream": True},
                            None, 1024)  # fmt: skip
        source = RequestStream("c", asyncio.get_running_loop())
        for end in (3, 10, 14, 30, len(answer)):  # text grows as tokens come; the call arrives in pieces
            source.put(_output(answer[:end], end == len(answer)))
        routes = OpenAIRoutes(None, None, "m", 1024)
        return [json.loads(e[6:]) for e in [e async for e in routes._events([source], fmt, parsed)] if "{" in e]

    events = asyncio.run(stream())
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking. "  # no piece of the call as text
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


# as Qwen3's templates: a conversation without a user message is refused
GUARDED = (
    "{%- set ns = namespace(user=false) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.user = true %}{%- endif %}{%- endfor %}"
    "{%- if not ns.user %}{{- raise_exception('No user query found in messages.') }}{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_template_that_refuses_a_lone_system_turn_still_serves_sessions(chat_model_dir, tmp_path):
    """The kept head is measured by rendering the system turn with a stand-in user message after it,
    so a template refusing a lone system turn (Qwen3's) still keeps it."""
    path = with_template(chat_model_dir, tmp_path / "guarded", GUARDED)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    srv = start_server(engine_config(path, store=False))
    try:
        r = _chat(srv.url, messages=msgs, session_id="guarded")
        assert r.status_code == 200, r.text
        tok = srv.app.state.engine_loop.engine.tokenizer
        prompt = tok.encode_chat(msgs)
        head = tok.decode(prompt[: tok.head_length(msgs, prompt)], skip_special_tokens=False)
        assert head == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"  # (its {%- takes the newline)
        assert _chat(srv.url, messages=msgs[:1]).status_code == 400  # the template's own refusal: the client's
    finally:
        srv.stop()


def test_the_forced_call_automaton_takes_one_call_of_an_allowed_function():
    from cachedattention.engine.tool_choice import tool_call_automaton

    auto = tool_call_automaton(["get_weather", "get_time"])

    def complete(text: str) -> bool:
        state = auto.advance(auto.start, text.encode())
        return state is not None and auto.is_done(state)

    assert complete(CALL.replace("Paris", "Zürich"))
    assert complete('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    for wrong in ('<tool_call>\n{"name": "get_date", "arguments": {}}\n</tool_call>',  # not a given function
                  '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',  # arguments not an object
                  "Sure! " + CALL):  # text first  # fmt: skip
        assert auto.advance(auto.start, wrong.encode()) is None or not complete(wrong)


def test_a_forced_call_s_arguments_follow_the_function_s_parameters_schema():
    from cachedattention.engine.tool_choice import tool_call_automaton

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    auto = tool_call_automaton(["get_weather", "get_time"], [json.dumps(city), ""])
    head = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert auto.is_done(auto.advance(auto.start, CALL.encode()))
    for wrong in ('{"town": "Paris"}', '{"city": 3}', "{}"):  # another key, another type, a required key missing
        state = auto.advance(auto.start, (head + wrong + "}\n</tool_call>").encode())
        assert state is None or not auto.is_done(state), wrong
    free = '<tool_call>\n{"name": "get_time", "arguments": {"zone": [1]}}\n</tool_call>'  # no schema: any object
    assert auto.is_done(auto.advance(auto.start, free.encode()))
    for loose in ({"title": "Args"}, {"type": ["object", "number"]}):  # arguments are an object all the same
        auto = tool_call_automaton(["f"], [json.dumps(loose)])
        assert auto.advance(auto.start, b'<tool_call>\n{"name": "f", "arguments": 5') is None
        assert auto.is_done(auto.advance(auto.start, b'<tool_call>\n{"name": "f", "arguments": {"x": 5}}\n</tool_call>'))
    with pytest.raises(ValueError, match="must describe an object"):
        tool_call_automaton(["f"], ['{"type": "string"}'])


def test_a_forced_call_of_a_strict_function_needs_a_schema_it_can_be_held_to(tool_server):
    unit = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]}
    fn = {"type": "function", "function": {"name": "temperature", "parameters": unit, "strict": True}}
    body = {"messages": [{"role": "user", "content": "Temperature?"}], "tools": [fn], "tool_choice": "required",
            "max_tokens": 64}  # fmt: skip
    r = _chat(tool_server.url, **body).json()["choices"][0]
    args = json.loads(r["message"]["tool_calls"][0]["function"]["arguments"])
    assert r["finish_reason"] == "tool_calls" and args in ({"unit": "celsius"}, {"unit": "fahrenheit"})
    ranged = {"type": "object", "properties": {"n": {"type": "array", "uniqueItems": True}}}
    strict = {"type": "function", "function": {"name": "count", "parameters": ranged, "strict": True}}
    r = _chat(tool_server.url, **{**body, "tools": [strict]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"
    assert "'uniqueItems' is not supported" in r.json()["error"]["message"]
    loose = {"type": "function", "function": {"name": "count", "parameters": ranged}}  # best effort: any object
    close = tool_server.app.state.engine_loop.engine.tokenizer.encode("}")[0]
    r = _chat(tool_server.url, **{**body, "tools": [loose], "logit_bias": {str(close): 30}}).json()["choices"][0]
    assert isinstance(json.loads(r["message"]["tool_calls"][0]["function"]["arguments"]), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_required_or_named_tool_choice_makes_the_answer_a_call(tool_server, choice):
    """Even a random-weight model (which left alone writes anything) answers with one call of an
    allowed function, arguments a JSON object; streamed, the same call comes as a delta. (A bias
    towards "}" makes it close the arguments at once: left alone it may write a string for ever.)"""
    time_fn = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    close = tool_server.app.state.engine_loop.engine.tokenizer.encode("}")[0]
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER, time_fn],
            "tool_choice": choice, "max_tokens": 200, "logit_bias": {str(close): 30}}  # fmt: skip
    r = _chat(tool_server.url, **body).json()
    call = r["choices"][0]["message"]["tool_calls"][0]["function"]
    finish = "tool_calls" if choice == "required" else "stop"  # as OpenAI: a named function finishes with stop
    assert r["choices"][0]["finish_reason"] == finish and r["choices"][0]["message"]["content"] is None
    assert call["name"] in (("get_weather", "get_time") if choice == "required" else ("get_time",))
    assert isinstance(json.loads(call["arguments"]), dict)
    with httpx.stream("POST", f"{tool_server.url}/v1/chat/completions", timeout=60,
                      json={"max_tokens": 200, "temperature": 0, **body, "stream": True}) as s:  # fmt: skip
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    streamed = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"] for c in streamed] == [call]  # greedy: the same call
    assert events[-1]["choices"][0]["finish_reason"] == finish


def test_guided_fallback_tries_only_tokens_with_an_allowed_first_byte(embedded_llm):
    """In a call's fixed text one byte is allowed next: the fallback (none of the 256 most likely
    tokens fits) looks among the tokens starting with it, not the whole vocabulary."""
    import torch

    from cachedattention import SamplingParams
    from cachedattention.engine.guided import GuidedConstraint
    from cachedattention.engine.tool_choice import tool_call_automaton

    tok = embedded_llm.tokenizer
    looked: list[int] = []

    def token_bytes(t: int) -> bytes:
        looked.append(t)
        return tok.token_bytes(t)

    rule = GuidedConstraint(tool_call_automaton(["get_time"]), token_bytes, tok.is_special, (), tok.tokens_by_first_byte)
    row = torch.randn(len(tok.hf), generator=torch.Generator().manual_seed(0))
    masked = rule.mask(row)
    allowed = masked.isfinite().nonzero().flatten().tolist()
    assert allowed and all(b"<tool_call>".startswith(tok.token_bytes(t)[:11]) for t in allowed)
    assert len(looked) < 256 + len(tok.tokens_by_first_byte()[ord("<")]) + 1 < len(tok.hf) // 10
    assert SamplingParams(tool_call_names="get_time").tool_call_names == ("get_time",)  # one name, not letters


# as Llama 3.1's: the tools in the first user turn, calls written as bare JSON, results as "ipython"
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>ipython\n{{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n"
    "{%- if tools and loop.first %}Functions: {% for t in tools %}{{ t | tojson }} {% endfor %}\n{%- endif %}"
    "{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_llama3_json_calls_are_read_from_an_answer_that_is_nothing_but_calls():
    parse, shown = Llama3JsonCalls.parse, Llama3JsonCalls.plain_text_end
    content, calls = parse(' {"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    two = parse('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"x": 1}}')[1]
    assert [(c.name, c.arguments) for c in two] == [("f", "{}"), ("g", '{"x": 1}')]
    assert parse('{"name": "f", "arguments": "{\\"x\\": 1}"}')[1][0].arguments == '{"x": 1}'  # its text, as sent
    for text in ("The weather is fine.", '{"name": "f", "parameters": {', '{"city": "Paris"}',
                 '{"name": "Alice", "age": 30}', '{"name": "f", "parameters": "not json"}',
                 'Sure: {"name": "f", "parameters": {}}', '{"name": "f"} trailing words'):  # fmt: skip
        assert parse(text) == (text, [])  # not calls: the answer stays as it was
    assert shown("") == shown("  ") == shown(' {"na') == shown("<|pyth") == 0  # it may still be a call: held
    assert shown("Sure, ") == len("Sure, ")  # a call starts the answer or there is none


def _forced_call_whole_and_streamed(srv) -> dict:
    """tool_choice "required" from the server's random model: one call of get_weather, returned as
    tool_calls whole, and streamed as that same call with no text."""
    tok = srv.app.state.engine_loop.engine.tokenizer
    bias = {str(tok.encode('"')[0]): 8, str(tok.encode("}")[0]): 8}  # a random model then closes its strings
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "tool_choice": "required",
            "max_tokens": 200, "temperature": 0, "logit_bias": bias}  # fmt: skip
    r = _chat(srv.url, **body).json()["choices"][0]
    call = r["message"]["tool_calls"][0]["function"]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"]), dict)
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert not "".join(d.get("content") or "" for d in deltas)  # none of the call streamed as text
    assert [c["function"] for d in deltas for c in d.get("tool_calls", [])] == [call]
    return call


def test_a_forced_call_in_llama3_form_is_written_and_read_back(tool_model_dir, tmp_path):
    """tool_choice "required" with --tool-call-parser llama3_json: the answer is one Llama 3 JSON
    call (even from a random-weight model), returned as tool_calls, whole and streamed."""
    from cachedattention.engine.tool_choice import tool_call_automaton

    auto = tool_call_automaton(["f"], [], "llama3_json")
    assert auto.is_done(auto.advance(auto.start, b'{"name": "f", "parameters": {"x": 5}}'))
    assert auto.advance(auto.start, b"<tool_call>") is None  # not the Hermes form
    srv = start_server(engine_config(with_template(tool_model_dir, tmp_path / "llama3", LLAMA3_TEMPLATE), False),
                       tool_call_format="llama3_json")  # fmt: skip
    try:
        call = _forced_call_whole_and_streamed(srv)
        # the call and its result go back into the conversation as the template writes them
        history = [{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                          "function": call}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
        again = _chat(srv.url, messages=history, tools=[WEATHER], max_tokens=3, temperature=0)
        assert again.status_code == 200, again.text
    finally:
        srv.stop()


def test_mistral_calls_are_read_in_both_of_its_forms():
    from cachedattention.server.tool_calls import MistralCalls

    parse, shown = MistralCalls.parse, MistralCalls.plain_text_end
    content, calls = parse('Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                           '{"name": "f", "arguments": {}}]')  # fmt: skip
    assert content == "Checking. " and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("f", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # what Mistral's templates accept
    later = parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]f{}')  # tokenizer v11 and later
    assert later[0] is None and [(c.name, c.arguments) for c in later[1]] == [("get_weather", '{"city": "Oslo"}'),
                                                                              ("f", "{}")]  # fmt: skip
    for text in ("No calls here.", "[TOOL_CALLS] not json", '[TOOL_CALLS][{"city": "Paris"}]',
                 '[TOOL_CALLS]{"name": "f"}', "[TOOL_CALLS]f{} trailing", '[TOOL_CALLS][{"name": "f", "arguments": 3}]'):
        assert parse(text) == (text, [])  # not calls: the answer stays as it was
    assert shown("Sure [TOOL_") == len("Sure ") and shown("a [TOOL_CALLS][") == 2 and shown("a [b]") == 5


def test_a_forced_call_in_mistral_form_is_written_and_read_back(tool_model_dir, tmp_path):
    """tool_choice "required" with --tool-call-parser mistral: the answer is one [TOOL_CALLS] array
    (even from a random-weight model), returned as tool_calls with Mistral's 9-character ids; a
    request whose calls are read keeps special tokens in its text (the tag is one in Mistral's
    tokenizers), while the EOS that ends it stays out."""
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.protocol import parse_chat

    auto = tool_call_automaton(["f"], [], "mistral")
    assert auto.is_done(auto.advance(auto.start, b'[TOOL_CALLS][{"name": "f", "arguments": {"x": 5}}]'))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]}
    assert not parse_chat(body, None, 1024, tool_format="mistral").params.skip_special_tokens
    assert parse_chat(body, None, 1024, tool_format="hermes").params.skip_special_tokens
    assert parse_chat({**body, "tool_choice": "none"}, None, 1024, tool_format="mistral").params.skip_special_tokens
    srv = start_server(engine_config(tool_model_dir, False), tool_call_format="mistral")
    try:
        tok = srv.app.state.engine_loop.engine.tokenizer
        bias = {str(tok.encode('"')[0]): 8, str(tok.encode("}")[0]): 8}  # a random model then closes its strings
        forced = {**body, "tool_choice": "required", "max_tokens": 200, "temperature": 0, "logit_bias": bias}
        r = _chat(srv.url, **forced).json()["choices"][0]
        (call,) = r["message"]["tool_calls"]
        assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
        assert call["function"]["name"] == "get_weather" and len(call["id"]) == 9 and call["id"].isalnum()
        plain = _chat(srv.url, **body, max_tokens=4, temperature=0).json()["choices"][0]["message"]
        assert "<|im_end|>" not in (plain["content"] or "")
    finally:
        srv.stop()


def test_long_call_ids_are_cut_to_mistral_s_nine_characters():
    from cachedattention.server.protocol import parse_chat

    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0123456789abcdef", "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "sunny"}]  # fmt: skip
    mistral = parse_chat({"messages": history, "tools": [WEATHER]}, None, 1024, tool_format="mistral").messages
    assert mistral[1]["tool_calls"][0]["id"] == mistral[2]["tool_call_id"] == "789abcdef"
    hermes = parse_chat({"messages": history, "tools": [WEATHER]}, None, 1024, tool_format="hermes").messages
    assert hermes[1]["tool_calls"][0]["id"] == "call_0123456789abcdef"  # other formats keep them


def test_pythonic_calls_are_read_from_an_answer_that_is_a_python_list_of_calls():
    from cachedattention.server.tool_calls import PythonicCalls

    parse, shown = PythonicCalls.parse, PythonicCalls.plain_text_end
    content, calls = parse('[get_weather(city="San Francisco", days=3, metric=True), web.search(q=\'x\', n=-2)]')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "San Francisco", "days": 3, "metric": True}), ("web.search", {"q": "x", "n": -2})]
    nested = parse('<|python_start|>[f(a=[1, 2.5, None], b={"k": (true, null)}, **{"c": false})]<|python_end|>')[1]
    assert json.loads(nested[0].arguments) == {"a": [1, 2.5, None], "b": {"k": [True, None]}, "c": False}
    assert parse("[f()]")[1][0].arguments == "{}"
    for text in ("The weather is fine.", "[f(city=", "[1, 2]", "[f(x)]", "[f(x=g())]", "[f(x=y)]", "f(x=1)",
                 "Sure: [f(x=1)]", "[f(**[1])]", "[(lambda: 1)()]", "[f(x={1: 2})]"):  # fmt: skip
        assert parse(text) == (text, []), text  # not calls: the answer stays as it was
    assert shown("") == shown(" [get_w") == shown("<|python_") == 0  # it may still be a call: held
    assert shown("Sure, ") == len("Sure, ")
    # as JSON would hold them: surrogate pairs joined, a lone one or an infinite number is no call
    assert json.loads(parse('[f(s="\\ud83d\\ude00")]')[1][0].arguments) == {"s": "\U0001f600"}
    for text in ('[f(s="\\ud83d")]', "[f(x=1e999)]", "[" + "-" * 6000 + "]"):  # the last: too complex to parse
        assert parse(text) == (text, [])
    # a forced call's **{...} is JSON: its escapes are JSON's
    with warnings.catch_warnings(record=True) as caught:  # ("\/" is no Python escape: not a warning of ours)
        warnings.simplefilter("always")
        spread = parse('[f(**{"url": "http:\\/\\/x", "s": "\\ud83d\\ude00", "n": null})]')[1][0]
    assert json.loads(spread.arguments) == {"url": "http://x", "s": "\U0001f600", "n": None} and not caught


def test_a_forced_call_in_pythonic_form_is_written_and_read_back(tool_model_dir):
    """tool_choice "required" with --tool-call-parser pythonic: the answer is [NAME(**{...})], its
    arguments held to the schema, returned as tool_calls; a function name Python cannot call is refused."""
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.api_error import APIError
    from cachedattention.server.protocol import parse_chat
    from cachedattention.server.tool_calls import PythonicCalls

    auto = tool_call_automaton(["get_weather"], [WEATHER["function"]["parameters"]], "pythonic")
    written = b'[get_weather(**{"city": "Paris"})]'
    assert auto.is_done(auto.advance(auto.start, written))
    assert auto.advance(auto.start, b'[get_weather(**{"city": 5') is None  # the schema holds
    assert json.loads(PythonicCalls.parse(written.decode())[1][0].arguments) == {"city": "Paris"}
    for name in ("get-weather", "import"):  # not an identifier (OpenAI's names allow -); a keyword
        tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [tool], "tool_choice": "required"}
        with pytest.raises(APIError, match="cannot be written as a Python call") as refused:
            parse_chat(body, None, 1024, tool_format="pythonic")
        assert refused.value.status == 400 and refused.value.body()["error"]["param"] == "tool_choice"
    srv = start_server(engine_config(tool_model_dir, False), tool_call_format="pythonic")
    try:
        _forced_call_whole_and_streamed(srv)
    finally:
        srv.stop()


def test_granite_and_phi4_mini_calls_are_read_from_their_tagged_arrays():
    from cachedattention.server.tool_calls import GraniteCalls, Phi4MiniCalls

    granite = GraniteCalls.parse('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                                 '{"name": "f", "arguments": {}}]')  # fmt: skip
    assert granite[0] is None and [(c.name, c.arguments) for c in granite[1]] == [
        ("get_weather", '{"city": "Paris"}'), ("f", "{}")]
    assert GraniteCalls.parse(' <tool_call> [{"name": "f", "arguments": {"x": 1}}]')[1][0].arguments == '{"x": 1}'
    assert GraniteCalls.parse('[{"name": "f", "arguments": {}}]')[1][0].name == "f"  # without its tag too, as vLLM
    phi = Phi4MiniCalls.parse('functools[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}]')
    assert phi[0] is None and json.loads(phi[1][0].arguments) == {"city": "Paris", "days": [1, 2]}
    # the text before the tag is content, whole as streamed (plain_text_end shows it)
    assert Phi4MiniCalls.parse('Sure. functools[{"name": "f", "arguments": {}}]')[0] == "Sure. "
    for parse, text in ((GraniteCalls.parse, 'Sure: <|tool_call|>[{"name": "f", "arguments": {}}]'),
                        (GraniteCalls.parse, "<|tool_call|>[{\"name\": \"f\"}]"),
                        (Phi4MiniCalls.parse, "functools[not json]"), (Phi4MiniCalls.parse, "The weather is fine.")):  # fmt: skip
        assert parse(text) == (text, []), text
    assert GraniteCalls.plain_text_end(" <|tool") == GraniteCalls.plain_text_end("<tool_call>[") == 0
    assert GraniteCalls.plain_text_end('[{"na') == 0
    assert GraniteCalls.plain_text_end("Sure.") == len("Sure.")
    assert Phi4MiniCalls.plain_text_end("Let me check. functo") == len("Let me check. ")


@pytest.mark.parametrize("form, written", [
    ("granite", b'<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ("phi4_mini_json", b'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
])  # fmt: skip
def test_forced_calls_in_granite_and_phi4_mini_forms_read_back(form, written):
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.protocol import parse_chat
    from cachedattention.server.tool_calls import tool_call_parser

    auto = tool_call_automaton(["get_weather"], [WEATHER["function"]["parameters"]], form)
    assert auto.is_done(auto.advance(auto.start, written))
    assert auto.advance(auto.start, written.replace(b'"Paris"', b"5")) is None  # the schema holds
    assert json.loads(tool_call_parser(form).parse(written.decode())[1][0].arguments) == {"city": "Paris"}
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]}
    assert parse_chat(body, None, 1024, tool_format=form).params.skip_special_tokens == (form != "granite")


def test_qwen3_coder_calls_are_typed_by_the_request_s_function_schema():
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.tool_calls import Qwen3CoderCalls, for_request, tool_call_parser

    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "score": {"type": "number"},
        "exact": {"type": "boolean"}, "filters": {"type": "object"}, "tags": {"type": "array"}}}}}]  # fmt: skip
    parser = for_request(tool_call_parser("qwen3_coder"), tools)
    answer = ("Let me look.\n<tool_call>\n<function=search>\n<parameter=query>\n42\n</parameter>\n"
              "<parameter=limit>\n5\n</parameter>\n<parameter=score>\n0.5\n</parameter>\n<parameter=exact>\nTrue\n"
              "</parameter>\n<parameter=filters>\n{\"lang\": \"en\"}\n</parameter>\n<parameter=tags>\n[1, 2]\n"
              "<parameter=other>\nnull\n</function>\n</tool_call>")  # fmt: skip
    content, calls = parser.parse(answer)
    assert content == "Let me look.\n" and calls[0].name == "search"
    assert json.loads(calls[0].arguments) == {"query": "42", "limit": 5, "score": 0.5, "exact": True,
                                              "filters": {"lang": "en"}, "tags": [1, 2], "other": None}  # fmt: skip
    untyped = Qwen3CoderCalls().parse("<tool_call><function=f><parameter=n>7</parameter></function></tool_call>")[1]
    assert json.loads(untyped[0].arguments) == {"n": "7"}  # without its schema a value is a string
    bad_int = parser.parse("<tool_call><function=search><parameter=limit>many</parameter></function></tool_call>")[1]
    assert json.loads(bad_int[0].arguments) == {"limit": "many"}  # what does not read as its type stays text
    for text in ("No tools needed.", "<tool_call>\nnot a function\n</tool_call>",
                 "<tool_call><function=><parameter=a>1</parameter></function></tool_call>"):  # no name
        assert parser.parse(text) == (text, [])
    assert parser.plain_text_end("Sure. <tool_") == parser.plain_text_end("Sure. <func") == len("Sure. ")
    # as vLLM's parser: every function of a block, a bare <function=, the calls after a tag the text mentions
    two = parser.parse("<tool_call><function=search><parameter=limit>1</parameter></function>"
                       "<function=search><parameter=limit>2</parameter></function></tool_call>")[1]  # fmt: skip
    assert [json.loads(c.arguments)["limit"] for c in two] == [1, 2]
    assert parser.parse("<function=search><parameter=limit>3</parameter></function>")[1][0].arguments == '{"limit": 3}'
    mention = parser.parse("I answer with <tool_call> blocks.\n<tool_call><function=search></function></tool_call>")
    assert mention[0] == "I answer with " and mention[1][0].name == "search"
    assert json.loads(parser.parse("<function=search><parameter=score>inf</parameter></function>")[1][0].arguments) \
        == {"score": "inf"}  # JSON holds no infinity: the text as written
    for odd in ({"a": True}, {"a": "integer"}, ["a"], "x", None):  # schemas of odd shapes: values stay strings
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": odd}}}
        bound = for_request(tool_call_parser("qwen3_coder"), [tool, "not a tool", {"function": None}])
        assert bound.parse("<function=f><parameter=a>1</parameter></function>")[1][0].arguments == '{"a": "1"}'
    # a forced call is written as Hermes' JSON block, which this parser reads back
    auto = tool_call_automaton(["search"], [tools[0]["function"]["parameters"]], "qwen3_coder")
    forced = b'<tool_call>\n{"name": "search", "arguments": {"query": "x", "limit": 2}}\n</tool_call>'
    assert auto.is_done(auto.advance(auto.start, forced))
    assert json.loads(parser.parse(forced.decode())[1][0].arguments) == {"query": "x", "limit": 2}


def test_qwen3_coder_over_http_reads_the_request_s_types(tool_model_dir):
    """A server started with qwen3_coder: an answer held (by a regex) to Qwen3-Coder's XML call comes
    back typed by that request's tools, whole and streamed; a forced call too."""
    xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"  # fmt: skip
    _typed_call_over_http(tool_model_dir, "qwen3_coder", xml, {"city": "Paris", "days": 3})


def _typed_call_over_http(tool_model_dir, form: str, answer: str, arguments: dict) -> None:
    """A server started with `form`: an answer held (by a regex) to `answer`, a call of get_weather
    (city a string, days an integer), comes back with these `arguments`, whole and streamed; a
    forced call too."""
    srv = start_server(engine_config(tool_model_dir, False), tool_call_format=form)
    counted = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}  # fmt: skip
    try:
        body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [counted], "max_tokens": 120,
                "temperature": 0, "structured_outputs": {"regex": re.escape(answer)}}  # fmt: skip
        r = _chat(srv.url, **body).json()["choices"][0]
        call = r["message"]["tool_calls"][0]["function"]
        assert r["finish_reason"] == "tool_calls" and json.loads(call["arguments"]) == arguments
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert [c["function"] for d in deltas for c in d.get("tool_calls", [])] == [call]
        _forced_call_whole_and_streamed(srv)
    finally:
        srv.stop()


def test_tool_choice_none_renders_without_the_tools_when_the_server_says_so():
    from cachedattention.server.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "tool_choice": "none"}
    kept = parse_chat(body, None, 512)
    assert kept.tools and not kept.parse_tool_calls  # (vLLM's default: described, the answer read as text)
    dropped = parse_chat(body, None, 512, exclude_tools_when_none=True)
    assert dropped.tools is None and not dropped.parse_tool_calls
    assert parse_chat({**body, "tool_choice": "auto"}, None, 512, exclude_tools_when_none=True).tools


def test_glm45_calls_are_read_as_vllm_s_glm45_parser_reads_them():
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.tool_calls import for_request, tool_call_parser

    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "filters": {"type": "object"}}}}}]  # fmt: skip
    parser = for_request(tool_call_parser("glm45"), tools)
    assert tool_call_parser("glm47") is tool_call_parser("glm45")
    answer = ("Let me look.<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>42</arg_value>\n"
              "<arg_key>limit</arg_key>\n<arg_value>5</arg_value>\n<arg_key>filters</arg_key>\n"
              "<arg_value>{\"lang\": \"en\"}</arg_value>\n<arg_key>other</arg_key><arg_value>['a', 1]</arg_value>\n"
              "</tool_call><tool_call>search<arg_key>query</arg_key><arg_value> two </arg_value></tool_call>")  # fmt: skip
    content, calls = parser.parse(answer)
    assert content == "Let me look." and [c.name for c in calls] == ["search", "search"]
    # the string parameter as written, the others as JSON or a Python literal; GLM-4.7's name without a newline
    assert json.loads(calls[0].arguments) == {"query": "42", "limit": 5, "filters": {"lang": "en"}, "other": ["a", 1]}
    assert json.loads(calls[1].arguments) == {"query": "two"}
    unknown = parser.parse("<tool_call>f\n<arg_key>a</arg_key><arg_value>not json</arg_value></tool_call>")[1]
    assert json.loads(unknown[0].arguments) == {"a": "not json"}
    # from a review: a block never closed (cut by max_tokens, or a tag the text mentions) stays text, as
    # vLLM's; a parameter whose schema names no type (pydantic's Optional) is read as JSON; NaN and
    # infinity, which JSON does not hold, stay as written
    for text in ("No tools needed.", "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
                 "<tool_call>search\n<arg_key>limit</arg_key><arg_value>3",
                 "Models emit a <tool_call> tag when they call a function."):  # fmt: skip
        assert parser.parse(text) == (text, [])
    loose = for_request(tool_call_parser("glm45"), [{"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"n": {"description": "a count"},
                                         "u": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}])  # fmt: skip
    odd = loose.parse("<tool_call>g\n<arg_key>n</arg_key><arg_value>5</arg_value><arg_key>u</arg_key><arg_value>7"
                      "</arg_value><arg_key>z</arg_key><arg_value>NaN</arg_value><arg_key>w</arg_key><arg_value>1e999"
                      "</arg_value></tool_call>")[1]  # fmt: skip
    assert odd[0].arguments == '{"n": 5, "u": 7, "z": "NaN", "w": "1e999"}'
    assert parser.plain_text_end("Sure. <tool_") == len("Sure. ")
    auto = tool_call_automaton(["search"], [tools[0]["function"]["parameters"]], "glm45")
    forced = b'<tool_call>\n{"name": "search", "arguments": {"query": "x", "limit": 2}}\n</tool_call>'
    assert auto.is_done(auto.advance(auto.start, forced))
    assert json.loads(parser.parse(forced.decode())[1][0].arguments) == {"query": "x", "limit": 2}


def test_seed_oss_calls_are_qwen3_coder_s_in_seed_tags():
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.tool_calls import for_request, tool_call_parser

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}}}}}]  # fmt: skip
    parser = for_request(tool_call_parser("seed_oss"), tools)
    content, calls = parser.parse("Sure.<seed:tool_call>\n<function=f>\n<parameter=n>\n7\n</parameter>\n</function>\n"
                                  "</seed:tool_call>")  # fmt: skip
    assert content == "Sure." and json.loads(calls[0].arguments) == {"n": 7}
    assert parser.plain_text_end("Sure.<seed:tool") == len("Sure.")
    auto = tool_call_automaton(["f"], [tools[0]["function"]["parameters"]], "seed_oss")
    forced = b'<seed:tool_call>\n{"name": "f", "arguments": {"n": 2}}\n</seed:tool_call>'
    assert auto.is_done(auto.advance(auto.start, forced))
    assert json.loads(parser.parse(forced.decode())[1][0].arguments) == {"n": 2}


def test_olmo3_calls_are_python_lines_in_function_calls_tags():
    """vLLM's olmo3 parser: calls a line each, keyword arguments, JSON's true/false/null as literals;
    in <function_calls> tags (the text before them kept) or bare; a forced call in its form."""
    from cachedattention.server.tool_calls import tool_call_parser

    olmo = tool_call_parser("olmo3")
    content, calls = olmo.parse('<function_calls>\nget_weather(city="Oslo", days=3)\nget_time(utc=true, zone=null)\n'
                                "</function_calls>")  # fmt: skip
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 3}), ("get_time", {"utc": True, "zone": None})]
    content, calls = olmo.parse("Checking.\n<function_calls>\nf(x=[1, 'a'])\n</function_calls>")
    assert content == "Checking." and json.loads(calls[0].arguments) == {"x": [1, "a"]}
    assert olmo.parse("f(x=1)\ng(y=2)")[0] is None and len(olmo.parse("f(x=1)\ng(y=2)")[1]) == 2  # bare lines
    for text in ("No tools needed.", "print(x) is how you print.", "<function_calls>\nf(x=1)",  # (never closed)
                 "<function_calls>\nnot a call\n</function_calls>", "<function_calls>\nf(x=g())\n</function_calls>"):
        assert olmo.parse(text) == (text, []), text
    # streamed: text before the tags shows; an answer that may be bare call lines is held until it cannot be
    assert olmo.plain_text_end("Checking.\n<function_ca") == len("Checking.\n")
    assert olmo.plain_text_end("Checking.\n<function_calls>\nf(") == len("Checking.\n")
    assert olmo.plain_text_end("get_weather(ci") == 0 and olmo.plain_text_end("Hello there") == len("Hello there")
    _forced_call_reads_back("olmo3", b'<function_calls>\nf(**{"n": 2})\n</function_calls>')


def _forced_call_reads_back(form: str, forced: bytes) -> None:
    """A forced call of f(n=2) written in `form` finishes its automaton and is read back by its parser."""
    from cachedattention.engine.tool_choice import tool_call_automaton
    from cachedattention.server.tool_calls import tool_call_parser

    auto = tool_call_automaton(["f"], [{"type": "object", "properties": {"n": {"type": "integer"}}}], form)
    assert auto.is_done(auto.advance(auto.start, forced))
    assert json.loads(tool_call_parser(form).parse(forced.decode())[1][0].arguments) == {"n": 2}


def test_xlam_calls_are_a_json_array_bare_or_in_its_wrappers():
    """vLLM's xlam parser: an array of {"name", "arguments"}: the whole answer, after </think>, or in
    a code block, after [TOOL_CALLS] on its line, or in <tool_call> tags, the text around it kept."""
    from cachedattention.server.tool_calls import tool_call_parser

    xlam = tool_call_parser("xlam")
    array = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    expected = [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    for text, content in ((array, None), ("I will check.\n```json\n" + array + "\n```", "I will check."),
                          ("Checking.[TOOL_CALLS]" + array + "\nDone.", "Checking.\nDone."),
                          ("<tool_call>" + array + "</tool_call>", None),
                          ("Think first.</think>\n" + array, "Think first.</think>")):  # fmt: skip
        got, calls = xlam.parse(text)
        assert got == content and [(c.name, json.loads(c.arguments)) for c in calls] == expected, text
    # an object that is no call is skipped; an array of none, or no array, is text
    assert [c.name for c in xlam.parse('[{"name": "f", "arguments": {}}, {"x": 1}]')[1]] == ["f"]
    for text in ("The weather is fine.", "[1, 2, 3]", '[{"name": "f"}]', "```json\n{\"a\": 1}\n```", "[not json"):
        assert xlam.parse(text) == (text, []), text
    assert xlam.plain_text_end("I will check.\n``") == len("I will check.\n")
    assert xlam.plain_text_end('  [{"na') == 0 and xlam.plain_text_end("Sure.") == len("Sure.")
    _forced_call_reads_back("xlam", b'[{"name": "f", "arguments": {"n": 2}}]')


def test_olmo3_and_xlam_over_http_whole_and_streamed(tool_model_dir):
    olmo = '<function_calls>\nget_weather(city="Oslo", days=3)\n</function_calls>'
    _typed_call_over_http(tool_model_dir, "olmo3", olmo, {"city": "Oslo", "days": 3})
    xlam = 'Checking.\n```json\n[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]\n```'
    _typed_call_over_http(tool_model_dir, "xlam", xlam, {"city": "Oslo", "days": 3})


def test_glm45_over_http_reads_the_request_s_types(tool_model_dir):
    glm = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>7</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"  # fmt: skip
    _typed_call_over_http(tool_model_dir, "glm45", glm, {"city": "7", "days": 3})  # (city: a string as written)


def test_tool_call_arguments_nested_past_the_json_parser_s_depth_reach_the_template_as_text():
    """Found by fuzzing: arguments nested deeper than json's recursion limit raised RecursionError (a 500)."""
    deep = "[" * 5000 + "1" + "]" * 5000
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}]
    messages = validate_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls}])
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == deep


def test_a_call_whose_json_escapes_a_lone_surrogate_is_answered_as_valid_json(server):
    """A model may write a call whose JSON holds an escaped lone surrogate (\\ud800): decoded and
    written back it could not be encoded as UTF-8, and the answer was a 500 (a stream cut short).
    Its arguments keep the escape: the client's JSON parser reads the value the model wrote."""
    written = '<tool_call>{"name": "get_weather", "arguments": {"city": "\\ud800x"}}</tool_call>'
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "max_tokens": 64,
            "temperature": 0, "guided_regex": re.escape(written)}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "\ud800x"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    calls = [c for e in events for ch in e["choices"] for c in ch["delta"].get("tool_calls") or []]
    assert [c["function"]["arguments"] for c in calls] == [call["function"]["arguments"]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_calls_read_from_json_are_utf8_text():
    """The JSON parsers decode escapes: a lone surrogate stays escaped in a call's name and
    arguments, which then encode as UTF-8 and still decode to the value written."""
    (hermes,) = HermesCalls.parse('<tool_call>{"name": "f\\udfff", "arguments": "{\\"a\\": \\"\\ud800\\"}"}</tool_call>')[1]
    (llama,) = Llama3JsonCalls.parse('{"name": "f", "parameters": {"a": "\\ud800"}}')[1]
    for call in (hermes, llama):
        call.name.encode()
        assert json.loads(call.arguments.encode()) == {"a": "\ud800"}
    assert json.loads(f'"{hermes.name}"') == "f\udfff"
