"""Tags in a growing text: how much of its end may still become a tag, so that what a stream shows
never has to be taken back (reasoning tags, harmony's markers, tool-call tags)."""

from __future__ import annotations

from collections.abc import Iterable


def tag_prefix_at_end(text: str, tags: str | Iterable[str]) -> int:
    """The length of the longest end of `text` that starts one of `tags` without being all of it (0: none)."""
    return max((k for tag in ([tags] if isinstance(tags, str) else tags)
                for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), default=0)  # fmt: skip
