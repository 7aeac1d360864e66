"""A request's output text, extended as its tokens come instead of decoded whole at every step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """The text of a growing list of token ids, appended to as the list grows.

    Decoding the whole output again at every step costs time in its length (0.5 ms at 2,000 tokens
    with SmolLM2's tokenizer): a streamed answer, or one watched for stop strings, costs the square of
    its length. Here an update decodes only the tokens it has not read plus the few read last, as
    context: SentencePiece drops a word's leading space at the start of a text, so the new tokens'
    text is decode(context + new) minus decode(context). Text is only ever appended, so what was
    streamed stays a prefix of the final text; an update that would end inside a character (a
    byte-level token holding part of one) waits for the next token, unless it is the last.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.text = ""
        self._context = 0  # first token of the context decoded before the new tokens
        self._read = 0  # tokens whose text is in self.text

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """Append the text of ids[read:] (ids grows between calls) and return what was appended.

        `final`: the output is complete; a trailing partial character is written as the decoder
        shows it (U+FFFD), as a whole decode would."""
        if self._read >= len(ids):
            return ""
        before = self._decode(ids[self._context : self._read]) if self._read > self._context else ""
        after = self._decode(ids[self._context :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""  # nothing visible yet (a special token skipped, a character cut in two)
        delta = after[len(before) :]
        self.text += delta
        self._context, self._read = self._read, len(ids)
        return delta
