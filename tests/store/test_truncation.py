"""Context overflow: drop old history after a kept head and reuse the retained pre-RoPE KV at new positions."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.store.session import SessionRecord, Span, plan_turn
from tests.util import capture_logits, last_logits_after, rel_err, run_to_end

WINDOW = 128
HEAD = 8
NO_DEVICE = CacheConfig(enable_prefix_cache=False)


def make(path, mode="reuse"):
    return LLM(model=str(path), enable_store=True, cache=NO_DEVICE, max_model_len=WINDOW,
               keep_head_tokens=HEAD, truncation=mode)


def grow(conv, out, t):
    return conv + out.token_ids + [20 + t, 21 + t, 22 + t, 23 + t, 24 + t, 25 + t]


def test_plan_turn_drops_half_the_history_after_the_head():
    rec = SessionRecord("s", list(range(100)), [Span("a", 0, 100)], head=HEAD, dropped_until=HEAD)
    plan = plan_turn(rec, list(range(100)) + [7] * 20, window=WINDOW, reserve=16, head_hint=0,
                     drop_fraction=0.5, mode="reuse")
    assert plan.head == HEAD and plan.truncated_now == 46  # half of the 92 history tokens after the head
    assert plan.effective_prompt == list(range(HEAD)) + list(range(HEAD + 46, 100)) + [7] * 20
    assert plan.reuse == [Span("a", 0, HEAD), Span("a", HEAD + 46, 100)]
    base = plan_turn(rec, list(range(100)) + [7] * 20, WINDOW, 16, 0, 0.5, "recompute")
    assert base.reuse == [Span("a", 0, HEAD)] and base.effective_prompt == plan.effective_prompt


def test_a_new_head_replaces_the_recorded_one_and_whole_mode_applies_no_cut():
    # turn 2 after a cut: history [HEAD, HEAD + 46) was dropped
    rec = SessionRecord("s", list(range(100)), [Span("a", 0, HEAD), Span("a", HEAD + 46, 100)], head=HEAD,
                        dropped_until=HEAD + 46)  # fmt: skip
    longer_head = [0, 1, 2] + [500] * 12  # a new system prompt of 15 tokens, differing at token 3
    plan = plan_turn(rec, longer_head + [7] * 120, WINDOW, 16, head_hint=15, drop_fraction=0.5, mode="reuse")
    assert plan.head == 15 and plan.effective_prompt[:15] == longer_head  # never cut inside the new head
    assert plan.reuse == [Span("a", 0, 3)] and plan.truncated_now > 0
    # a session started without a system prompt (head: one BOS) that gets one: the new head is kept whole
    bos = SessionRecord("b", [1] + list(range(100, 150)), [Span("c", 0, 51)], head=1, dropped_until=1)
    system = [1] + [600] * 30
    grown = plan_turn(bos, system + list(range(100, 200)), WINDOW, 16, head_hint=31, drop_fraction=0.5, mode="reuse")
    assert grown.head == 31 and grown.effective_prompt[:31] == system and grown.reuse == [Span("c", 0, 1)]
    # the new head matches the record further than its recorded head: the longer one is kept whole
    longer = plan_turn(bos, [1] + list(range(100, 230)), WINDOW, 16, head_hint=20, drop_fraction=0.5, mode="reuse")
    assert longer.head == 20 and longer.effective_prompt[:20] == [1] + list(range(100, 119))
    assert longer.reuse[0] == Span("c", 0, 20) and longer.truncated_now > 0  # the cut falls after it
    whole = plan_turn(rec, list(range(100)) + [7] * 10, WINDOW, 16, 0, 0.5, "whole")
    assert whole.effective_prompt == list(range(100)) + [7] * 10 and whole.truncated_now == 0
    assert whole.reuse == [Span("a", 0, HEAD)]  # the dropped history is computed again, not skipped
    assert plan_turn(rec, list(range(100)) + [7] * 10, WINDOW, 16, 0, 0.5, "off").effective_prompt == (
        list(range(HEAD)) + list(range(HEAD + 46, 100)) + [7] * 10)  # "off" keeps the earlier cut


def test_plan_turn_never_drops_the_newest_turn():
    rec = SessionRecord("s", list(range(40)), [Span("a", 0, 40)], head=HEAD, dropped_until=HEAD)
    prompt = list(range(40)) + [7] * 110  # 32 tokens of history, then a newest turn of 110
    cut = plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse")  # no tail given: only the last token is kept
    assert cut.truncated_now == len(prompt) - (WINDOW - 16) > 32  # into the newest turn, to fit the answer's room
    plan = plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse", tail=110)
    assert plan.truncated_now == 32 and plan.effective_prompt == list(range(HEAD)) + [7] * 110
    assert plan.reuse == [Span("a", 0, HEAD)]
    longer = plan_turn(rec, prompt + [7] * 10, WINDOW, 16, 0, 0.5, "reuse", tail=125)  # cuts what it may
    assert longer.effective_prompt == list(range(HEAD)) + list(range(35, 40)) + [7] * 120
    whole = plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse", tail=len(prompt))  # nothing it may drop
    assert whole.truncated_now == 0 and whole.effective_prompt == prompt


# Qwen3's way: an answer after the last user message shows its reasoning (an empty block if none), so a
# history rendered alone differs from the prompt at its last answer
QWEN3_LIKE = """{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}{{- '<|im_start|>' + m.role + '\n' }}
{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}{{- '<think>\n' + (m.reasoning_content or '') + '\n</think>\n\n' }}{%- endif %}
{{- m.content + '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""


# (a tool's result under a user header, as Qwen2.5's and Qwen3's)
QWEN25_LIKE = """{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\nYou are Qwen. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}
{%- for m in messages %}{%- if m.role == 'tool' %}{{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' }}
{%- elif m.tool_calls %}{{- '<|im_start|>assistant\n<tool_call>\n' + (m.tool_calls[0].function | tojson) + '\n</tool_call><|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""
GEMMA_LIKE = """{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for m in loop_messages -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] + '<end_of_turn>\n' }}{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

# Mistral's: one special token opens a user message ([INST], here <|im_start|>), the begin and end of
# a text differ (<s> and </s>, here <repo_name> and <|endoftext|>)
MISTRAL_LIKE = """{{ '<repo_name>' }}{%- for m in messages %}{%- if m.role == 'user' %}{{ '<|im_start|> ' + m.content + '<|im_end|>' }}
{%- elif m.role == 'system' %}{{ m.content + '\n\n' }}{%- else %}{{ ' ' + m.content + '<|endoftext|>' }}{%- endif %}{%- endfor %}"""


def test_truncation_keeps_the_system_prompt_to_a_user_header_and_the_newest_turn_from_its_content(chat_model_dir):
    """What is kept reads as a conversation whatever is dropped between: the head ends with the
    first user message's header, the tail starts at the newest turn's content (the messages after
    the last answer before the last user message: a question with its tool calls and results too)."""
    from cachedattention.model.messages import ChatOptions
    from cachedattention.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(chat_model_dir))

    def kept(messages, options=None):
        prompt = tok.encode_chat(messages, options=options)
        head, tail, _ = tok.kept_lengths(messages, prompt, options=options)
        return (tok.decode(prompt[:head], skip_special_tokens=False),
                tok.decode(prompt[len(prompt) - tail :], skip_special_tokens=False))  # fmt: skip

    system, hi, hello = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."})  # fmt: skip
    more, please = {"role": "user", "content": "More?"}, {"role": "user", "content": "Please."}
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    answer = "<|im_end|>\n<|im_start|>assistant\n"
    assert kept([system, hi]) == (head, "Hi" + answer)  # a first turn: all of it after the head
    assert kept([system, hi, hello, more]) == (head, "More?" + answer)
    assert kept([system, hi, hello, more, please]) == (head, "More?<|im_end|>\n<|im_start|>user\nPlease." + answer)
    going_on = ChatOptions(add_generation_prompt=False, continue_final_message=True)  # an answer the model goes on with
    assert kept([system, hi, hello, more, {"role": "assistant", "content": "Well,"}], going_on)[1] == "More?" + answer + "Well,"
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}  # fmt: skip
    result = {"role": "tool", "content": "Sunny."}
    assert kept([system, hi, hello, more, call, result])[1].startswith("More?<|im_end|>")  # the question stays with them
    assert kept([hi, hello, more])[0].endswith("<|im_end|>\n<|im_start|>user\n")  # the template's own system prompt
    qwen3 = Tokenizer(tok.hf, QWEN3_LIKE)
    tok = qwen3  # (kept() reads it)
    assert kept([system, hi, {**hello, "reasoning_content": "Greet."}, more]) == (head, "More?" + answer)


def test_kept_lengths_gives_where_each_user_message_starts_and_a_call_of_tools_is_no_answer(chat_model_dir):
    from cachedattention.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(chat_model_dir))
    system = {"role": "system", "content": "Be brief."}
    users = [{"role": "user", "content": f"Question {i}?"} for i in range(4)]
    # answers ending otherwise than the system prompt ("Be brief."), but the last
    answers = [{"role": "assistant", "content": text} for text in ("Sure!", "```py\nx = 1\n```", "It is.")]
    conv = [system, users[0], answers[0], users[1], answers[1], users[2], answers[2], users[3]]
    prompt = tok.encode_chat(conv)
    kept = tok.kept_lengths(conv, prompt)
    assert [tok.decode(prompt[t:], skip_special_tokens=False)[:11] for t in kept.turn_starts] == [
        "Question 1?", "Question 2?", "Question 3?"]  # (the first's start is the head's end)
    assert kept.turn_starts[-1] == len(prompt) - kept.tail
    # a default system prompt ending as the stand-in answer of the header's probe may (Qwen2.5's)
    qwen25_like = Tokenizer(tok.hf, QWEN25_LIKE)
    for messages in (conv, conv[1:]):  # (its own system prompt, or the default)
        prompt = qwen25_like.encode_chat(messages)
        kept = qwen25_like.kept_lengths(messages, prompt)
        assert [qwen25_like.decode(prompt[t:], skip_special_tokens=False)[:11] for t in kept.turn_starts] == [
            "Question 1?", "Question 2?", "Question 3?"]
    # a template that writes the system prompt into the first user message (Gemma's): the header is
    # learnt from a stand-in conversation, not from the head
    gemma_like = Tokenizer(tok.hf, GEMMA_LIKE)
    prompt = gemma_like.encode_chat(conv)
    kept = gemma_like.kept_lengths(conv, prompt)
    assert gemma_like.decode(prompt[: kept.head], skip_special_tokens=False).endswith("user\nBe brief.\n\n")
    assert [gemma_like.decode(prompt[t:], skip_special_tokens=False)[:11] for t in kept.turn_starts] == [
        "Question 1?", "Question 2?", "Question 3?"]
    # a user header of one special token (Mistral's [INST]); one that is a word of a text is no header
    mistral_like = Tokenizer(tok.hf, MISTRAL_LIKE)
    prompt = mistral_like.encode_chat(conv[1:])
    kept = mistral_like.kept_lengths(conv[1:], prompt)
    assert [mistral_like.decode(prompt[t:], skip_special_tokens=False)[:12] for t in kept.turn_starts] == [
        " Question 1?", " Question 2?", " Question 3?"]
    worded = Tokenizer(tok.hf, MISTRAL_LIKE.replace("<|im_start|> ", "Q"))
    prompt = worded.encode_chat(conv[1:])
    assert worded.kept_lengths(conv[1:], prompt).turn_starts == ()
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}  # fmt: skip
    result = {"role": "tool", "content": "Sunny."}
    # a question answered by a tool's result, then the next: the newest turn is all since the last answer
    with_tools = [system, users[0], answers[0], users[1], call, result, users[2]]
    prompt = tok.encode_chat(with_tools)
    kept = tok.kept_lengths(with_tools, prompt)
    assert tok.decode(prompt[len(prompt) - kept.tail :], skip_special_tokens=False).startswith("Question 1?")
    assert kept.turn_starts == (len(prompt) - kept.tail,)  # (the tool's result is no user message to start at)
    # a tool's result written under a user header (Qwen's templates) is no user message to cut at
    tools_then = [system, users[0], call, result, answers[0], users[1], answers[1], users[2], call, result,
                  answers[2], users[3]]  # fmt: skip
    prompt = qwen25_like.encode_chat(tools_then)
    kept = qwen25_like.kept_lengths(tools_then, prompt)
    assert [qwen25_like.decode(prompt[t:], skip_special_tokens=False)[:11] for t in kept.turn_starts] == [
        "Question 1?", "Question 2?", "Question 3?"]
    first = [system, users[0], call, result, users[1]]  # no answer yet: all of it is the newest turn
    prompt = tok.encode_chat(first)
    assert tok.kept_lengths(first, prompt) == (kept.head, len(prompt) - kept.head, ())


def test_plan_turn_drops_an_earlier_cut_that_reaches_into_the_newest_turn():
    """A regenerated answer: the prompt ends inside what an earlier turn's cut dropped, which is now
    its newest turn: served whole (it fits), not with that cut applied."""
    rec = SessionRecord("s", list(range(150)), [Span("a", 0, HEAD), Span("a", 60, 150)], head=HEAD, dropped_until=60)
    plan = plan_turn(rec, list(range(70)), WINDOW, 16, 0, 0.5, "reuse", tail=30)  # its newest turn: [40, 70)
    assert plan.effective_prompt == list(range(70)) and plan.reuse == [Span("a", 0, HEAD)]
    # the cut before its newest turn (and the prompt too long to serve whole)
    same = plan_turn(rec, list(range(120)), WINDOW, 16, 0, 0.5, "reuse", tail=5)
    assert same.effective_prompt == list(range(HEAD)) + list(range(60, 120)) and same.reuse[-1] == Span("a", 60, 120)


def test_plan_turn_cuts_at_the_turn_start_nearest_the_share_it_drops():
    # user messages of the history start at 30, 60 and 90 (after the head); the newest turn at 100
    rec = SessionRecord("s", list(range(100)), [Span("a", 0, 100)], head=HEAD, dropped_until=HEAD)
    prompt, starts = list(range(100)) + [7] * 20, (30, 60, 90, 100)
    plan = plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse", tail=20, turn_starts=starts)
    # half the history (46 tokens) would end the cut at 54: the nearest turn start is 60
    assert plan.truncated_now == 60 - HEAD and plan.effective_prompt == list(range(HEAD)) + list(range(60, 100)) + [7] * 20
    assert plan.reuse == [Span("a", 0, HEAD), Span("a", 60, 100)]
    # a cut must make room: with 100 of 120 tokens to drop, only the newest turn's start (all the history) does
    tight = plan_turn(rec, prompt, 40, 8, 0, 0.5, "reuse", tail=20, turn_starts=starts)
    assert tight.effective_prompt == list(range(HEAD)) + [7] * 20
    # none given (a plain prompt): at the token
    assert plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse", tail=20).truncated_now == 46
    # none that makes room (the newest turn's start not given): at the token too
    assert plan_turn(rec, prompt, 40, 8, 0, 0.5, "reuse", tail=20, turn_starts=(30, 60)).truncated_now == len(prompt) - (40 - 8)
    # nor one past what may go: inside the head, the newest turn, or the earlier cut
    assert plan_turn(rec, prompt, WINDOW, 16, 0, 0.5, "reuse", tail=20, turn_starts=(4, 110)).truncated_now == 46
    # a later cut starts from the earlier one, at a later turn start
    cut = SessionRecord("s", list(range(150)), [Span("a", 0, HEAD), Span("a", 60, 150)], head=HEAD, dropped_until=60)
    later = plan_turn(cut, list(range(150)) + [7] * 40, WINDOW, 16, 0, 0.5, "reuse", tail=40,
                      turn_starts=(30, 60, 90, 100, 125, 150))  # fmt: skip
    assert later.dropped_until == 100  # (half its 90 history tokens ends at 105: 100 is the nearest)
    assert later.effective_prompt == list(range(HEAD)) + list(range(100, 150)) + [7] * 40
    assert later.reuse == [Span("a", 0, HEAD), Span("a", 100, 150)]


def test_user_starts_are_found_after_the_user_header():
    from cachedattention.model.tokenizer import user_starts

    # 5 = the end of a message, 6 = a user header; the head [1, 9, 5, 6] ends with one, the newest turn starts at 20
    prompt = [1, 9, 5, 6, 3, 3, 5, 8, 4, 4, 5, 6, 3, 6, 3, 5, 8, 4, 5, 6, 3, 3, 5]
    assert user_starts(prompt, [5, 6], 4, 20) == (12, 20)  # not after a lone 6 (inside a message: no end before it)
    assert user_starts([1, 9, 6, 3, 3, 8, 4, 6, 3], [6], 3, 8) == ()  # a header of one token: none (a cut anywhere)
    assert user_starts([1, 9, 6, 3, 3, 8, 4, 6, 3], [6], 3, 8, lone=True) == (8,)  # unless it is a special token
    assert user_starts([1, 6, 3, 8, 6, 3, 3, 8, 6, 3], [6], 2, 9, lone=True) == (5, 9)


@pytest.mark.parametrize("template", [None, MISTRAL_LIKE], ids=["chatml", "mistral-like"])
def test_a_truncated_chat_keeps_whole_messages(template, chat_model_dir):
    """Each cut ends where a user message's content starts: what the model reads after the kept
    head (the system prompt and a user header) is a message from its beginning, then whole turns."""
    llm = LLM(model=str(chat_model_dir), enable_store=True, cache=NO_DEVICE, max_model_len=256, chat_template=template)
    tok, params = llm.engine.tokenizer, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    conv, cuts, cut_in_history = [{"role": "system", "content": "You are brief."}], 0, 0
    for turn in range(12):
        conv.append({"role": "user", "content": f"Question {turn}: " + "tell me more " * (3 + turn % 4)})
        out = llm.chat(conv, params, session_id="s")[0]
        llm.engine.store.store.flush()
        prompt = tok.encode_chat(conv)
        head = tok.kept_lengths(conv, prompt).head
        assert out.prompt_token_ids[:head] == prompt[:head]
        if out.metrics.truncated_tokens:
            cuts += 1
            kept = tok.decode(out.prompt_token_ids[head:], skip_special_tokens=False).lstrip()
            first = int(kept.removeprefix("Question ").split(":")[0])
            assert kept.startswith(conv[2 * first + 1]["content"])  # a whole user message, then what followed it
            cut_in_history += first < turn  # (at an earlier turn's start, which the record kept)
            assert out.prompt_token_ids[head:] == prompt[len(prompt) - len(out.prompt_token_ids) + head :]
            assert out.metrics.cached_tokens["host"] > head  # the kept history's KV is reused
        conv.append({"role": "assistant", "content": out.outputs[0].text})
    assert cuts >= 2 and cut_in_history >= 1
    llm.engine.store.check_integrity()
    # a conversation new to the store, past the window: cut at one of its user messages, keeping some history
    whole = [*conv, {"role": "user", "content": "Question 12: and?"}]
    out = llm.chat(whole, params, session_id="new")[0]
    head = tok.kept_lengths(whole, tok.encode_chat(whole)).head
    kept = tok.decode(out.prompt_token_ids[head:], skip_special_tokens=False).lstrip()
    assert out.metrics.truncated_tokens > 0 and kept.startswith("Question ") and not kept.startswith("Question 12")


def test_an_edit_that_makes_a_cut_conversation_fit_serves_it_whole():
    """As a plain server would: the earlier cut was made to fit, and the edited conversation fits
    whole now. A conversation that goes on keeps its cut however short its turn."""
    rec = SessionRecord("s", list(range(150)), [Span("a", 0, HEAD), Span("a", 60, 150)], head=HEAD, dropped_until=60)
    edited = list(range(100)) + [9] * 10  # its answers from token 100 replaced by a short message: 110 tokens
    plan = plan_turn(rec, edited, WINDOW, 16, 0, 0.5, "reuse", tail=10)
    assert plan.effective_prompt == edited and plan.truncated_now == 0 and plan.inexact_from is None
    assert plan.reuse == [Span("a", 0, HEAD)]  # the history after the head is computed again, at its positions
    longer = list(range(100)) + [9] * 20  # one that does not fit whole keeps the cut (and its reused KV)
    assert plan_turn(rec, longer, WINDOW, 16, 0, 0.5, "reuse", tail=20).reuse == [Span("a", 0, HEAD), Span("a", 60, 100)]
    short = SessionRecord("t", list(range(100)), [Span("b", 0, HEAD), Span("b", 60, 100)], head=HEAD, dropped_until=60)
    going_on = plan_turn(short, list(range(100)) + [7] * 5, WINDOW, 16, 0, 0.5, "reuse", tail=5)
    assert going_on.effective_prompt == list(range(HEAD)) + list(range(60, 100)) + [7] * 5
    assert going_on.inexact_from == HEAD


def test_a_chat_message_past_the_window_is_refused_and_a_long_one_keeps_its_whole_turn(chat_model_dir):
    llm = LLM(model=str(chat_model_dir), enable_store=True, cache=NO_DEVICE, max_model_len=WINDOW)
    tok, params = llm.engine.tokenizer, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    conv = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello there, who are you?"}]
    conv.append({"role": "assistant", "content": llm.chat(conv, params, session_id="s")[0].outputs[0].text})
    with pytest.raises(ValueError, match="keeping the system prompt and the newest turn"):
        llm.chat([*conv, {"role": "user", "content": "word " * 200}], params, session_id="s")
    short = [*conv, {"role": "user", "content": "And then?"}]
    out = llm.chat(short, params, session_id="s")[0]  # the refused turn lost nothing of the session
    assert out.metrics.cached_tokens["host"] > tok.head_length(short, tok.encode_chat(short))
    conv = [*short, {"role": "assistant", "content": out.outputs[0].text}]
    for n in range(200, 1, -1):  # the longest message that fits the window with all the history dropped
        long = [*conv, {"role": "user", "content": "word " * n}]
        prompt = tok.encode_chat(long)
        head, tail, _ = tok.kept_lengths(long, prompt)
        if head + tail < WINDOW:
            break
    assert prompt[-tail:] == tok.encode_chat([{"role": "user", "content": "word " * n}])[-tail:]
    out = llm.chat(long, params, session_id="s")[0]  # (its answer has less room than truncation makes: cut at the window)
    assert out.prompt_token_ids == prompt[:head] + prompt[-tail:]
    assert out.metrics.truncated_tokens == len(prompt) - head - tail > 0
    with pytest.raises(ValueError, match="keeping the system prompt and the newest turn"):  # one word more
        llm.chat([*conv, {"role": "user", "content": "word " * (n + 1)}], params, session_id="s")
    llm.engine.store.check_integrity()


def hand_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate [n, heads, d] to positions, written out from the RoPE definition (rotate-half layout);
    a layer without RoPE (theta None) keeps x."""
    if theta is None:
        return x
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def stored_kv(store, spans, num_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's stored pre-RoPE K and V of the spans' tokens, from host; NaN where a segment
    dropped that (windowed) layer."""
    ks, vs = [], []
    for layer in range(num_layers):
        parts = []
        for s in spans:
            kv = store.host.get(s.seg_id)
            held = kv.layer(layer)
            if held is None:
                nan = torch.full((kv.num_tokens, *kv.k.shape[2:]), float("nan"), dtype=kv.k.dtype)
                held = (nan, nan)
            parts.append((held[0][s.lo : s.hi], held[1][s.lo : s.hi]))
        ks.append(torch.cat([k for k, _ in parts]))
        vs.append(torch.cat([v for _, v in parts]))
    return ks, vs


def layer_theta(cfg, layer: int) -> float | None:
    """The RoPE base of a layer (None: SmolLM3's layers without RoPE)."""
    if not (getattr(cfg, "no_rope_layers", None) or [1] * 99)[layer]:
        return None
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: a base per layer type
        return params[cfg.layer_types[layer]]["rope_theta"]
    return cfg.rope_theta if hasattr(cfg, "rope_theta") else params["rope_theta"]


# qwen3: the stored keys are normed per head; mistral-window: each layer sees its last 8 keys;
# gemma3: windowed layers with a RoPE base of their own beside a full one; smollm3: a layer without RoPE;
# olmo2: keys normed over the whole projection; gemma2: capped attention scores
@pytest.mark.parametrize("kind", ["mistral", "qwen3", "mistral-window", "gemma3", "smollm3", "olmo2", "gemma2"])
def test_truncated_cache_equals_hand_computed_reference(kind, tiny_dirs, monkeypatch):
    from transformers import DynamicCache

    path, hf = tiny_dirs[kind]
    llm = make(path)
    eng = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    conv = list(range(5, 45))
    for t in range(10):
        rid = eng.add_request(conv, params, session_id="s")
        req = eng.requests[rid]
        state = req.store_state
        if state.plan.truncated_now and state.plan.hit > HEAD:
            break
        out = run_to_end(llm, [rid])[0]
        eng.store.store.flush()
        conv = grow(conv, out, t)
    else:
        pytest.fail("the conversation never overflowed the window")
    seen = capture_logits(monkeypatch)
    eng.step()  # admission + layer-wise load + prefill of the new tokens
    hit = req.metrics.cached_tokens["host"]
    assert hit > HEAD and req.metrics.truncated_tokens > 0
    # 1) the pages hold the stored pre-RoPE keys rotated to their new positions 0..hit-1 (a windowed
    # layer from the page holding the first key the first new token sees there)
    ps, window = eng.pool.page_size, eng.spec.sliding_window
    slots = eng.pool.slots_for(req.pages, ps, 0, hit, eng.device)
    store = eng.store.store
    k_pre, v_st = stored_kv(store, state.reuse, 3)
    for layer in range(3):
        lo = max(0, (hit - window + 1) // ps * ps) if eng.spec.window(layer) else 0
        assert not k_pre[layer][lo:hit].isnan().any()  # a windowed layer's dropped KV lies before its window
        expect = hand_rope(k_pre[layer][:hit], torch.arange(hit), layer_theta(hf.config, layer))
        assert torch.allclose(eng.pool.k[layer][slots[lo:]], expect[lo:], atol=1e-5)
        assert torch.equal(eng.pool.v[layer][slots[lo:]], v_st[layer][lo:hit])
    # 2) attention over that cache: transformers fed the same rotated cache gives the same logits
    cache = DynamicCache()
    k_pre, v_st = ([t.nan_to_num(0.0) for t in kv] for kv in (k_pre, v_st))  # (keys no query sees there)
    for layer in range(3):
        k = hand_rope(k_pre[layer][:hit], torch.arange(hit), layer_theta(hf.config, layer))
        cache.update(k.transpose(0, 1)[None], v_st[layer][:hit].transpose(0, 1)[None], layer)
    assert rel_err(seen[0], last_logits_after(hf, cache, req.prompt_token_ids[hit:], hit)) <= 1e-4
    run_to_end(llm, [rid])


def test_long_conversation_keeps_working_and_reuses_after_overflow(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = make(path)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    conv, truncations, reused_after = list(range(5, 45)), 0, []
    for t in range(12):
        out = llm.generate([conv], params, session_id="s")[0]
        llm.engine.store.store.flush()
        if out.metrics.truncated_tokens:
            truncations += 1
            reused_after.append(out.metrics.cached_tokens["host"])
        assert len(out.prompt_token_ids) + len(out.token_ids) <= WINDOW
        assert out.prompt_token_ids[:HEAD] == list(range(5, 5 + HEAD))  # the head is always kept
        conv = grow(conv, out, t)
    assert truncations >= 2 and all(n > HEAD for n in reused_after)
    llm.engine.store.check_integrity()


@pytest.mark.parametrize("mode", ["reuse", "recompute"])
def test_pages_computed_before_a_cut_serve_no_other_request(mode, tiny_dirs):
    """After a reuse cut, the kept history's KV was computed with the dropped history: the device
    prefix cache serves those pages (and the turn's own, computed over them) to this session alone;
    another session or a request without one sending the same tokens gets the plain engine's answer.
    The recompute baseline's pages are exact: shared."""
    path, _ = tiny_dirs["llama"]
    plain = LLM(model=str(path), enable_store=False, max_model_len=96)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def cut_session():
        llm = LLM(model=str(path), enable_store=True, max_model_len=96, truncation=mode, keep_head_tokens=4)
        conv = [1] + list(range(10, 60))
        for t in range(3):
            out = llm.generate([conv], params, session_id="s")[0]
            conv = conv + out.token_ids + [100 + 3 * t + i for i in range(20)]
        assert out.metrics.truncated_tokens > 0
        return llm, conv, out.prompt_token_ids + out.token_ids + [7, 8, 9]

    for session in ("other", None):  # (each after a cut of its own: the first computes exact pages, which serve all)
        llm, conv, probe = cut_session()
        got = llm.generate([probe], params, session_id=session)[0]
        assert got.token_ids == plain.generate([probe], params)[0].token_ids
        assert (got.metrics.cached_tokens["device"] > 4) == (mode == "recompute")  # the head's page only, after a reuse cut
    # the session's own next turn still reuses its pages on the device
    own = llm.generate([conv], params, session_id="s")[0]
    assert own.metrics.cached_tokens["device"] > 4
    llm.engine.pages.check_integrity()
    if mode == "reuse":
        # its client cuts the history itself, where the store did: a turn planned as exact (it edits the
        # history the record dropped) computes what the cut's pages hold, not reading them
        llm, _, trimmed = cut_session()
        mine = llm.generate([trimmed], params, session_id="s")[0]
        assert mine.metrics.truncated_tokens == 0 and mine.metrics.cached_tokens["device"] <= 4
        assert mine.token_ids == plain.generate([trimmed], params)[0].token_ids
        llm.engine.pages.check_integrity()


def test_recompute_baseline_truncates_and_recomputes(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = make(path, mode="recompute")
    plain = LLM(model=str(path), max_model_len=WINDOW)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    conv, seen_truncation = list(range(5, 45)), False
    for t in range(8):
        out = llm.generate([conv], params, session_id="s")[0]
        llm.engine.store.store.flush()
        if out.metrics.truncated_tokens:
            seen_truncation = True
            assert out.metrics.cached_tokens["host"] <= HEAD  # only the head keeps its positions
        # recomputing the truncated prompt from scratch gives exactly these tokens
        assert out.token_ids == plain.generate([out.prompt_token_ids], params)[0].token_ids
        conv = grow(conv, out, t)
    assert seen_truncation
