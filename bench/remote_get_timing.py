"""What reading one segment from the remote tier costs: the server's GET of its value, then its checks
and decoding, for an embedded-model segment of N tokens (30 layers, 3 KV heads of 64, float32).

    python bench/remote_get_timing.py TOKENS REMOTE_URL    # e.g. 1024 unix:///tmp/rsrv/redis.sock
"""

from __future__ import annotations

import sys
import time

import torch

from cachedattention.store import segment_format
from cachedattention.store.remote import RemoteTier
from cachedattention.store.segment import KVLayout, SegmentKV


def main() -> None:
    tokens, url = int(sys.argv[1]), sys.argv[2]
    layout = KVLayout(30, 3, 64, torch.float32)
    kv = SegmentKV(torch.randn(30, tokens, 3, 64), torch.randn(30, tokens, 3, 64))
    tier = RemoteTier(url, f"get-timing-{time.time_ns()}", layout)
    try:
        tier.put("x", kv)
        key = tier.segment_key("x")
        for _ in range(4):
            start = time.perf_counter()
            value = tier.client.get(key)
            got = time.perf_counter()
            segment_format.decode_bytes(value, "x", tier.fingerprint, layout, "x")
            done = time.perf_counter()
            print(f"{len(value) / 1e6:.1f} MB: GET {1e3 * (got - start):.0f} ms, checks and decoding {1e3 * (done - got):.0f} ms")
    finally:
        tier.drop_all()
        tier.close()


if __name__ == "__main__":
    main()
