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
