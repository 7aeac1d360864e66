"""Times a cold read of one stored segment by the store's reader, next to a plain sequential read.

A diagnostic, not a benchmark mode: 1024 tokens of the embedded model's KV (30 layers, 3 KV heads
of 64, float32: 47 MB), written by `DiskTier`, dropped from the page cache, then read layer by
layer (checksums verified), three times; and a file of the same size read in 1 MiB chunks.

    .venv/bin/python bench/disk_read_timing.py
"""

import os
import tempfile
import time

import torch

from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import KVLayout, SegmentKV


def main() -> None:
    layout = KVLayout(30, 3, 64, torch.float32)
    with tempfile.TemporaryDirectory() as root:
        disk = DiskTier(root, 1 << 32, "timing", layout)
        disk.put("s", SegmentKV(torch.randn(30, 1024, 3, 64), torch.randn(30, 1024, 3, 64)))
        size = disk.path("s").stat().st_size
        for _ in range(3):
            with disk.open("s") as r:
                r.drop_page_cache()
            start = time.perf_counter()
            with disk.open("s") as r:
                for layer in range(layout.num_layers):
                    r.read_layer(layer)
            reader_s = time.perf_counter() - start
            fd = os.open(disk.path("s"), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while os.read(fd, 1 << 20):
                pass
            plain_s = time.perf_counter() - start
            os.close(fd)
            print(f"{size / 1e6:.0f} MB cold: segment reader {reader_s * 1000:.1f} ms, "
                  f"plain 1 MiB reads {plain_s * 1000:.1f} ms")
        disk.close()


if __name__ == "__main__":
    main()
