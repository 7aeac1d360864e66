"""vLLM's offline beam search (`LLM.beam_search`): each step extends every beam by one token through
the engine (the beams' shared prefixes served by the device prefix cache), keeps the beam_width best
by vLLM's score, and sets aside those that wrote the end-of-sequence token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachedattention.sampling import SamplingParams, is_int, is_number


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's: `beam_width` beams, each at most `max_tokens` tokens past its prompt; `temperature`
    scales the logits a step's token is drawn from (0: greedy), while beams are ranked by the
    model's own log-probabilities; `length_penalty` divides a beam's cumulative log-probability by
    its length (prompt included) to that power; `ignore_eos` keeps beams going past the
    end-of-sequence token."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # (vLLM's field: its beam search writes no stop strings either)

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {v!r:.40}")
        for name in ("temperature", "length_penalty"):
            v = getattr(self, name)
            if not is_number(v):
                raise ValueError(f"{name} must be a finite number, got {v!r:.40}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class BeamSearchSequence:
    """One beam, as vLLM's: its tokens (the prompt's first), each step's logprobs (the token's own and
    the 2 x beam_width most likely), their sum, and its text (the whole sequence's, prompt included,
    as vLLM decodes it) once it is returned; `finish_reason` "stop" for a beam that wrote the end of
    sequence, else "length"."""

    tokens: list[int]
    logprobs: list[Any] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """A prompt's best beams, the best first (beam_width of them, fewer if fewer were found)."""

    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's rank of a beam: its cumulative log-probability over its length to the penalty's power
    (the prompt counted, a final end-of-sequence token not)."""
    length = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length**length_penalty)


def beam_search(prompts: list[list[int]], params: BeamSearchParams, eos_token_id: int | None,
                step: Callable[[list[list[int]], SamplingParams], list], decode: Callable[[list[int]], str]
                ) -> list[BeamSearchOutput]:  # fmt: skip
    """Beam search over each prompt's token ids. `step(token_lists, sampling_params)` runs one token
    for each list (the engine's outputs, in order); `decode` gives a beam's text."""
    one_token = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width,
                               ignore_eos=True)  # (the end token is a beam's to write: it is set aside below)
    beams = [[BeamSearchSequence(list(p))] for p in prompts]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    def score(beam: BeamSearchSequence) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, eos_token_id, params.length_penalty)

    for _ in range(params.max_tokens):
        running = [(i, beam) for i, each in enumerate(beams) for beam in each]
        if not running:
            break
        outputs = step([beam.tokens for _, beam in running], one_token)
        grown: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(running, outputs, strict=True):
            entry = out.logprobs[0]
            for token, logprob in entry.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], beam.cum_logprob + logprob.logprob)
                if token == eos_token_id and not params.ignore_eos:
                    new.finish_reason = "stop"
                    completed[i].append(new)
                else:
                    grown[i].append(new)
        beams = [sorted(each, key=score, reverse=True)[: params.beam_width] for each in grown]
    results = []
    for done, left in zip(completed, beams):
        for beam in left:  # (the ends written were set aside: these ran out of tokens)
            beam.finish_reason = "length"
        best = sorted(done + left, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            beam.text = decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results
