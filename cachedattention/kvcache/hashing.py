"""Chained hashes of full token blocks: equal hash chains mean equal prefixes (verified by tokens)."""

from __future__ import annotations

from collections.abc import Sequence


def chain_hash(parent: int, block: Sequence[int]) -> int:
    """Hash of a block given its parent's hash: equal chains mean equal prefixes (up to collisions)."""
    return hash((parent, tuple(block)))


def block_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Hash of every full block of `tokens` (up to `limit` tokens), each chained on its parent."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    hashes: list[int] = []
    parent = 0
    for lo in range(0, n - block_size + 1, block_size):
        parent = chain_hash(parent, tokens[lo : lo + block_size])
        hashes.append(parent)
    return hashes
