"""vLLM's offline beam search (`LLM.beam_search`): each step extends every beam by one token through
the engine (the beams' shared prefixes served by the device prefix cache), keeps the beam_width best
by vLLM's score, and sets aside those that wrote the end-of-sequence token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachedattention.errors import InvalidRequest
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


def check_width(params: BeamSearchParams, max_logprobs: int) -> None:
    """ValueError when a step's 2 x beam_width logprobs pass the engine's max_logprobs (said in the
    search's terms: the request asked for no logprobs)."""
    if 2 * params.beam_width > max_logprobs:
        raise InvalidRequest(f"beam search with beam_width {params.beam_width} reads the {2 * params.beam_width} most "
                         f"likely tokens at each step, past this engine's max_logprobs of {max_logprobs} "
                         f"(--max-logprobs); use a beam width of at most {max_logprobs // 2}", "n")  # fmt: skip


def one_token_params(params: BeamSearchParams, logprobs: int = 0) -> SamplingParams:
    """A step's request: one token, with the 2 x beam_width most likely (its candidates) or, when
    more, the `logprobs` alternatives an answer reports."""
    return SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=max(2 * params.beam_width, logprobs),
                          ignore_eos=True)  # (the end token is a beam's to write: it is set aside)  # fmt: skip


class BeamSearch:
    """The search over a batch of prompts, one step at a time: `pending()` lists the beams to run one
    token further (with `one_token`), `advance(outputs)` takes the engine's outputs for them, in order,
    and `best(decode)` gives each prompt's result once `pending()` is empty. `logprobs`: alternatives a
    step reads beyond the 2 x beam_width that are its candidates (a server's answer reports them)."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_id: int | None,
                 logprobs: int = 0) -> None:  # fmt: skip
        self.params = params
        self.eos_token_id = eos_token_id
        self.width = 2 * params.beam_width  # the candidates each beam offers: its most likely tokens
        self.one_token = one_token_params(params, logprobs)
        self.beams = [[BeamSearchSequence(list(p))] for p in prompts]
        self.completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0
        self._running: list[tuple[int, BeamSearchSequence]] = []

    def score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, self.eos_token_id, self.params.length_penalty)

    def pending(self) -> list[list[int]]:
        """The token lists to run one token further now (none: the search is over)."""
        if self.steps >= self.params.max_tokens:
            return []
        self._running = [(i, beam) for i, each in enumerate(self.beams) for beam in each]
        return [beam.tokens for _, beam in self._running]

    def advance(self, outputs: Sequence[Any]) -> None:
        """Each beam grown by its candidates (the token drawn and the 2 x beam_width most likely), the
        ends of sequence set aside, the beam_width best of each prompt kept."""
        grown: list[list[BeamSearchSequence]] = [[] for _ in self.beams]
        for (i, beam), out in zip(self._running, outputs, strict=True):
            entry = out.logprobs[0]
            for k, (token, logprob) in enumerate(entry.items()):
                if k > 0 and logprob.rank is not None and logprob.rank > self.width:
                    continue  # (read for the answer's logprobs, not a candidate)
                cum = beam.cum_logprob + logprob.logprob
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], cum)
                if token == self.eos_token_id and not self.params.ignore_eos:
                    new.finish_reason = "stop"
                    self.completed[i].append(new)
                else:
                    grown[i].append(new)
        self.beams = [sorted(each, key=self.score, reverse=True)[: self.params.beam_width] for each in grown]
        self.steps += 1

    def best(self, decode: Callable[[list[int]], str]) -> list[BeamSearchOutput]:
        """Each prompt's beam_width best beams, ended or not, the best first, their text decoded."""
        results = []
        for done, left in zip(self.completed, self.beams):
            for beam in left:  # (the ends written were set aside: these ran out of tokens)
                beam.finish_reason = "length"
            best = sorted(done + left, key=self.score, reverse=True)[: self.params.beam_width]
            for beam in best:
                beam.text = decode(beam.tokens)
            results.append(BeamSearchOutput(best))
        return results


def beam_search(prompts: list[list[int]], params: BeamSearchParams, eos_token_id: int | None,
                step: Callable[[list[list[int]], SamplingParams], list], decode: Callable[[list[int]], str]
                ) -> list[BeamSearchOutput]:  # fmt: skip
    """Beam search over each prompt's token ids. `step(token_lists, sampling_params)` runs one token
    for each list (the engine's outputs, in order); `decode` gives a beam's text."""
    search = BeamSearch(prompts, params, eos_token_id)
    while beams := search.pending():
        search.advance(step(beams, search.one_token))
    return search.best(decode)
