"""Token logprobs in OpenAI's two formats: chat's `{"content": [...]}` and completions' parallel lists."""

from __future__ import annotations

from typing import Any

from cachedattention.model.tokenizer import Tokenizer
from cachedattention.sampling import TokenLogprob

# JSON has no -inf; vLLM and OpenAI send a large negative number for a token of probability 0
FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def _chars(data: bytes) -> int:
    """Characters a token adds to the text: its bytes that start a UTF-8 character (a character
    split over tokens counts once, for the token holding its first byte)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


class LogprobFormatter:
    """Renders a request's token logprobs, chunk by chunk when streaming (completions' text_offset,
    characters into the generated text, runs on across chunks)."""

    def __init__(self, tokenizer: Tokenizer | None, chat: bool, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.as_ids = as_ids or tokenizer is None  # vLLM's return_tokens_as_token_ids: "token_id:N"
        self.offset = 0
        self.start = 0  # where the generated text starts (after an echoed prompt)

    def render(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chat(logprobs) if self.chat else self._completion(logprobs)

    def _text(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.token_text(token_id)

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        data = self._text(token_id).encode() if self.as_ids else self.tokenizer.token_bytes(token_id)
        return {"token": self._text(token_id), "logprob": _value(logprob), "bytes": list(data)}

    def _chat(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for lp in logprobs:
            entry = self._entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content}

    def _completion(self, logprobs: list[TokenLogprob], specials_shown: bool = False, hidden: int = 0) -> dict[str, Any]:
        """`hidden`: the first tokens add no text (a BOS the tokenizer put before a prompt sent as text)."""
        offsets = []
        for i, lp in enumerate(logprobs):
            offsets.append(self.offset)
            tok = self.tokenizer
            if tok is None:
                continue
            if tok.is_special(lp.token_id):  # decoded text skips them; a prompt echoed as sent shows them
                self.offset += len(tok.token_text(lp.token_id)) if specials_shown and i >= hidden else 0
                continue
            # the text's first token as the decoder renders it (SentencePiece drops its leading space)
            first = self.offset == self.start
            self.offset += tok.first_token_length(lp.token_id) if first else _chars(tok.token_bytes(lp.token_id))
        return {
            "tokens": [self._text(lp.token_id) for lp in logprobs],
            "token_logprobs": [_value(lp.logprob) for lp in logprobs],
            # as OpenAI's legacy API and vLLM: the sampled token is listed too, in or beyond the top n
            "top_logprobs": [
                {self._text(t): _value(v) for t, v in (*lp.top, (lp.token_id, lp.logprob))} for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def render_prompt(
        self, entries: list[TokenLogprob | None], ids: list[int], text: str, top_n: int, as_sent: bool,
        joined: bool, hidden: int = 0,
    ) -> dict[str, Any]:  # fmt: skip
        """Completions' lists for an echoed prompt (its first token has no logprob: null), before the
        answer's. `text`: the prompt as echoed, `as_sent` (the client's string: special tokens show in
        it) or decoded from ids. The answer's offsets then start after it; `joined`: the echo put back
        the leading space a SentencePiece decoder drops from the answer's first word, so that token
        counts all its bytes (else it counts as the start of a text); `hidden`: tokens the tokenizer put
        before the text sent (a BOS), in no text."""
        listed = [TokenLogprob(t, 0.0, 1) if e is None else e for t, e in zip(ids, entries)]
        out = self._completion(listed, specials_shown=as_sent, hidden=hidden)
        for i, e in enumerate(entries):
            if e is None:
                out["token_logprobs"][i] = out["top_logprobs"][i] = None
            else:  # the engine computed as many alternatives as the larger of echo's and prompt_logprobs' n
                top = {self._text(t): _value(v) for t, v in (*e.top[:top_n], (e.token_id, e.logprob))}
                out["top_logprobs"][i] = top
        self.offset = len(text)
        self.start = -1 if joined else self.offset
        return out

    def prompt_logprobs(self, entries: list[TokenLogprob | None], top_n: int) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
        rank, decoded_token}} for the token itself and the top_n most likely."""
        out: list[dict[str, Any] | None] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            ranked = [(e.token_id, e.logprob, e.rank)] + [(t, v, r) for r, (t, v) in enumerate(e.top[:top_n], 1)]
            out.append({str(t): {"logprob": _value(v), "rank": r, "decoded_token": self._text(t)}
                        for t, v, r in ranked})  # fmt: skip
        return out
