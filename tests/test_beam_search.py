"""vLLM's offline beam search (LLM.beam_search): the same beams as a search over transformers' own
log-probabilities, ends of sequence set aside and scored as vLLM scores them, and refusals."""

from __future__ import annotations

import pytest
import torch

from cachedattention import LLM, BeamSearchParams
from cachedattention.beam_search import BeamSearch, beam_score, beam_search
from cachedattention.errors import InvalidRequest
from cachedattention.sampling import Logprob, TokenLogprob


def reference_search(hf, prompt: list[int], width: int, steps: int) -> list[tuple[list[int], float]]:
    """The search vLLM's algorithm makes, over transformers' logits (no ends of sequence written here)."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        grown = []
        for tokens, cum in beams:
            with torch.no_grad():
                lp = torch.log_softmax(hf(input_ids=torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
            values, ids = torch.topk(lp, 2 * width)
            grown += [(tokens + [t], cum + v) for t, v in zip(ids.tolist(), values.tolist())]
        beams = sorted(grown, key=lambda b: b[1] / len(b[0]), reverse=True)[:width]
    return beams


def test_the_beams_equal_a_search_over_transformers_log_probabilities(tiny_dirs):
    path, hf = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    prompts = [[1, 5, 9, 33], [1, 7, 8]]
    outs = llm.beam_search([{"prompt_token_ids": prompts[0]}, prompts[1]], BeamSearchParams(beam_width=3, max_tokens=4,
                                                                                          ignore_eos=True))  # fmt: skip
    for prompt, out in zip(prompts, outs):
        ref = reference_search(hf, prompt, 3, 4)
        assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
        assert all(abs(s.cum_logprob - cum) <= 1e-4 for s, (_, cum) in zip(out.sequences, ref))
        assert all(s.finish_reason == "length" and len(s.logprobs) == 4 for s in out.sequences)


def test_a_text_prompt_s_beams_read_as_vllm_s(chat_model_dir):
    """Tokens and text include the prompt, as vLLM's."""
    llm = LLM(model=str(chat_model_dir))
    tok = llm.get_tokenizer()
    out = llm.beam_search(["Once upon a time"], BeamSearchParams(beam_width=2, max_tokens=3))[0]
    prompt = tok.encode("Once upon a time")
    for seq in out.sequences:
        assert seq.tokens[: len(prompt)] == prompt and seq.text == tok.decode(seq.tokens)


def test_a_beam_that_writes_the_end_is_set_aside_and_scored_without_it():
    """A fake model over a vocabulary of 3 tokens (2 ends the sequence): the end taken early, with
    the best score, is returned first though searching went on; lengths divide by their power."""
    table = {(): {2: -0.1, 0: -1.0, 1: -3.0}, (0,): {2: -5.0, 0: -0.2, 1: -0.3}}

    class Out:
        def __init__(self, entry):
            self.logprobs = [entry]

    def step(beams, sampling):
        assert sampling.max_tokens == 1 and sampling.logprobs == 4
        return [Out({t: Logprob(v) for t, v in table.get(tuple(b[1:]), {0: -2.0, 1: -2.5, 2: -4.0}).items()})
                for b in beams]  # fmt: skip

    out = beam_search([[7]], BeamSearchParams(beam_width=2, max_tokens=3), 2, step, lambda tokens: str(tokens))[0]
    best = out.sequences[0]
    assert best.tokens == [7, 2] and best.finish_reason == "stop" and best.cum_logprob == pytest.approx(-0.1)
    assert out.sequences[1].finish_reason == "length" and len(out.sequences[1].tokens) == 4
    assert beam_score([7, 2], -0.1, 2, 1.0) == pytest.approx(-0.1)  # (the end is not counted in the length)
    assert beam_score([7, 0, 0], -1.2, 2, 2.0) == pytest.approx(-1.2 / 9)
    kept_going = beam_search([[7]], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True), 2, step, str)[0]
    assert all(s.finish_reason == "length" and len(s.tokens) == 4 for s in kept_going.sequences)


def test_what_beam_search_cannot_take_is_refused(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    for bad in ({"beam_width": 0, "max_tokens": 4}, {"beam_width": 2, "max_tokens": 0},
                {"beam_width": 2, "max_tokens": 4, "temperature": -1.0},
                {"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], {"beam_width": 2, "max_tokens": 4})
    with pytest.raises(InvalidRequest, match="beam width of at most 10"):  # (2 x 11 a step, past vLLM's 20)
        llm.beam_search([[1, 2]], BeamSearchParams(beam_width=11, max_tokens=2))


def test_alternatives_read_for_an_answer_s_logprobs_are_no_candidates():
    """A server's request asking for more logprobs than 2 x beam_width reads them at each step, but
    its beams grow only by the 2 x beam_width most likely tokens (and the one drawn), as vLLM's: an
    end of sequence ranked third, for one beam, is not set aside as a finished beam."""
    entry = TokenLogprob(4, -0.1, 1, ((4, -0.1), (5, -0.2), (2, -0.3), (6, -5.0)))

    class Out:
        logprobs = [entry]

    search = BeamSearch([[7]], BeamSearchParams(beam_width=1, max_tokens=1), 2, logprobs=4)
    assert search.one_token.logprobs == 4
    while beams := search.pending():
        search.advance([Out() for _ in beams])
    assert [s.tokens for s in search.best(str)[0].sequences] == [[7, 4]]
    assert search.completed == [[]]  # (without the bound: [7, 2] set aside, scored -0.3 / 1, the best)
    wide = BeamSearch([[7]], BeamSearchParams(beam_width=2, max_tokens=1), 2, logprobs=4)
    while beams := wide.pending():
        wide.advance([Out() for _ in beams])
    assert [s.tokens for s in wide.completed[0]] == [[7, 2]]  # (ranked third: within 2 x 2)
