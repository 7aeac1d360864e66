"""A disk write in progress holds up nothing: the I/O thread writes and fsyncs a segment's file outside
the store's lock, so the engine's per-step calls do not wait for the disk; a segment forgotten while
its file was written leaves no file behind."""

import contextlib
import threading

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.store.disk import DiskTier

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def held_disk_writes(monkeypatch, fail: type[Exception] | None = None) -> tuple[threading.Event, threading.Event]:
    """(entered, release): every segment write waits inside DiskTier.put until release is set (then
    raises `fail`, if given, instead of writing)."""
    entered, release = threading.Event(), threading.Event()
    real_put = DiskTier.put

    def slow_put(self, seg_id, kv):
        entered.set()
        release.wait(60)
        if fail is not None:
            raise fail("the disk gave up")
        return real_put(self, seg_id, kv)

    monkeypatch.setattr(DiskTier, "put", slow_put)
    return entered, release


@contextlib.contextmanager
def first_turn_write_held(tiny_dirs, store_dir, monkeypatch, fail: type[Exception] | None = None):
    """An engine whose first turn's segment write is held inside DiskTier.put for the with block:
    yields (llm, the first turn's output, release); the write goes on (or fails) when the block ends."""
    path, _ = tiny_dirs["llama"]
    entered, release = held_disk_writes(monkeypatch, fail)
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              store_dir=str(store_dir), host_bytes=64 << 20, disk_bytes=256 << 20)
    try:
        first = llm.generate([list(range(5, 60))], PARAMS, session_id="a")[0]
        assert entered.wait(30)  # the I/O thread is inside the first turn's write
        yield llm, first, release
    finally:
        release.set()


def test_turns_run_while_a_disk_write_is_held(tiny_dirs, tmp_path, monkeypatch):
    with first_turn_write_held(tiny_dirs, tmp_path, monkeypatch) as (llm, _, release):
        outs: list = []
        other = threading.Thread(target=lambda: outs.extend(
            llm.generate([list(range(100, 150)), list(range(5, 60)) + [9, 9]], PARAMS, session_id=["b", "a"])))
        other.start()
        other.join(60)
        ran_while_held = bool(outs) and not release.is_set()
    other.join(60)
    store = llm.engine.store.store
    assert ran_while_held  # two more turns (one reusing the segment being written) did not wait for it
    assert outs[1].metrics.cached_tokens["host"] > 0
    store.flush()
    store.check_integrity()
    assert len(store.disk.segment_ids()) == 3  # every turn's segment reached the disk once released
    llm.close()


def test_a_segment_forgotten_during_its_write_leaves_no_file(tiny_dirs, tmp_path, monkeypatch):
    with first_turn_write_held(tiny_dirs, tmp_path, monkeypatch) as (llm, _, _):
        store = llm.engine.store.store
        with store._lock:  # as a commit or release on the engine thread may, while the segment is written
            (key,) = store.records
            store._drop_record(key)
    store.flush()
    store.check_integrity()
    assert store.disk.segment_ids() == [] and not list((tmp_path / "segments").glob("*"))
    assert store.ledger.disk_free == store.disk.budget  # the room reserved for it is free again
    llm.close()


@pytest.mark.parametrize("fail", [OSError, RuntimeError])  # RuntimeError: e.g. out of memory while encoding
def test_a_failed_write_gives_its_room_back_and_keeps_the_host_copy(fail, tiny_dirs, tmp_path, monkeypatch):
    with first_turn_write_held(tiny_dirs, tmp_path, monkeypatch, fail) as (llm, first, _):
        store = llm.engine.store.store
    store._io.join()
    (seg,) = store.host.segment_ids()
    assert not store._writing and store.ledger.disk_free == store.disk.budget and not store.disk.contains(seg)
    store.check_integrity()
    again = llm.generate([list(range(5, 60)) + first.token_ids + [9, 9]], PARAMS, session_id="a")[0]
    assert again.metrics.cached_tokens["host"] > 0  # the turn is still served, from host
    monkeypatch.undo()
    llm.close()
