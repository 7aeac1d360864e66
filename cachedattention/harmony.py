"""gpt-oss's harmony format, as an answer's text shows it with its special tokens kept: messages of
<|start|>ROLE<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>FORMAT]<|message|>BODY<|end|>, the
answer's first one without its <|start|>assistant (the prompt ends with it), its last ended by
<|return|> or, for a tool call, <|call|> (both end the answer, so neither is in its text). The
recipient may also come before the channel. Channels: `analysis` (its reasoning), `commentary`
(tool calls to functions.NAME, or a preamble), `final` (the answer)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachedattention.text_tags import tag_prefix_at_end

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
ENDS = (END, "<|return|>", "<|call|>")
RECIPIENT = re.compile(r"\bto=([^\s<]+)")
FUNCTIONS = "functions."


@dataclass(frozen=True)
class Message:
    channel: str | None
    recipient: str | None  # e.g. functions.get_weather
    body: str
    raw: str  # the message as written, from its <|start|> (or <|channel|>) to its body's end
    complete: bool  # its end was written (or the answer ended)


def is_harmony(text: str) -> bool:
    """Whether the text is written in harmony (every answer of gpt-oss opens a message header)."""
    return CHANNEL in text or MESSAGE in text


def messages(text: str, final: bool = True) -> list[Message]:
    """The messages of an answer's text. A message whose header is still being written (not
    `final`) is left out: its channel is not known yet. Text outside any message is dropped."""
    out = []
    for i, chunk in enumerate(text.split(START)):
        header, sep, rest = chunk.partition(MESSAGE)
        if not sep:
            continue
        ends = [(rest.find(e), e) for e in ENDS if e in rest]
        at, end = min(ends) if ends else (len(rest), "")
        if not end and not final:  # what may still become a marker ends the body, or starts the next message
            at -= partial_marker(rest)
        # from its <|start|> (the answer's first message has it in the prompt): its header whole, a
        # recipient written before the channel included
        raw = START + ("" if i or header.startswith("assistant") else "assistant") + header + MESSAGE + rest[:at]
        out.append(Message(_channel(header), _recipient(header), rest[:at], raw, complete=bool(end) or final))
    return out


def may_become_header(text: str) -> bool:
    """Whether text that is not harmony yet may still be a message's header (a recipient first,
    maybe after blanks)."""
    head = text.lstrip()
    return head.startswith("to=") or "to=".startswith(head)


def partial_marker(text: str) -> int:
    """The length of the longest end of `text` that may still grow into a marker (0: none)."""
    return tag_prefix_at_end(text, (*ENDS, START, CHANNEL))


def first_message_start(text: str) -> int:
    """Where the text's first message header begins (len(text): none): its <|start|>, or, in an
    answer's first message, its recipient or channel."""
    found = [i for i in (text.find(START), text.find(CHANNEL)) if i >= 0]
    if not found:
        return len(text)
    at = min(found)
    recipient = RECIPIENT.search(text, 0, at)
    return text.rfind(" ", 0, recipient.start()) + 1 if recipient else at


def function_name(recipient: str | None) -> str | None:
    """The function a message calls (None: it calls none)."""
    return recipient[len(FUNCTIONS) :] if recipient and recipient.startswith(FUNCTIONS) else None


def _channel(header: str) -> str | None:
    if CHANNEL not in header:
        return None
    name = header.split(CHANNEL, 1)[1]
    return re.split(r"\s|<\|", name, maxsplit=1)[0] or None


def _recipient(header: str) -> str | None:
    match = RECIPIENT.search(header)
    return match.group(1) if match else None
