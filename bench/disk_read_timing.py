"""Times a cold read of one stored segment by the store's reader, next to a plain sequential read.

A diagnostic, not a benchmark mode: 1024 tokens of the embedded model's KV (30 layers, 3 KV heads
of 64, float32: 47 MB), written by `DiskTier`, dropped from the page cache, then read layer by
layer (checksums verified), three times; and the same file read in 1 MiB chunks. Each read also
reports the CPU time the process spent on it, which a read beside the forward pass takes from the
forward. (Reading past the page cache with O_DIRECT was tried at 39ad6a0: 45-52 ms wall and 19-24 ms
CPU against 37-39 ms and 27 ms buffered, without kernel read-ahead; not kept.)

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
            wall, cpu = time.perf_counter(), time.process_time()
            with disk.open("s") as r:
                for layer in range(layout.num_layers):
                    r.read_layer(layer)
            cells = [f"segment reader {(time.perf_counter() - wall) * 1000:.1f} ms "
                     f"(CPU {(time.process_time() - cpu) * 1000:.1f} ms)"]
            fd = os.open(disk.path("s"), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            wall, cpu = time.perf_counter(), time.process_time()
            while os.read(fd, 1 << 20):
                pass
            cells.append(f"plain 1 MiB reads {(time.perf_counter() - wall) * 1000:.1f} ms "
                         f"(CPU {(time.process_time() - cpu) * 1000:.1f} ms)")
            os.close(fd)
            print(f"{size / 1e6:.0f} MB cold: " + ", ".join(cells), flush=True)
        disk.close()


if __name__ == "__main__":
    main()
