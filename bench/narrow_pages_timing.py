"""The paged decode kernel alone, one layer's call for 8 sequences of 1,000 tokens (the embedded
model's 15 query and 5 KV heads of 64), over pages of float32, bfloat16 and FP8 (vLLM's
--kv-cache-dtype): what widening narrow pages as they are read costs against the bytes it saves.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/narrow_pages_timing.py [repeats]
"""

import statistics
import sys
import time

import torch

from cachedattention.kernels.paged_decode import PagedDecodeKernel

HEADS, KV_HEADS, HEAD_DIM, PAGE = 15, 5, 64, 16
SEQS, CONTEXT = 8, 1000


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    kernel = PagedDecodeKernel.load()
    if kernel is None:
        raise SystemExit("no C compiler: the paged decode kernel is off")
    per_seq = -(-CONTEXT // PAGE)
    num_pages = 2 * SEQS * per_seq
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(num_pages * PAGE, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_pages * PAGE, KV_HEADS, HEAD_DIM, generator=gen)
    tables = torch.randperm(num_pages, generator=gen)[: SEQS * per_seq]  # scattered pages
    page_start = torch.arange(0, SEQS * per_seq + 1, per_seq)
    lengths, rows = torch.full((SEQS,), CONTEXT), torch.arange(SEQS)
    q = torch.randn(SEQS, HEADS, HEAD_DIM, generator=gen)
    out = torch.empty_like(q)
    pools = {}
    for storage in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        held = [t.to(storage) for t in (k, v)]
        pools[storage] = [t.view(torch.uint8) for t in held] if storage.itemsize == 1 else held
    times: dict[torch.dtype, list[float]] = {s: [] for s in pools}
    for _ in range(repeats):  # the dtypes alternated, 20 calls each
        for storage, (kp, vp) in pools.items():
            kernel(q, out, rows, kp, vp, tables, page_start, lengths, PAGE, storage=storage)  # (warm)
            start = time.perf_counter()
            for _ in range(20):
                kernel(q, out, rows, kp, vp, tables, page_start, lengths, PAGE, storage=storage)
            times[storage].append((time.perf_counter() - start) / 20 * 1e3)
    base = statistics.median(times[torch.float32])
    print(f"paged decode kernel, {SEQS} x {CONTEXT} tokens, one layer, median of {repeats} x 20 calls")
    for storage, ts in times.items():
        mb = 2 * SEQS * CONTEXT * KV_HEADS * HEAD_DIM * storage.itemsize / 1e6
        print(f"{str(storage)[6:]:14} {statistics.median(ts):.3f} ms ({statistics.median(ts) / base:.2f}x), "
              f"{mb:.1f} MB of pages read")


if __name__ == "__main__":
    main()
