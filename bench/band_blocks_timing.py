"""One windowed layer's attention over a long prompt on a CPU: a single SDPA call with the whole
band mask against blocks of rows, each over only the keys its rows see (what the runner's window
blocks do), at a few block sizes; plus causal attention over all keys for scale. A diagnostic:

    .venv/bin/python bench/band_blocks_timing.py [tokens] [window]
"""

import sys
import time

import torch
from torch.nn import functional as F


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(n: int, window: int, heads: int = 12, kv_heads: int = 4, head_dim: int = 64) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, head_dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, n, head_dim, generator=gen) for _ in range(2))
    pos = torch.arange(n)
    band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)

    def blocked(block: int) -> torch.Tensor:
        out = torch.empty_like(q)
        for a in range(0, n, block):
            b, lo = min(n, a + block), max(0, a - window + 1)
            out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:b], v[:, :, lo:b],
                                                            attn_mask=band[a:b, lo:b], enable_gqa=True)  # fmt: skip
        return out

    whole = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    print(f"{n} tokens, window {window}, {heads} heads ({kv_heads} KV), head_dim {head_dim}; s, best of 3")
    print(f"| one call, band mask | {best_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)):.3f} |")
    print(f"| causal, all keys | {best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):.3f} |")
    for block in (window // 4, window // 2, window, 2 * window):
        assert torch.allclose(blocked(block), whole, atol=1e-5)
        print(f"| blocks of {block} rows | {best_of(lambda block=block: blocked(block)):.3f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192, int(sys.argv[2]) if len(sys.argv) > 2 else 512)
