"""Chained hashes of full token blocks: equal hash chains mean equal prefixes (verified by tokens)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def chain_hash(parent: int, block: Sequence[int]) -> int:
    """Hash of a block given its parent's hash: equal chains mean equal prefixes (up to collisions)."""
    return hash((parent, tuple(block)))


def salt_seed(cache_salt: str | None) -> int:
    """The first parent of a request's hash chain: 0, or one drawn from its cache salt (vLLM's
    cache_salt), so that requests of different salts never share a block."""
    if cache_salt is None:
        return 0
    return int.from_bytes(hashlib.sha256(cache_salt.encode()).digest()[:8], "little") | 1  # (never 0: unsalted)


def block_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None, seed: int = 0) -> list[int]:
    """Hash of every full block of `tokens` (up to `limit` tokens), each chained on its parent (the
    first on `seed`: salt_seed's)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    hashes: list[int] = []
    parent = seed
    for lo in range(0, n - block_size + 1, block_size):
        parent = chain_hash(parent, tokens[lo : lo + block_size])
        hashes.append(parent)
    return hashes
