"""--reasoning-parser: a reasoning model's <think>...</think> comes back as `reasoning` (and
`reasoning_content`) apart from the content, whole and streamed, in chat and the Responses API."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cachedattention.outputs import RequestMetrics, RequestOutput
from cachedattention.server.reasoning import REASONING_PARSERS, Reasoning
from tests.server.conftest import engine_config, start_server, with_template
from tests.server.test_tool_calls import CALL, WEATHER

QWEN3, R1, SEED = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["seed_oss"]
THOUGHT = "<think>\nThe user wants the weather.\nI should call the tool.\n</think>\n\n"


@pytest.mark.parametrize(
    "parser, prompt_tail, text, expect",
    [
        (QWEN3, "<|im_start|>assistant\n", THOUGHT + "Sunny.", ("The user wants the weather.\nI should call the tool.",
                                                               "Sunny.")),
        (QWEN3, "<|im_start|>assistant\n", "Sunny, no thinking.", (None, "Sunny, no thinking.")),
        (QWEN3, "assistant\n<think>\n", "Hmm.\n</think>\n\nSunny.", ("Hmm.", "Sunny.")),  # the template opened it
        (QWEN3, "<think>\nLet me", " see.\n</think>\n\nSunny.", ("see.", "Sunny.")),  # a prefill still thinking
        (QWEN3, "<think>\n\n</think>\n\n", "Sunny.", (None, "Sunny.")),  # enable_thinking=false closed it
        (QWEN3, "<|im_start|>assistant\n", "<think>\nStill thinking when cut", ("Still thinking when cut", "")),
        (R1, "<|Assistant|>", "Hmm.\n</think>\n\nSunny.", ("Hmm.", "Sunny.")),  # R1 starts without the tag
        (R1, "<|Assistant|>", "<think>Hmm.</think>Sunny.", ("Hmm.", "Sunny.")),
        (R1, "<|Assistant|>", "cut before the end", ("cut before the end", "")),
        (R1, "<think>\n\n</think>", "Sunny.", (None, "Sunny.")),
        # Seed-OSS: its own tags, and it may start thinking without one (as R1)
        (SEED, "<seed:bos>assistant\n", "<seed:think>Hmm.</seed:think>Sunny.", ("Hmm.", "Sunny.")),
        (SEED, "<seed:bos>assistant\n", "Hmm.\n</seed:think>\n\nSunny.", ("Hmm.", "Sunny.")),
        (SEED, "<seed:bos>assistant\n", "Sunny. </think> is not its tag", ("Sunny. </think> is not its tag", "")),
    ],
)
def test_an_answer_splits_into_reasoning_and_content(parser, prompt_tail, text, expect):
    assert parser.split(text, parser.opens(prompt_tail, structured=False))[:2] == expect


@pytest.mark.parametrize("name", ["glm45", "glm47", "olmo3"])
def test_glm_and_olmo3_think_as_qwen3(name):
    """GLM-4.5 to 4.7 (whose templates close an empty block when thinking is off) and OLMo 3."""
    parser = REASONING_PARSERS[name]
    for tail, text, expect in (("<|assistant|>", "<think>Hmm.</think>Sunny.", ("Hmm.", "Sunny.")),
                               ("<|assistant|><think></think>", "Sunny.", (None, "Sunny.")),
                               ("<|assistant|>\n<think>", "Hmm.</think>Sunny.", ("Hmm.", "Sunny.")),
                               ("<|assistant|>", "Sunny.", (None, "Sunny."))):  # fmt: skip
        assert parser.split(text, parser.opens(tail, structured=False))[:2] == expect


def test_granite_s_phrases_split_its_answer_and_its_pieces_add_up():
    """Granite 3.2 (vLLM's granite parser): phrases in either form, "Here is" or "Here's"; a prompt
    whose last phrase opens the reasoning (a prefill still thinking) begins the answer inside it."""
    granite = REASONING_PARSERS["granite"]
    tail = "<|start_of_role|>assistant<|end_of_role|>"
    system = "Write your thoughts after 'Here is my thought process:' and your answer after 'Here is my response:'."
    assert not granite.opens(system + tail, False) and not granite.opens(tail, False)
    for prefill in ("Here is my thought process:", "Here's my thought process:", "Here's my thought process: first"):
        assert granite.opens(system + tail + prefill, False), prefill
    assert not granite.opens(tail + "Here's my thought process: A. Here is my response:", False)
    for text, expect in (("Here is my thought process: Hmm.\nHere is my response: Sunny.", ("Hmm.", "Sunny.")),
                         ("Here's my thought process:\nHmm.\n\nHere's my response:\nSunny.", ("Hmm.", "Sunny.")),
                         ("Sunny, no thinking.", (None, "Sunny, no thinking.")),
                         ("Here is my thought process: cut", ("cut", ""))):  # fmt: skip
        assert granite.split(text, granite.opens(tail, structured=False))[:2] == expect
    text = "Here's my thought process: A, not Here is my resp.\nHere is my response: B."
    final = granite.split(text, False)
    assert final == ("A, not Here is my resp.", "B.", True)
    for end in range(len(text) + 1):
        reasoning, content, _ = granite.split(text[:end], False, final=False)
        assert final.reasoning.startswith(reasoning or "") and final.content.startswith(content), text[:end]


@pytest.mark.parametrize("text, expect", [
    ("abc\n</think>\n\n<response>\ndef\n</response>\n", ("abc", "def")),
    ("abc\n</think>\ndef", ("abc", "def")),
    ("abc\nABC</think>def\nDEF", ("abc\nABC", "def\nDEF")),
    ("abc</think>", ("abc", "")),
    ("abc", ("abc", "")),  # cut before </think>: all reasoning
    ("abc</think><response>\ncut before its end", ("abc", "cut before its end")),
    ("<think>abc</think><response>a <response> in it</response>", ("abc", "a <response> in it")),
])  # fmt: skip
def test_ernie45_thinks_from_its_first_token_and_its_response_tags_are_dropped(text, expect):
    """vLLM's ernie45 parser: ERNIE 4.5 Thinking's template opens <think>; its answer may come in
    <response> tags; every prefix's split is a prefix of the final one."""
    ernie = REASONING_PARSERS["ernie45"]
    assert ernie.opens("<|im_start|>assistant\n", structured=False)
    final = ernie.split(text, True)
    assert final[:2] == expect
    for end in range(len(text) + 1):
        reasoning, content, _ = ernie.split(text[:end], True, final=False)
        assert final.reasoning.startswith(reasoning or "") and final.content.startswith(content), text[:end]


def test_a_structured_answer_has_no_reasoning():
    assert not R1.opens("<|Assistant|>", structured=True) and not QWEN3.opens("<think>\n", structured=True)
    assert R1.split('{"a": 1}', R1.opens("<|Assistant|>", structured=True))[:2] == (None, '{"a": 1}')


@pytest.mark.parametrize("parser, open_at_start", [(QWEN3, False), (R1, True)])
def test_pieces_shown_while_the_text_grows_add_up_to_the_final_split(parser, open_at_start):
    """What may still become a tag is held back: every prefix's split is a prefix of the final one."""
    text = ("" if open_at_start else "  <think>") + "\nA < B, so </thin k> is not it.\n</think>\n\nAnswer: </b>."
    final_reasoning, final_content, closed = parser.split(text, open_at_start)
    assert final_reasoning == "A < B, so </thin k> is not it." and final_content == "Answer: </b>." and closed
    closes_at = text.index("</think>") + len("</think>")
    for end in range(len(text) + 1):
        reasoning, content, closed = parser.split(text[:end], open_at_start, final=False)
        assert final_reasoning.startswith(reasoning or "") and final_content.startswith(content), text[:end]
        assert closed == (end >= closes_at or (reasoning is None and not open_at_start))
        if end < closes_at:
            assert content == ""  # nothing of the answer before the reasoning is closed
    assert QWEN3.split("<thi", False, final=False)[:2] == (None, "") and QWEN3.split("<thi", False)[:2] == (None, "<thi")
    # an answer inside its reasoning from the start that writes <think> anyway: no piece of it shows
    for end in range(1, len("<think>")):
        assert R1.split("<think>"[:end], True, final=False)[:2] == ("", "")


def _output(text: str, finished: bool, prompt: list[int]) -> RequestOutput:
    return RequestOutput("r", prompt, [5] * len(text), text, finished, "stop" if finished else None,
                         RequestMetrics(0.0, prompt_tokens=len(prompt)))  # fmt: skip


class _Tail:
    """A tokenizer stand-in for the prompt's tail: its ids are the characters' code points."""

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _prompt(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_chat_messages_carry_the_reasoning_and_tool_calls_come_from_the_content():
    from cachedattention.server.app import _Format

    answer = THOUGHT + "Checking. " + CALL
    out = _output(answer, True, _prompt("<|im_start|>assistant\n"))
    fmt = _Format("c", "m", True, False, _Tail(), tool_calls=True, reasoning=Reasoning(QWEN3))
    choice = fmt.full([out])["choices"][0]
    msg = choice["message"]
    assert msg["reasoning"] == msg["reasoning_content"] == "The user wants the weather.\nI should call the tool."
    assert msg["content"] == "Checking. " and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert choice["finish_reason"] == "tool_calls"
    # a call written inside the reasoning is thought about, not made
    thinking_of_a_call = _output("<think>" + CALL + "</think>Fine.", True, _prompt("assistant\n"))
    msg = fmt.full([thinking_of_a_call])["choices"][0]["message"]
    assert "tool_calls" not in msg and msg["content"] == "Fine." and msg["reasoning"] == CALL
    hidden = _Format("c", "m", True, False, _Tail(), reasoning=Reasoning(QWEN3, include=False))
    msg = hidden.full([_output(THOUGHT + "Sunny.", True, _prompt("x"))])["choices"][0]["message"]
    assert msg["reasoning"] is None and msg["content"] == "Sunny."  # include_reasoning false: dropped
    cut = _Format("c", "m", True, False, _Tail(), reasoning=Reasoning(R1))
    msg = cut.full([_output("Thinking on and on", True, _prompt("x"))])["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": None, "reasoning": "Thinking on and on",
                   "reasoning_content": "Thinking on and on"}  # fmt: skip
    plain = _Format("c", "m", True, False, _Tail()).full([_output(THOUGHT + "Sunny.", True, [1])])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": THOUGHT + "Sunny."}  # no parser


def _stream_chat(answer: str, reasoning: Reasoning, prompt: str, grown: str | None = None, **body) -> list[dict]:
    """The chat deltas of an answer streamed a character at a time (tags arrive in pieces) up to
    `grown` (default: `answer`), then finished as `answer` (shorter when a stop string cut it)."""
    from cachedattention.server.app import OpenAIRoutes, _Format
    from cachedattention.server.engine_loop import RequestStream
    from cachedattention.server.protocol import parse_chat

    async def stream() -> list[dict]:
        parsed = parse_chat({"messages": [{"role": "user", "content": "hi"}], "stream": True, **body}, None, 1024)
        fmt = _Format("c", "m", True, False, _Tail(), tool_calls=parsed.parse_tool_calls, reasoning=reasoning)
        source = RequestStream("c", asyncio.get_running_loop())
        growing = grown or answer
        for end in range(1, len(growing) + (grown is not None)):
            source.put(_output(growing[:end], False, _prompt(prompt)))
        source.put(_output(answer, True, _prompt(prompt)))
        routes = OpenAIRoutes(None, None, "m", 1024)
        return [json.loads(e[6:]) for e in [e async for e in routes._events([source], fmt, parsed)] if "{" in e]

    return [e["choices"][0]["delta"] for e in asyncio.run(stream())]


def _joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key) or "" for d in deltas)


def _reasoning_first(deltas: list[dict]) -> bool:
    first_content = next((i for i, d in enumerate(deltas) if d.get("content")), len(deltas))
    return not any(d.get("reasoning") for d in deltas[first_content:])


def test_streamed_reasoning_and_content_deltas_add_up_to_the_whole_answer():
    deltas = _stream_chat(THOUGHT + "Checking. " + CALL, Reasoning(QWEN3), "<|im_start|>assistant\n", tools=[WEATHER])
    assert _joined(deltas, "reasoning") == "The user wants the weather.\nI should call the tool."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert _joined(deltas, "content") == "Checking. "
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["get_weather"]
    assert _reasoning_first(deltas)
    assert not any("think>" in (d.get("content") or "") + (d.get("reasoning") or "") for d in deltas)


def test_a_tag_the_answer_writes_inside_a_reasoning_it_began_in_never_shows():
    """DeepSeek-R1 begins in its reasoning, and may still write <think> (not one token everywhere)."""
    deltas = _stream_chat("<think>\nHmm.</think>Hi", Reasoning(R1), "<|Assistant|>")
    assert _joined(deltas, "reasoning") == "Hmm." and _joined(deltas, "content") == "Hi"


def test_a_reasoning_cut_by_a_stop_string_streams_as_the_whole_answer_has_it():
    """The space before a stop string that then cuts the reasoning is not streamed (the whole answer's
    reasoning is trimmed), in chat and in the Responses API."""
    deltas = _stream_chat("<think>abc ", Reasoning(QWEN3), "x", grown="<think>abc Okay, s", stop=["Okay, so"])
    assert _joined(deltas, "reasoning") == "abc" and not _joined(deltas, "content")
    answer, tok = _answer(stop=["Okay, so"])
    events = _response_events(answer, tok, "<think>abc ", grown="<think>abc Okay, s")
    text = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == "abc" == events[-1]["response"]["output"][0]["content"][0]["text"]


def test_a_closed_reasoning_is_not_held_back_for_a_stop_string():
    """Its end might start a stop string only while it can grow: once closed, it all goes first."""
    deltas = _stream_chat("<think>abc Ok</think>Hi there", Reasoning(QWEN3), "x", stop=["Okay, so"])
    assert _joined(deltas, "reasoning") == "abc Ok" and _joined(deltas, "content") == "Hi there"
    assert _reasoning_first(deltas)


# a template that opens the model's reasoning for it, as Qwen3.5's and DeepSeek-R1's later ones
OPENING = ("{%- if reasoning_effort %}[effort {{ reasoning_effort }}]{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>"
           "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>\n{%- endfor %}"
           "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{%- endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def reasoning_server(chat_model_dir, tmp_path_factory):
    model = with_template(chat_model_dir, tmp_path_factory.mktemp("thinking"), OPENING)
    srv = start_server(engine_config(model, store=False), reasoning_parser_name="qwen3")
    yield srv
    srv.stop()


HELLO = [{"role": "user", "content": "Hello"}]
# no arguments: the random model's call ends quickly (a free string argument may run to max_tokens)
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}}}


def test_a_prompt_that_opens_the_reasoning_makes_the_answer_reasoning(reasoning_server):
    """The tiny model never closes </think>: its whole answer is reasoning, the content empty. The
    prompt's open tag is read from the rendered prompt's tokens."""
    url = reasoning_server.url
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0}, timeout=60)
    msg = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and msg["content"] is None and msg["reasoning"] and msg["reasoning_content"]
    # structured, and <think> is not a token of this tokenizer: no reasoning, the answer is the choice
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": HELLO, "max_tokens": 12, "temperature": 0, "guided_choice": ["yes", "no"]})  # fmt: skip
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] in ("yes", "no") and msg["reasoning"] is None
    # streamed: the same reasoning, in reasoning deltas only
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "messages": HELLO, "max_tokens": 6, "temperature": 0, "stream": True}) as s:  # fmt: skip
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    whole = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0},
                       timeout=60).json()["choices"][0]["message"]  # fmt: skip
    assert "".join(d.get("reasoning") or "" for d in deltas) == whole["reasoning"]
    assert not "".join(d.get("content") or "" for d in deltas)
    # include_reasoning false: dropped
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": HELLO, "max_tokens": 6, "temperature": 0, "include_reasoning": False})  # fmt: skip
    assert r.json()["choices"][0]["message"]["reasoning"] is None
    bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "include_reasoning": "yes"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "include_reasoning"


def test_a_structured_answer_reasons_first_when_the_tags_are_tokens(thinking_model, tmp_path_factory):
    """With <think> and </think> as single tokens the engine holds the answer's shape only after the
    reasoning (vLLM's rule). The tiny model is steered: " Hmm" pushed up but penalised each time it
    comes, </think> a little below it, so it thinks a few words, closes, and answers in shape."""
    import transformers

    path, _, end = thinking_model
    hmm = transformers.AutoTokenizer.from_pretrained(str(path)).encode(" Hmm", add_special_tokens=False)[0]
    model = with_template(path, tmp_path_factory.mktemp("thinking-opening"), OPENING)
    srv = start_server(engine_config(model, store=False), reasoning_parser_name="qwen3")
    steer = {"messages": HELLO, "max_tokens": 16, "temperature": 0, "frequency_penalty": 2,
             "logit_bias": {str(hmm): 100, str(end): 97}}  # fmt: skip
    try:
        url = f"{srv.url}/v1/chat/completions"
        msg = httpx.post(url, json={**steer, "guided_choice": ["yes", "no"]}, timeout=60).json()["choices"][0]["message"]
        assert msg["reasoning"].startswith("Hmm Hmm") and set(msg["reasoning"].split()) == {"Hmm"}
        assert msg["content"] in ("yes", "no")
        with httpx.stream("POST", url, timeout=60, json={**steer, "guided_choice": ["yes", "no"], "stream": True}) as s:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in s.iter_lines()
                      if line.startswith("data: {") and json.loads(line[6:])["choices"]]  # fmt: skip
        assert "".join(d.get("reasoning") or "" for d in deltas) == msg["reasoning"]
        assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
        # a forced call comes after the reasoning too, read from the content
        r = httpx.post(url, json={**steer, "max_tokens": 64, "tools": [CLOCK], "tool_choice": "required"}, timeout=60)
        choice = r.json()["choices"][0]
        assert choice["message"]["reasoning"].startswith("Hmm") and choice["finish_reason"] == "tool_calls", choice
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["now"]
        # cut while thinking: all reasoning, no content
        cut = httpx.post(url, json={**steer, "guided_choice": ["yes", "no"], "max_tokens": 2}, timeout=60).json()
        assert cut["choices"][0]["message"]["content"] is None and cut["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()


def test_a_reasoning_given_back_reaches_the_template(reasoning_server):
    url = reasoning_server.url
    history = [*HELLO, {"role": "assistant", "content": "Hi!", "reasoning": "A greeting."},
               {"role": "user", "content": "And?"}]  # fmt: skip
    ids = httpx.post(f"{url}/tokenize", json={"messages": history}, timeout=60).json()["tokens"]
    text = httpx.post(f"{url}/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"]
    assert "<think>A greeting.</think>Hi!" in text
    bad = [*HELLO, {"role": "assistant", "content": "Hi!", "reasoning_content": 3}, {"role": "user", "content": "?"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": bad}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].reasoning_content"


def test_the_responses_api_returns_a_reasoning_item_and_keeps_it_in_the_conversation(reasoning_server):
    url = reasoning_server.url
    body = {"input": "Hello", "max_output_tokens": 6, "temperature": 0}
    first = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()
    (item,) = first["output"]  # cut in its reasoning: no message
    assert item["type"] == "reasoning" and item["content"][0]["type"] == "reasoning_text" and item["content"][0]["text"]
    assert first["usage"]["output_tokens_details"]["reasoning_tokens"] == first["usage"]["output_tokens"] == 6
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    text = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == item["content"][0]["text"] and "response.output_text.delta" not in kinds
    assert events[-1]["response"]["output"] == [{**item, "id": events[-1]["response"]["output"][0]["id"]}]
    # the next turn's conversation holds the reasoning, which this template writes back
    second = httpx.post(f"{url}/v1/responses", json={**body, "input": "And?", "previous_response_id": first["id"]},
                        timeout=60).json()  # fmt: skip
    assert second["status"] == "incomplete" and second["usage"]["input_tokens"] > first["usage"]["input_tokens"]


def _answer(stop: list[str] | None = None, **body):
    """A Responses API answer object over the embedded model's tokenizer, not stored."""
    from cachedattention.model.embedded import embedded_model_dir
    from cachedattention.model.tokenizer import Tokenizer
    from cachedattention.server.protocol import parse_chat
    from cachedattention.server.responses import _Answer
    from cachedattention.server.responses_request import read_request
    from cachedattention.server.tool_calls import HermesCalls

    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    req = read_request({"input": "hi", "store": False, **({"stop": stop} if stop else {}), **body}, [], reasons=True)
    parsed = parse_chat(req.chat_body, None, 1024)
    return _Answer("resp_1", "m", req, parsed, tok, HermesCalls, Reasoning(QWEN3)), tok


def _tokens_out(tok, text: str, finished: bool, logprobs: bool = False) -> RequestOutput:
    from cachedattention.sampling import TokenLogprob

    ids = tok.encode(text)
    lps = [TokenLogprob(t, -0.5, 1) for t in ids] if logprobs else None
    return RequestOutput("r", tok.encode("assistant\n"), ids, tok.decode(ids), finished, "stop" if finished else None,
                         RequestMetrics(0.0, prompt_tokens=2), logprobs=lps)  # fmt: skip


def _response_events(answer, tok, text: str, grown: str | None = None) -> list[dict]:
    """The Responses API's events as the answer grows token by token to `grown` (default: `text`)
    and finishes as `text` (shorter when a stop string cut it)."""
    from cachedattention.server.engine_loop import RequestStream
    from cachedattention.server.responses import ResponsesRoutes

    ids = tok.encode(grown or text)

    async def run() -> list[str]:
        source = RequestStream("r", asyncio.get_running_loop())
        for end in range(1, len(ids) + (grown is not None)):
            source.put(_tokens_out(tok, tok.decode(ids[:end]), False))
        source.put(_tokens_out(tok, text, True))
        return [e async for e in ResponsesRoutes(None, None)._events(source, answer, None)]

    return [json.loads(e.split("data: ", 1)[1]) for e in asyncio.run(run())]


def test_the_responses_stream_finishes_the_reasoning_item_before_the_message_begins():
    answer, tok = _answer(tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}])
    events = _response_events(answer, tok, THOUGHT + "Checking. " + CALL)
    items = [(e["type"], e.get("output_index")) for e in events if e["type"].startswith("response.output_item")]
    assert items == [("response.output_item.added", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.output_item.done", 1),
                     ("response.output_item.added", 2), ("response.output_item.done", 2)]  # fmt: skip
    final = events[-1]["response"]["output"]
    assert [o["type"] for o in final] == ["reasoning", "message", "function_call"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final  # each item as the body has it, at its index
    text = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == final[0]["content"][0]["text"] == "The user wants the weather.\nI should call the tool."
    assert final[0]["status"] == "completed"


def test_a_reasoning_held_for_a_stop_string_and_then_cut_opens_no_item():
    answer, tok = _answer(stop=["Okay, so"])
    events = _response_events(answer, tok, "<think>\n", grown="<think>\nOkay, s")  # then cut at "Okay, so"
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["message"] and [o["type"] for o in events[-1]["response"]["output"]] == ["message"]
    assert all(e.get("output_index", 0) == 0 for e in events)  # the message where the body has it


def test_the_message_s_logprobs_are_its_text_s_tokens_not_the_reasoning_s():
    answer, tok = _answer(include=["message.output_text.logprobs"])
    text = THOUGHT + "Sunny and warm."
    out = _tokens_out(tok, text, True, logprobs=True)
    reasoning_tokens = answer.reasoning_tokens(out)
    assert tok.decode(out.token_ids[:reasoning_tokens]).endswith("</think>")
    assert "</think>" not in tok.decode(out.token_ids[: reasoning_tokens - 1])
    (message,) = [o for o in answer.output(out) if o["type"] == "message"]
    lps = message["content"][0]["logprobs"]
    assert len(lps) == len(out.token_ids) - reasoning_tokens
    assert "".join(e["token"] for e in lps).lstrip() == "Sunny and warm."


def test_reasoning_items_given_back_go_with_the_assistant_turn_they_preceded():
    from cachedattention.server.responses_request import input_messages

    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    messages = input_messages([{"role": "user", "content": "hi"}, thought, call,
                               {"type": "function_call_output", "call_id": "c1", "output": "ok"},
                               thought, {"role": "assistant", "content": "Done."}, thought,
                               {"role": "user", "content": "thanks"}])  # fmt: skip
    assert [m.get("reasoning_content") for m in messages] == [None, "Hm.", None, "Hm.", None]
    assert messages[1]["tool_calls"][0]["id"] == "c1"


def test_reasoning_options_need_a_reasoning_parser(chat_model_dir, reasoning_server):
    from cachedattention.server.responses_request import read_request

    with pytest.raises(Exception, match="--reasoning-parser"):
        read_request({"input": "hi", "reasoning": {"effort": "low"}}, [])
    req = read_request({"input": "hi", "reasoning": {"effort": "low", "summary": "auto"}}, [], reasons=True)
    assert req.echo["reasoning"] == {"effort": "low", "summary": "auto"}
    assert req.chat_body["reasoning_effort"] == "low"  # as chat's field: the template gets it
    r = httpx.post(f"{reasoning_server.url}/v1/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 2, "reasoning": {"effort": "extreme"}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning.effort"
    r = httpx.post(f"{reasoning_server.url}/v1/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 2, "reasoning": {"effort": "high"}})  # fmt: skip
    assert r.status_code == 200 and r.json()["reasoning"] == {"effort": "high", "summary": None}


def test_reasoning_effort_reaches_the_chat_template(reasoning_server):
    """As vLLM's: a template variable (chat_template_kwargs' own value wins)."""
    from cachedattention.server.protocol import chat_options

    messages = [{"role": "user", "content": "hi"}]
    assert chat_options({"reasoning_effort": "low"}, messages).template_kwargs == {"reasoning_effort": "low"}
    both = chat_options({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "high", "x": 1}},
                        messages)  # fmt: skip
    assert both.template_kwargs == {"reasoning_effort": "high", "x": 1}
    url = reasoning_server.url
    ids = httpx.post(f"{url}/tokenize", json={"messages": HELLO, "reasoning_effort": "low"}, timeout=60).json()["tokens"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"].startswith("[effort low]")
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"messages": HELLO, "max_tokens": 1, "reasoning_effort": "max"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_magistral_s_think_tokens_are_its_tags_and_are_kept_in_the_answer_s_text():
    """`mistral` (Magistral): [THINK] and [/THINK] are special tokens, so a chat answer's text keeps
    special tokens for the parser to find them (and take them out of what the client sees)."""
    from cachedattention.server.app import OpenAIRoutes
    from cachedattention.server.protocol import parse_chat

    mistral = REASONING_PARSERS["mistral"]
    assert mistral.split("[THINK]Hmm.[/THINK]Sunny.", mistral.opens("[/INST]", False))[:2] == ("Hmm.", "Sunny.")
    assert mistral.split("Sunny.", mistral.opens("[/INST]", False))[:2] == (None, "Sunny.")
    deltas = _stream_chat("[THINK]Hmm.[/THINK]Sunny.", Reasoning(mistral, skip_special_tokens=False), "[/INST]")
    assert _joined(deltas, "reasoning") == "Hmm." and _joined(deltas, "content") == "Sunny."
    parsed = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, None, 1024)
    assert parsed.params.skip_special_tokens

    class Routes:
        reasoning_parser = mistral

    assert not OpenAIRoutes.keep_tags(Routes(), parsed).params.skip_special_tokens
    Routes.reasoning_parser = QWEN3  # <think> decodes as text: nothing to keep
    assert OpenAIRoutes.keep_tags(Routes(), parsed).params.skip_special_tokens
