"""Times the paged decode kernel over a realistic pool (1 GB over 30 layers, random pages, the
embedded model's head shape) for one decode step of 8 sequences at 300-4,500 tokens, next to a
plain sequential read (`x.sum()`) of as many bytes: how close the kernel runs to memory bandwidth.

With `--huge-pages` the pool is backed by transparent huge pages (anonymous private memory,
madvise(MADV_HUGEPAGE); Linux), to see what the TLB costs the kernel's scattered page reads.
A diagnostic, not a benchmark mode:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/paged_kernel_timing.py [--huge-pages]
"""

import mmap
import sys

import torch

from cachedattention.bench.timing import median_time
from cachedattention.kernels.paged_decode import PagedDecodeKernel

PAGE, KV_HEADS, HEADS, HEAD_DIM, LAYERS = 16, 3, 9, 64, 30
LENGTHS = [300, 500, 900, 1200, 1800, 2500, 3500, 4500]


def median_s(fn) -> float:
    fn()  # warm
    return median_time(fn, 10, "cpu")


def main(huge_pages: bool) -> None:
    kernel = PagedDecodeKernel.load()
    if kernel is None:
        sys.exit("the kernel did not build here")
    gen = torch.Generator().manual_seed(0)
    num_pages = (1 << 30) // (LAYERS * 2 * PAGE * KV_HEADS * HEAD_DIM * 4)
    shape = (num_pages * PAGE, KV_HEADS, HEAD_DIM)
    keep = []  # the mappings behind huge-page tensors stay alive as long as the tensors

    def pool_tensor() -> torch.Tensor:
        if not huge_pages:
            return torch.randn(shape, generator=gen)
        n = num_pages * PAGE * KV_HEADS * HEAD_DIM
        mm = mmap.mmap(-1, n * 4 + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
        keep.append(mm)
        flat = torch.frombuffer(mm, dtype=torch.float32)
        start = (-flat.data_ptr() % (2 << 20)) // 4  # 2 MiB aligned, as huge pages are
        t = flat[start : start + n].view(shape)
        t.copy_(torch.randn(shape, generator=gen))
        return t

    ks = [pool_tensor() for _ in range(LAYERS)]
    vs = [pool_tensor() for _ in range(LAYERS)]
    order = torch.randperm(num_pages, generator=gen)
    counts = [-(-n // PAGE) for n in LENGTHS]
    pages = order[: sum(counts)].contiguous()
    page_start = torch.tensor([0, *counts]).cumsum(0)
    lengths, rows = torch.tensor(LENGTHS), torch.arange(len(LENGTHS))
    q = torch.randn(len(LENGTHS), HEADS, HEAD_DIM, generator=gen)
    out = torch.empty_like(q)

    def step():
        for layer in range(LAYERS):
            kernel(q, out, rows, ks[layer], vs[layer], pages, page_start, lengths, PAGE)

    kv_bytes = sum(LENGTHS) * KV_HEADS * HEAD_DIM * 4 * 2 * LAYERS
    flat = torch.randn(kv_bytes // 4, generator=gen)
    kernel_s, read_s = median_s(step), median_s(flat.sum)
    print(f"{kv_bytes / 1e6:.0f} MB of KV: kernel {kernel_s * 1000:.1f} ms ({kv_bytes / kernel_s / 1e9:.1f} GB/s), "
          f"sequential read {read_s * 1000:.1f} ms ({kv_bytes / read_s / 1e9:.1f} GB/s), "
          f"{torch.get_num_threads()} threads, {_anon_huge_kb()} kB of huge pages in this process")


def _anon_huge_kb() -> str:
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((line.split()[1] for line in f if line.startswith("AnonHugePages")), "?")
    except OSError:
        return "?"


if __name__ == "__main__":
    main("--huge-pages" in sys.argv[1:])
