"""The store's hand-offs between threads, in the order the engine makes its calls: a segment whose
save is being placed (host made room for it first) is waited for, not read from a file never
written; a prefetch whose segment was forgotten before it ran is no damage to report."""

import logging
import threading
import time

import torch

from cachedattention.config import StoreConfig
from cachedattention.store import disk as disk_mod
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.session import Span
from cachedattention.store.store import AttentionStore

LAYOUT = KVLayout(1, 1, 8, torch.float32)


def _kv() -> SegmentKV:
    return SegmentKV(torch.randn(1, 16, 1, 8), torch.randn(1, 16, 1, 8), None)


def _turn(store: AttentionStore, key: str, first: int, kv: SegmentKV | None = None) -> str:
    prompt = list(range(first, first + 17))
    key, plan = store.plan(key, prompt, 4096, 1, 0)
    seg = store.new_segment_id()
    store.commit(key, prompt[:16], plan, [], Span(seg, 0, 16))
    if kv is not None:
        store.add_segment(seg, kv)
    store.release(plan.reuse)
    return seg


def test_a_segment_being_placed_is_waited_for_not_read_from_a_missing_file(tmp_path, monkeypatch):
    kv = _kv()
    # write-back: A's file is written only when B's placing demotes it (written through, the I/O
    # thread could still be writing A then, on a loaded machine: B would go straight to disk)
    store = AttentionStore(StoreConfig(enable=True, store_dir=str(tmp_path), host_bytes=kv.nbytes, disk_bytes=1 << 30,
                                       write_through=False), LAYOUT, "fp", pin=False)  # fmt: skip
    _turn(store, "A", 1, kv)  # host is full with A's segment
    slow_put = disk_mod.DiskTier.put
    monkeypatch.setattr(disk_mod.DiskTier, "put", lambda self, seg, kv: (time.sleep(0.3), slow_put(self, seg, kv))[1])
    seg_b = _turn(store, "B", 100)  # saving: placing it will first write A's back to disk (slowly)
    saver = threading.Thread(target=store.add_segment, args=(seg_b, kv))
    saver.start()
    time.sleep(0.05)
    # the connector's calls for B's next turn, unlocked: wait for the save, then the host copy
    assert store.wait_saved(seg_b, timeout=30) and store.segment_host(seg_b) is not None
    saver.join()
    assert store.stats.corrupt_segments == 0
    store.check_integrity()
    store.close()


def test_a_prefetch_of_a_forgotten_segment_warns_of_nothing(tmp_path, caplog):
    kv = _kv()
    store = AttentionStore(StoreConfig(enable=True, store_dir=str(tmp_path), host_bytes=2 * kv.nbytes,
                                       disk_bytes=1 << 30), LAYOUT, "fp", pin=False)  # fmt: skip
    seg_a = _turn(store, "A", 1, kv)
    _turn(store, "B", 100, kv)
    _turn(store, "C", 200, kv)  # A's segment goes to disk
    store._io.join()
    assert not store.host.contains(seg_a) and store.disk.contains(seg_a)
    with caplog.at_level(logging.WARNING, logger="cachedattention.store.store"):
        with store._lock:  # the I/O thread waits for the lock while A is queued, then forgotten
            store._io.put(("trim", None))
            store.on_queue(["A"])
            assert seg_a in store._fetching
            store.forget("A")
        store._io.join()
    assert not caplog.records and store.stats.corrupt_segments == 0
    store.check_integrity()
    store.close()
