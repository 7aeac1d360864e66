"""Token logprobs in OpenAI's two formats: chat's `{"content": [...]}` and completions' parallel lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachedattention.sampling import TokenLogprob

# JSON has no -inf; vLLM and OpenAI send a large negative number for a token of probability 0
FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


class LogprobFormatter:
    """Renders a request's token logprobs, chunk by chunk when streaming (completions' text_offset
    runs on across chunks)."""

    def __init__(self, token_text: Callable[[int], str], chat: bool) -> None:
        self.token_text = token_text
        self.chat = chat
        self.offset = 0  # completions: characters of generated text before the next token

    def render(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chat(logprobs) if self.chat else self._completion(logprobs)

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    def _chat(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for lp in logprobs:
            entry = self._entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content}

    def _completion(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_value(lp.logprob) for lp in logprobs],
            "top_logprobs": [{self.token_text(t): _value(v) for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }
