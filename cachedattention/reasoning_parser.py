"""How reasoning models write their thinking (vLLM's --reasoning-parser): between <think> and
</think> (Seed-OSS: <seed:think> and </seed:think>; Magistral, `mistral`: its special tokens [THINK] and
[/THINK]), before the answer; gpt-oss's (`openai_gptoss`) in harmony's analysis channel
(cachedattention/harmony.py). Parsers whose tags are special tokens read text that keeps them. Shared by the server, which splits an answer's text into reasoning and
content, and the engine, which holds a guided answer to its shape only once the reasoning is over.

The rule, for both parsers: an answer is in its reasoning from its first token when it opens with
<think> itself (Qwen3's first release), when the prompt's last tag is an open <think> (templates that
write it for the model: Qwen3.5, DeepSeek-R1's later ones; a prefilled answer still thinking, with
continue_final_message), or always with `deepseek_r1` and `seed_oss` (they may start
thinking without a tag). A prompt that ends with a closed block (`<think></think>`, Qwen3's
enable_thinking=false) leaves the whole answer as content. Reasoning ends at </think>; an answer
cut before it (max_tokens) is all reasoning. Whitespace between the tags and the texts is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from cachedattention import harmony
from cachedattention.text_tags import tag_prefix_at_end

if TYPE_CHECKING:
    from cachedattention.model.tokenizer import Tokenizer

START, END = "<think>", "</think>"  # most models' tags
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
    start: str = START
    end: str = END
    keeps_special_tokens: bool = False  # its tags are special tokens: the answer's text must keep them
    # other forms of its tags (Granite's "Here's my thought process:" beside "Here is ..."), and how
    # much of the prompt's end `opens` reads (a phrase's prefill runs longer than a tag's)
    also_starts: tuple[str, ...] = ()
    also_ends: tuple[str, ...] = ()
    tail_tokens: int = PROMPT_TAIL_TOKENS

    @property
    def starts(self) -> tuple[str, ...]:
        return (self.start, *self.also_starts)

    @property
    def ends(self) -> tuple[str, ...]:
        return (self.end, *self.also_ends)

    def opens(self, prompt_tail: str, structured: bool) -> bool:
        """Whether an answer after a prompt ending in `prompt_tail` begins inside its reasoning
        (an answer that opens with <think> itself is inside it anyway). `structured`: the answer is
        held to its shape from its first token, so it has no reasoning."""
        if structured or self.closes(prompt_tail):
            return False
        # the tail's last tag opens it: the template's <think>, or a prefilled answer still thinking
        last_start = max(prompt_tail.rfind(start) for start in self.starts)
        return self.starts_open or last_start > max(prompt_tail.rfind(end) for end in self.ends)

    def answer_start(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int], tags: tuple[int, int] | None,
                     structured: bool = False) -> tuple[bool, bool]:  # fmt: skip
        """(`opens` for a prompt, `closes` for it), its tail decoded once. Where the tags are single
        tokens (`tags`: their ids, from `reasoning_tags`), the answer also opens inside its reasoning
        when the prompt's last tag is an open <think> further back than the tail (a long prefilled
        answer still thinking)."""
        if tokenizer is None:
            return self.opens("", structured), False
        tail = prompt_tail(tokenizer, prompt_ids, self.tail_tokens)
        closed = self.closes(tail)
        if self.opens(tail, structured):
            return True, closed
        if structured or closed or tags is None:
            return False, closed
        return next((t == tags[0] for t in reversed(prompt_ids) if t in tags), False), closed

    def closes(self, prompt_tail: str) -> bool:
        """Whether the prompt ends with a closed reasoning (Qwen3's enable_thinking=false): the answer has none."""
        return any(prompt_tail.rstrip().endswith(end) for end in self.ends)

    def reasoning_done(self, text: str, whole: Split) -> bool:
        """Whether this prefix of the answer's text holds all of its reasoning (`whole`: the answer's split)."""
        return any(end in text for end in self.ends)

    def split(self, text: str, open_at_start: bool, final: bool = True) -> Split:
        """The answer's text split into reasoning and content.

        Not `final` (text still growing): what may yet become a tag is held back, so that pieces
        shown as the text grows always add up to the final split."""
        body = text.lstrip()
        start = next((s for s in self.starts if body.startswith(s)), None)
        if start is not None:
            body, open_at_start = body[len(start) :], True
        elif not final and any(s.startswith(body) for s in self.starts):  # may still become <think> (blank text may come before one)
            return Split("" if open_at_start else None, "", closed=not open_at_start)
        elif not open_at_start:
            return Split(None, text)
        found = [(at, end) for end in self.ends if (at := body.find(end)) >= 0]
        if not found:
            held = 0 if final else max(tag_prefix_at_end(body, end) for end in self.ends)
            return Split(body[: len(body) - held].strip(), "", closed=False)
        at, end = min(found)
        return Split(body[:at].strip(), body[at + len(end) :].lstrip())


@dataclass(frozen=True)
class HarmonyParser(ReasoningParser):
    """gpt-oss: the analysis channel's messages are the reasoning; the final channel's (and
    commentary preambles) the content, where a message calling a function stays as written, for
    the `openai` tool-call parser. The channels say where each part goes: no prompt decides it."""

    def opens(self, prompt_tail: str, structured: bool) -> bool:
        return False

    def closes(self, prompt_tail: str) -> bool:
        return False

    def split(self, text: str, open_at_start: bool, final: bool = True) -> Split:
        if not harmony.is_harmony(text):  # not (yet) in harmony: all of it is the answer
            if final:
                return Split(None, text)
            held = len(text) if harmony.may_become_header(text) else harmony.partial_marker(text)
            return Split(None, text[: len(text) - held])
        reasoning, content, closed = [], [], final
        for m in harmony.messages(text, final):
            if m.channel == "analysis" and m.recipient is None:
                reasoning.append(m.body)
                closed = final  # another message may follow with more of it
            else:
                content.append(m.raw if m.recipient is not None else m.body)
                closed = True  # (an analysis message after the answer begun is a rare model's)
        return Split("\n".join(reasoning) if reasoning else None, "".join(content), closed)

    def reasoning_done(self, text: str, whole: Split) -> bool:
        """Whether this prefix of the answer's text holds all of its reasoning."""
        return self.split(text, False).reasoning == whole.reasoning


@dataclass(frozen=True)
class Ernie45Parser(ReasoningParser):
    """ERNIE 4.5 Thinking: reasoning from the answer's first token (its template opens <think>) to
    </think>; the answer after it may come wrapped in <response> and </response>, which are dropped
    (what follows </response> too), with the whitespace between them and the answer."""

    def split(self, text: str, open_at_start: bool, final: bool = True) -> Split:
        whole = super().split(text, open_at_start, final)
        if whole.reasoning is None or not whole.closed:
            return whole
        return whole._replace(content=_unwrapped(whole.content, final))


RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"


def _unwrapped(content: str, final: bool) -> str:
    """ERNIE's answer without its <response> tags; still growing (not `final`), without what may yet
    become one or be whitespace before one."""
    if not content.startswith(RESPONSE_OPEN):
        return "" if not final and RESPONSE_OPEN.startswith(content) else content  # (may still become it)
    body = content[len(RESPONSE_OPEN) :].lstrip()
    end = body.rfind(RESPONSE_CLOSE)
    if end >= 0:
        return body[:end].rstrip()
    if final:  # (cut before its closing tag: max_tokens)
        return body
    return body[: len(body) - tag_prefix_at_end(body, RESPONSE_CLOSE)].rstrip()


# Granite 3.2: the reasoning after "Here is my thought process:", the answer after "Here is my
# response:", each also with "Here's"; phrases, not tokens, whose prefill runs longer than a tag's
GRANITE = ReasoningParser("granite", False, "Here is my thought process:", "Here is my response:",
                          also_starts=("Here's my thought process:",), also_ends=("Here's my response:",),
                          tail_tokens=512)  # fmt: skip
REASONING_PARSERS = {p.name: p for p in (ReasoningParser("qwen3", False), ReasoningParser("deepseek_r1", True),
                                         ReasoningParser("seed_oss", True, "<seed:think>", "</seed:think>"),
                                         ReasoningParser("mistral", False, "[THINK]", "[/THINK]", True),
                                         HarmonyParser("openai_gptoss", False, "<|channel|>analysis<|message|>",
                                                       "<|end|>", True),
                                         # GLM-4.5 to 4.7 and OLMo 3 think between <think> and </think> as Qwen3
                                         ReasoningParser("glm45", False), ReasoningParser("glm47", False),
                                         ReasoningParser("olmo3", False), GRANITE,
                                         Ernie45Parser("ernie45", True))}  # fmt: skip


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]


def reasoning_tags(tokenizer: Tokenizer | None, parser: ReasoningParser) -> tuple[int, int] | None:
    """The ids of the parser's tags (<think> and </think>) when each is one token that decodes as itself, else None."""
    if tokenizer is None:
        return None
    ids = tuple(tokenizer.single_token_id(tag) for tag in (parser.start, parser.end))
    return None if None in ids else ids


def prompt_tail(tokenizer: Tokenizer, prompt_ids: Sequence[int], tokens: int = PROMPT_TAIL_TOKENS) -> str:
    """The end of a prompt as text, special tokens kept: enough to hold an open or closed <think></think>."""
    return tokenizer.decode(list(prompt_ids[-tokens:]), skip_special_tokens=False)
