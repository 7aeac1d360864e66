"""vLLM's --reasoning-parser in the server: the thinking a reasoning model writes before its answer
comes back apart, as the message's `reasoning` (and `reasoning_content`, its older name), and only
what follows is the answer's `content` (where tool calls are looked for). How the thinking is
written, and when an answer starts inside it: `cachedattention/reasoning_parser.py`. Streamed
reasoning holds its trailing whitespace until more text follows.

A structured answer (response_format, guided_*, a forced tool call) reasons first, as vLLM's, when
the tags are single tokens of the tokenizer (the engine holds the answer to its shape only after
</think>: engine/reasoning_gate.py); otherwise it is held to its shape from its first token and has
no reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cachedattention.reasoning_parser import (  # noqa: F401 (REASONING_PARSERS, reasoning_parser: the server's names)
    REASONING_PARSERS,
    ReasoningParser,
    Split,
    reasoning_parser,
)
from cachedattention.server.stream_text import stream_delta

if TYPE_CHECKING:
    from cachedattention.model.tokenizer import Tokenizer
    from cachedattention.outputs import RequestOutput


@dataclass
class Reasoning:
    """One request's reasoning: the server's parser, whether the answer is structured from its first
    token (then it has none), whether the client wants it (vLLM's include_reasoning; if not, it is dropped, and the
    content is still only what follows it), and how the answer's text was decoded."""

    parser: ReasoningParser
    structured: bool = False
    include: bool = True
    skip_special_tokens: bool = True
    tags: tuple[int, int] | None = None  # the engine's reasoning_tags: <think> and </think> as token ids
    _open: bool | None = field(default=None, repr=False)  # decided once: every choice shares the prompt

    def split(self, out: RequestOutput, tokenizer: Tokenizer | None, final: bool = True) -> Split:
        """The split as the client sees it: a final reasoning that is empty is none, and none unless
        included."""
        parts = self.parser.split(out.text, self._opens(out, tokenizer), final)
        if not self.include or (final and not parts.reasoning):
            return parts._replace(reasoning=None)
        return parts

    def _opens(self, out: RequestOutput, tokenizer: Tokenizer | None) -> bool:
        if self._open is None:
            self._open = self.parser.answer_start(tokenizer, out.prompt_token_ids, self.tags, self.structured)[0]
        return self._open

    def tokens(self, out: RequestOutput, tokenizer: Tokenizer | None) -> int:
        """How many of the answer's tokens (so far) are its reasoning: up to the one that completes
        it (</think>; harmony: its last analysis message's body), found by bisection (whether a
        prefix holds all of it only grows with the prefix), or all of them while it is not closed;
        0 without reasoning."""
        parts = self.parser.split(out.text, self._opens(out, tokenizer)) if tokenizer is not None else None
        if parts is None or parts.reasoning is None:
            return 0
        done = self.parser.reasoning_done(out.text, parts)
        if not parts.reasoning and not done:
            return 0
        if not done:
            return len(out.token_ids)
        lo, hi = 1, len(out.token_ids)  # the shortest prefix holding all of it lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            text = tokenizer.decode(out.token_ids[:mid], skip_special_tokens=self.skip_special_tokens)
            if self.parser.reasoning_done(text, parts):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fields(self, reasoning: str | None) -> dict[str, Any]:
        """A message's or delta's reasoning, under vLLM's name and its older one."""
        return {"reasoning": reasoning, "reasoning_content": reasoning}


def reasoning_delta(split: Split, sent: str, stops: tuple[str, ...]) -> str:
    """More of a streamed reasoning that is safe to show, as stream_delta says; while it may still
    grow, neither what may start a stop string nor its trailing whitespace (a stop string may end the
    reasoning there, and the whole answer's is trimmed)."""
    if split.closed:  # it can no longer grow: all of it
        return stream_delta(split.reasoning or "", sent, ())
    return stream_delta(split.reasoning or "", sent, stops).rstrip()


def split_answer(reasoning: Reasoning | None, out: RequestOutput, tokenizer: Tokenizer | None,
                 final: bool = True) -> Split:  # fmt: skip
    """An answer split as its request's reasoning says (without a parser, all of it is content)."""
    return Split(None, out.text) if reasoning is None else reasoning.split(out, tokenizer, final)
