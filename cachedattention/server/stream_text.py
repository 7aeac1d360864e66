"""What part of an answer still being generated is safe to stream."""

from __future__ import annotations


def stream_delta(text: str, sent: str, stops: tuple[str, ...]) -> str:
    """New text that is safe to stream: not an incomplete UTF-8 character, not the start of a stop string."""
    if not text.startswith(sent):
        return ""  # decoding of earlier tokens changed; wait for the final text
    end = len(text)
    while end > len(sent) and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:  # a tail that may grow into a stop string must not be sent (the engine cuts it off)
        for k in range(min(len(s) - 1, end - len(sent)), hold, -1):
            if text.startswith(s[:k], end - k):
                hold = k
                break
    return text[len(sent) : end - hold]
