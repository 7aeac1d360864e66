"""N-gram speculation (prompt lookup): the tokens that followed the latest earlier occurrence of a
sequence's last n tokens are proposed as its next ones. In a conversation that quotes itself (code
edited turn after turn, a document summarised) they are often right, and one forward pass checks them all."""

from __future__ import annotations

import numpy as np


def propose(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens: what followed an earlier match of the last n tokens, for the longest n in
    [min_n, max_n] that matches (none: []): the latest match followed by k tokens, else the first
    (in a run of one repeated token the latest match is followed by one token only)."""
    if k < 1 or len(tokens) <= min_n:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = seq[-n:]
        # windows starting at 0 .. len - n - 1 (the suffix itself excluded), each followed by a token
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            whole = hits[hits + n + k <= len(tokens)]  # (the nearest context is the likeliest to repeat)
            start = int(whole[-1] if whole.size else hits[0]) + n
            return seq[start : start + k].tolist()
    return []
