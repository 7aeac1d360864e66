"""A guided answer from a reasoning model reasons first (vLLM's rule with a reasoning parser): no shape
while it thinks, <think> allowed at its first token, the shape held from </think> on; where the tags
are not single tokens, the shape holds from the first token."""

from __future__ import annotations

import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.reasoning_gate import ReasoningGate
from cachedattention.reasoning_parser import REASONING_PARSERS

YES, NO, START, END, HMM, EOS = range(6)
TEXT = {YES: b"yes", NO: b"no", START: b"<think>", END: b"</think>", HMM: b"hmm", EOS: b""}


def constraint(gate: ReasoningGate | None) -> GuidedConstraint:
    automaton = SamplingParams(choice=("yes", "no")).guided_automaton()
    return GuidedConstraint(automaton, TEXT.__getitem__, lambda t: t == EOS, enders=(EOS,), end_token=EOS,
                            reasoning=gate)  # fmt: skip


def allowed(c: GuidedConstraint) -> set[int]:
    row = c.mask(torch.zeros(len(TEXT)))
    return {t for t in TEXT if row[t] != float("-inf")}


def test_the_shape_holds_only_after_the_reasoning():
    c = constraint(ReasoningGate(START, END, reasoning=False, may_open=True))
    assert allowed(c) == {YES, NO, START}  # the first token: the shape's, or <think>
    c.accept(START)
    assert allowed(c) == set(TEXT) and not c.done  # thinking: anything, the end of sequence too
    for t in (HMM, YES, HMM):
        c.accept(t)
        assert not c.done  # "yes" inside the reasoning is not the answer
    c.accept(END)
    assert allowed(c) == {YES, NO}  # </think>: the shape from here, <think> no longer
    c.accept(NO)
    assert c.done


def test_an_answer_that_does_not_open_its_reasoning_is_shaped_from_its_first_token():
    c = constraint(ReasoningGate(START, END, reasoning=False, may_open=True))
    c.accept(YES)
    assert c.done and not c.reasoning.reasoning


def test_a_prompt_that_opened_or_closed_the_reasoning_decides_the_start():
    opened = constraint(ReasoningGate(START, END, reasoning=True, may_open=False))
    assert allowed(opened) == set(TEXT)
    closed = constraint(ReasoningGate(START, END, reasoning=False, may_open=False))
    assert allowed(closed) == {YES, NO}
    assert allowed(constraint(None)) == {YES, NO}


@pytest.mark.parametrize("name, tail, reasoning, may_open", [
    ("qwen3", "<|im_start|>assistant\n", False, True),  # the model may open it itself
    ("qwen3", "assistant\n<think>\n", True, False),  # the template opened it
    ("qwen3", "<think>\n\n</think>\n\n", False, False),  # enable_thinking=false
    ("deepseek_r1", "<|Assistant|>", True, False),  # R1 starts thinking without the tag
    ("qwen3", "assistant\n<think>\nLet me check", True, False),  # a prefilled answer still thinking
    ("qwen3", "assistant\n<think>\n" + "Let me check the weather first, then the map. " * 4, True, False),  # far back
    ("qwen3", "<think>\nA.\n</think>\n\nB.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
     False, True),  # the history's reasoning is closed: this answer may open its own
])  # fmt: skip
def test_the_gate_reads_the_prompt_as_the_server_splits_it(name, tail, reasoning, may_open, thinking_model):
    from cachedattention.model.tokenizer import Tokenizer

    path, start, end = thinking_model
    tok = Tokenizer.from_pretrained(str(path))
    gate = ReasoningGate.for_prompt(REASONING_PARSERS[name], (start, end), tok, tok.encode(tail))
    assert (gate.reasoning, gate.may_open) == (reasoning, may_open)


def test_the_engine_lets_the_model_reason_before_a_guided_answer(thinking_model):
    """Greedy, with every token but </think> pushed far down and </think> up: the model closes its
    reasoning first. With the parser the answer goes on to a choice after it; without, </think> is
    not one of the choice's tokens and the answer is the choice from its first token."""
    path, start, end = thinking_model
    prompt = [*range(100, 120), start]  # the prompt opened the reasoning
    params = SamplingParams(choice=("yes", "no"), temperature=0, max_tokens=8, logit_bias={end: 100.0})
    llm = LLM(model=str(path), reasoning_parser="qwen3")
    assert llm.engine.guided_after_reasoning
    out = llm.generate([prompt], params)[0]
    assert out.token_ids[0] == end and out.text.split("</think>")[1] in ("yes", "no")
    assert out.finish_reason == "stop"
    plain = LLM(model=str(path)).generate([prompt], params)[0]
    assert end not in plain.token_ids and plain.text in ("yes", "no")


def test_without_single_token_tags_the_answer_is_shaped_from_its_start(chat_model_dir):
    llm = LLM(model=str(chat_model_dir), reasoning_parser="qwen3")  # SmolLM2's tokenizer: <think> is several tokens
    assert not llm.engine.guided_after_reasoning
    out = llm.generate(["Is it?"], SamplingParams(choice=("yes", "no"), temperature=0, max_tokens=8))[0]
    assert out.text in ("yes", "no")


def test_an_unknown_reasoning_parser_is_refused():
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen9'"):
        LLM(reasoning_parser="qwen9")
