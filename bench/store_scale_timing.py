"""The store's bookkeeping per turn against the number of stored segments (no model): each turn
plans a new session, commits it, hands its segment over (host full: one moves to disk) and
releases it; then the scheduler's hint with one queued session whose segment is disk-only (the
prefetch check). fsync is stubbed out so that what grows is the CPU's scans, not the disk.

    python bench/store_scale_timing.py [SEGMENTS,...] [DISK_BYTES]   (default 1000,16000; disk: 1 TiB)

A DISK_BYTES the segments fill (each file here is 512 bytes) times a full disk tier making room.

Run it with PYTHONPATH at two checkouts to compare them."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from cachedattention.config import StoreConfig
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.session import Span
from cachedattention.store.store import AttentionStore

TOKENS = 4  # per segment: tiny, so that only the bookkeeping is timed


def main() -> None:
    checkpoints = [int(n) for n in (sys.argv[1] if len(sys.argv) > 1 else "1000,16000").split(",")]
    os.fsync = lambda fd: None  # (this process only)
    root = tempfile.mkdtemp(prefix="store-scale-")
    layout = KVLayout(1, 1, 8, torch.float32)
    kv = SegmentKV(torch.zeros(1, TOKENS, 1, 8), torch.zeros(1, TOKENS, 1, 8), None)
    disk_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 40
    config = StoreConfig(enable=True, store_dir=root, host_bytes=64 * kv.nbytes, disk_bytes=disk_bytes, write_through=False)
    store = AttentionStore(config, layout, "fp", pin=False)

    def turn(i: int) -> None:
        prompt = [1 + (i * 7 + j) % 200 for j in range(TOKENS + 1)]
        key, plan = store.plan(f"s{i}", prompt, 4096, 1, 0)
        seg = store.new_segment_id()
        store.commit(key, prompt[:TOKENS], plan, [], Span(seg, 0, TOKENS))
        store.add_segment(seg, kv)
        store.release(plan.reuse)

    i = 0
    for target in checkpoints:
        while i < target - 100:
            turn(i)
            i += 1
        turns, hints = [], []
        for _ in range(100):
            t = time.perf_counter()
            turn(i)
            turns.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.on_queue([f"s{i - 150}"])  # an older session, on disk only
            hints.append(time.perf_counter() - t)
            i += 1
        store._io.join()
        print(f"segments {len(store.ledger):6d}: turn median {1e3 * statistics.median(turns):.3f} ms, "
              f"queue hint (a disk-only session queued) median {1e3 * statistics.median(hints):.3f} ms", flush=True)
    store.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
