"""A guided answer from a reasoning model reasons first, as vLLM's: with a reasoning parser, the
answer's shape (a JSON schema, a choice, a forced tool call...) holds only after </think>. Until
then every token is free; at the answer's first token, where the model may open its reasoning
itself (Qwen3's first release writes <think> unprompted), <think> is allowed beside the shape's
tokens. The tags are followed as token ids, so the gate exists only where each tag is one token
of the tokenizer (Qwen3's, QwQ's and DeepSeek-R1's are); elsewhere the answer is shaped from its
first token and has no reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cachedattention.reasoning_parser import ReasoningParser

if TYPE_CHECKING:
    from cachedattention.model.tokenizer import Tokenizer


@dataclass
class ReasoningGate:
    """Where one answer stands with its reasoning: inside it (no shape held), or before its first
    token (it may still open one), or past it (the shape holds from here)."""

    start: int  # the <think> token
    end: int  # the </think> token
    reasoning: bool
    may_open: bool

    @classmethod
    def for_prompt(cls, parser: ReasoningParser, tags: tuple[int, int], tokenizer: Tokenizer,
                   prompt_ids: Sequence[int]) -> ReasoningGate:  # fmt: skip
        """As the server splits the answer (the same rule on the same prompt tail)."""
        reasoning, closed = parser.answer_start(tokenizer, prompt_ids, tags)
        return cls(*tags, reasoning=reasoning, may_open=not reasoning and not closed)

    @property
    def over(self) -> bool:
        """Whether the answer's shape holds for the next token."""
        return not self.reasoning

    def accept(self, token: int) -> bool:
        """Follow a sampled token; whether it belonged to the reasoning (the shape does not see it)."""
        if self.reasoning:
            self.reasoning = token != self.end
            return True
        if self.may_open:
            self.may_open = False
            self.reasoning = token == self.start
            return self.reasoning
        return False
