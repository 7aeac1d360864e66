"""gpt-oss's harmony answers (--reasoning-parser openai_gptoss, --tool-call-parser openai): the
analysis channel is the reasoning, the final channel the content, a commentary message to
functions.NAME a tool call; whole and streamed (every special token arriving as one piece)."""

from __future__ import annotations

import json

import pytest

from cachedattention.harmony import messages
from cachedattention.server.reasoning import REASONING_PARSERS, Reasoning
from cachedattention.server.tool_calls import OpenAICalls
from tests.server.test_reasoning import _joined, _output, _prompt, _reasoning_first, _Tail
from tests.server.test_tool_calls import WEATHER

HARMONY = REASONING_PARSERS["openai_gptoss"]
THINK = "<|channel|>analysis<|message|>User asks the weather. Use the tool.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris."
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
PROMPT = "<|start|>user<|message|>Weather?<|end|><|start|>assistant"


@pytest.mark.parametrize("text, expect", [
    (THINK + FINAL, ("User asks the weather. Use the tool.", "It is sunny in Paris.")),
    ("<|channel|>final<|message|>Hi.", (None, "Hi.")),  # no reasoning at all
    ("<|channel|>analysis<|message|>Cut while thinking", ("Cut while thinking", "")),
    ("Plain text, no harmony", (None, "Plain text, no harmony")),
    (THINK + CALL, ("User asks the weather. Use the tool.", CALL)),  # the call stays as written, for the tool parser
])
def test_a_harmony_answer_splits_by_channel(text, expect):
    assert HARMONY.split(text, HARMONY.opens(PROMPT, False))[:2] == expect


def test_the_recipient_may_come_before_the_channel_and_headers_still_being_written_wait():
    (m,) = messages('<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{"a": 1}<|call|>')
    assert (m.channel, m.recipient, m.body, m.complete) == ("commentary", "functions.f", '{"a": 1}', True)
    assert messages(THINK + "<|start|>assistant<|channel|>fin", final=False)[-1].channel == "analysis"


def test_pieces_shown_while_a_harmony_answer_grows_add_up_to_the_final_split():
    pieces = [THINK[:30], THINK[30:], "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "It is ", "sunny."]
    text = "".join(pieces)
    final_reasoning, final_content, _ = HARMONY.split(text, False)
    grown = ""
    for piece in pieces:
        grown += piece
        reasoning, content, _ = HARMONY.split(grown, False, final=False)
        assert final_reasoning.startswith(reasoning or "") and final_content.startswith(content), grown
    assert (final_reasoning, final_content) == ("User asks the weather. Use the tool.", "It is sunny.")


def test_the_openai_tool_parser_reads_harmony_calls():
    text, calls = OpenAICalls.parse("Let me check." + CALL)
    assert text == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert OpenAICalls.plain_text_end("Let me check." + CALL[:20]) == len("Let me check.")
    two = CALL + CALL.replace("Paris", "Rome")
    assert [json.loads(c.arguments)["city"] for c in OpenAICalls.parse(two)[1]] == ["Paris", "Rome"]
    # a message to no function, or arguments that are no JSON object: the answer as text, as other parsers do
    for odd in (CALL.replace("functions.", "browser."), CALL.replace('{"city": "Paris"}', "Paris")):
        assert OpenAICalls.parse(odd) == (odd, [])


def test_chat_messages_and_streams_carry_harmony_reasoning_content_and_calls():
    from cachedattention.server.app import _Format

    fmt = _Format("c", "m", True, False, _Tail(), tool_calls=True, tool_parser=OpenAICalls,
                  reasoning=Reasoning(HARMONY, skip_special_tokens=False))  # fmt: skip
    choice = fmt.full([_output(THINK + CALL, True, _prompt(PROMPT))])["choices"][0]
    msg = choice["message"]
    assert msg["reasoning"] == "User asks the weather. Use the tool." and not msg["content"]
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather" and choice["finish_reason"] == "tool_calls"
    msg = fmt.full([_output(THINK + FINAL, True, _prompt(PROMPT))])["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == ("User asks the weather. Use the tool.", "It is sunny in Paris.")
    assert "<|" not in json.dumps(msg)
    from tests.server.test_reasoning import _stream_chat

    deltas = _stream_chat(THINK + FINAL, Reasoning(HARMONY, skip_special_tokens=False), PROMPT)
    assert _joined(deltas, "reasoning") == "User asks the weather. Use the tool."
    assert _joined(deltas, "content") == "It is sunny in Paris." and _reasoning_first(deltas)
    assert not any("<|" in (d.get("content") or "") + (d.get("reasoning") or "") for d in deltas)
    assert WEATHER["function"]["name"] == "get_weather"


def test_a_first_message_with_its_recipient_before_its_channel_is_a_call_not_text():
    """gpt-oss's template writes past calls as <|start|>assistant to=functions.NAME<|channel|>...: an
    answer may open that way (its <|start|>assistant is the prompt's)."""
    answer = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
    reasoning, content, _ = HARMONY.split(answer, False)
    text, calls = OpenAICalls.parse(content)
    assert reasoning is None and text is None and [c.name for c in calls] == ["get_weather"]
    assert OpenAICalls.parse(answer)[1][0].name == "get_weather"  # without the reasoning parser too
    for end in range(1, len(answer)):  # streamed: no piece of the header shows as content
        _, grown, _ = HARMONY.split(answer[:end], False, final=False)
        assert OpenAICalls.plain_text_end(grown) == 0, answer[:end]


def test_reasoning_spans_every_analysis_message_and_closes_when_the_answer_begins():
    two = THINK + "<|start|>assistant<|channel|>analysis<|message|>Second thought.<|end|>"
    reasoning, content, closed = HARMONY.split(two, False, final=False)
    assert reasoning == "User asks the weather. Use the tool.\nSecond thought." and not closed
    assert HARMONY.split(two + FINAL, False, final=False)[2]  # the final channel began: closed


class _Pieces:
    """A tokenizer stand-in whose token i is the i-th piece of an answer (special tokens atomic)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_reasoning_tokens_are_counted_to_the_end_of_the_last_analysis_message():
    from cachedattention.outputs import RequestMetrics, RequestOutput

    pieces = ["<|channel|>", "analysis", "<|message|>", "Think", " more", "<|end|>", "<|start|>", "assistant",
              "<|channel|>", "final", "<|message|>", "Hi", "."]  # fmt: skip
    out = RequestOutput("r", [1], list(range(len(pieces))), "".join(pieces), True, "stop", RequestMetrics(0.0))
    reasoning = Reasoning(HARMONY, skip_special_tokens=False)
    assert reasoning.tokens(out, _Pieces(pieces)) == 5  # through " more": the analysis body is whole there
    preamble = ["<|channel|>", "commentary", "<|message|>", "Checking", "<|end|>", "<|start|>", "assistant"] + pieces
    out = RequestOutput("r", [1], list(range(len(preamble))), "".join(preamble), True, "stop", RequestMetrics(0.0))
    assert reasoning.tokens(out, _Pieces(preamble)) == 7 + 5  # a preamble first: counted to the analysis' end


def test_a_forced_call_in_harmony_is_refused_with_a_reason():
    from cachedattention.server.api_error import APIError
    from cachedattention.server.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": "required"}
    with pytest.raises(APIError) as e:
        parse_chat(body, None, 1024, tool_format="openai")
    assert e.value.status == 400 and "cannot be forced" in str(e.value.message)


def test_reasoning_given_back_reaches_gpt_oss_s_template_as_thinking():
    from cachedattention.model.messages import validate_messages

    (_, turn) = validate_messages([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "Hello.", "reasoning": "Greet back."}])  # fmt: skip
    assert turn["thinking"] == turn["reasoning_content"] == "Greet back."
