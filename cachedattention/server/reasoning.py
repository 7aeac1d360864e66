"""vLLM's --reasoning-parser: the thinking a reasoning model writes before its answer (between
<think> and </think>) comes back apart, as the message's `reasoning` (and `reasoning_content`, its
older name), and only what follows is the answer's `content` (where tool calls are looked for).

The rule, for both parsers: an answer is in its reasoning from its first token when it opens with
<think> itself (Qwen3's first release), when the prompt ends with an open <think> (templates that
write it for the model: Qwen3.5, DeepSeek-R1's later ones), or always with `deepseek_r1` (R1 starts
thinking without a tag). A prompt that ends with a closed block (`<think></think>`, Qwen3's
enable_thinking=false) leaves the whole answer as content. Reasoning ends at </think>; an answer
cut before it (max_tokens) is all reasoning. Whitespace between the tags and the texts is dropped
(streamed reasoning holds its trailing whitespace until more text follows).
A structured answer (response_format, guided_*, a forced tool call) is held to its shape from its
first token, so it has no reasoning here (vLLM lets the model reason first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from cachedattention.server.stream_text import stream_delta

if TYPE_CHECKING:
    from cachedattention.model.tokenizer import Tokenizer
    from cachedattention.outputs import RequestOutput

START, END = "<think>", "</think>"
PROMPT_TAIL_TOKENS = 8  # enough of the prompt's end to hold an open or closed <think></think>


class Split(NamedTuple):
    """An answer's text, split: its reasoning (None: it has none), the content after it, and whether
    the reasoning is over (closed by </think>, or none at all): then it can no longer grow."""

    reasoning: str | None
    content: str
    closed: bool = True


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_open: bool  # the model reasons first even without a tag (DeepSeek-R1)

    def opens(self, prompt_tail: str, structured: bool) -> bool:
        """Whether an answer after a prompt ending in `prompt_tail` begins inside its reasoning
        (an answer that opens with <think> itself is inside it anyway)."""
        tail = prompt_tail.rstrip()
        if structured or tail.endswith(END):
            return False
        return self.starts_open or tail.endswith(START)

    def split(self, text: str, open_at_start: bool, final: bool = True) -> Split:
        """The answer's text split into reasoning and content.

        Not `final` (text still growing): what may yet become a tag is held back, so that pieces
        shown as the text grows always add up to the final split."""
        body = text.lstrip()
        if body.startswith(START):
            body, open_at_start = body[len(START) :], True
        elif not final and START.startswith(body):  # may still become <think> (blank text may come before one)
            return Split("" if open_at_start else None, "", closed=not open_at_start)
        elif not open_at_start:
            return Split(None, text)
        reasoning, closed, content = body.partition(END)
        if not closed:
            held = 0 if final else _tag_prefix_at_end(reasoning, END)
            return Split(reasoning[: len(reasoning) - held].strip(), "", closed=False)
        return Split(reasoning.strip(), content.lstrip())


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that starts `tag` (0: none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass
class Reasoning:
    """One request's reasoning: the server's parser, whether the answer is structured (then it has
    none), whether the client wants it (vLLM's include_reasoning; if not, it is dropped, and the
    content is still only what follows it), and how the answer's text was decoded."""

    parser: ReasoningParser
    structured: bool = False
    include: bool = True
    skip_special_tokens: bool = True
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
            ids = out.prompt_token_ids[-PROMPT_TAIL_TOKENS:]
            tail = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else ""
            self._open = self.parser.opens(tail, self.structured)
        return self._open

    def tokens(self, out: RequestOutput, tokenizer: Tokenizer | None) -> int:
        """How many of the answer's tokens (so far) are its reasoning: up to the one that completes
        </think> (found by bisection: whether a prefix's text holds the tag only grows with the
        prefix), or all of them while the reasoning is not closed; 0 without reasoning."""
        parts = self.parser.split(out.text, self._opens(out, tokenizer)) if tokenizer is not None else None
        if parts is None or parts.reasoning is None or (not parts.reasoning and END not in out.text):
            return 0
        if END not in out.text:
            return len(out.token_ids)
        lo, hi = 1, len(out.token_ids)  # the shortest prefix whose text holds the tag lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if END in tokenizer.decode(out.token_ids[:mid], skip_special_tokens=self.skip_special_tokens):
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


REASONING_PARSERS = {p.name: p for p in (ReasoningParser("qwen3", False), ReasoningParser("deepseek_r1", True))}


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]
