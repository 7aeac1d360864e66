"""A request's output text, extended as its tokens come instead of decoded whole at every step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """The text of a growing list of token ids, appended to as the list grows.

    Decoding the whole output again at every step costs time in its length (0.5 ms at 2,000 tokens
    with SmolLM2's tokenizer): a streamed answer, or one watched for stop strings, costs the square of
    its length. Here an update decodes only the tokens it has not read plus the last visible ones read
    before them, as context: SentencePiece drops a word's leading space at the start of a text, so the
    new tokens' text is decode(context + new) minus decode(context). Text is only ever appended, so
    what was streamed stays a prefix of the final text. An update that would end inside a character (a
    byte-level token holding part of one) holds its text back in `pending` until the next token, unless
    it is the last; tokens that add no text after visible ones (skipped special tokens) are dropped
    from the context (before any, they stay: a SentencePiece "▁" shows only before a word).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.text = ""
        self.pending = ""  # text decoded but held back: it ends inside a character
        self._context: list[int] = []  # the visible tokens read last
        self._read = 0  # tokens whose text is in self.text (or that have none)

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """Append the text of ids[read:] (ids grows between calls) and return what was appended.

        `final`: the output is complete; a trailing partial character is written as the decoder
        shows it (U+FFFD), as a whole decode would."""
        if self._read >= len(ids):
            return ""
        new = list(ids[self._read :])
        before = self._decode(self._context) if self._context else ""
        after = self._decode(self._context + new)
        delta = after[len(before) :]
        if not final and delta.endswith(REPLACEMENT):
            self.pending = delta  # wait for the rest of the character
            return ""
        self.pending = ""
        self._read = len(ids)
        if delta:
            self.text += delta
            self._context = new
        elif not self.text:  # nothing visible yet: a SentencePiece "▁" alone is "", but a space before a word
            self._context = self._context + new
        return delta
