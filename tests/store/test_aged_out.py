"""Sessions whose KV has aged out of every tier leave nothing behind: no record in memory, no row in
the index, and no later segment of theirs holding room that could never be served (a hit is a
prefix, so without a record's first segment the rest is dead weight)."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PER_TOKEN = 2 * 3 * 2 * 16 * 4  # the tiny llama's K and V: layers * kv heads * head dim * fp32


def _conv(s: int) -> list[int]:
    return [(13 * s + 7 * i) % 250 + 3 for i in range(40)]


def _assert_every_record_is_servable(store) -> None:
    """After the store settles, each span of each record is held by a tier (or still saving)."""
    store.on_queue([])  # the engine's per-step call: where lost segments are settled
    for rec in store.records.values():
        for seg in rec.segment_ids():
            assert store._tier_of(seg) is not None, f"{rec.key} names {seg}, which no tier holds"
    held = set(store.host.segment_ids()) | (set(store.disk.segment_ids()) if store.disk else set())
    assert held <= set(store._refs), "a tier holds a segment no record names"
    store.check_integrity()


@pytest.mark.parametrize("with_disk", [True, False])
def test_sessions_aged_out_of_every_tier_are_dropped(with_disk, tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    kw = dict(store_dir=str(tmp_path / "st"), disk_bytes=150 * PER_TOKEN) if with_disk else {}
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              host_bytes=100 * PER_TOKEN, **kw)
    store = llm.engine.store.store
    for s in range(30):
        llm.generate([_conv(s)], PARAMS, session_id=f"s{s}")
    store.flush()
    _assert_every_record_is_servable(store)
    # 30 sessions of 44 tokens each went through tiers that hold about 3 (host) + 3 (disk) of them
    assert 0 < len(store.records) <= 8
    assert "s0" not in store.records and "s29" in store.records
    if with_disk:
        store.flush()  # the rows of dropped records are deleted by the I/O thread
        assert {key for key, _ in store.disk.load_records()} == set(store.records)
    # an aged-out session comes back: a miss, answered as a fresh engine answers it, and kept again
    out = llm.generate([_conv(0)], PARAMS, session_id="s0")[0]
    assert sum(out.metrics.cached_tokens.values()) == 0
    assert out.token_ids == LLM(model=str(path)).generate([_conv(0)], PARAMS)[0].token_ids
    assert "s0" in store.records
    llm.close()


def test_a_record_whose_first_segment_is_evicted_frees_its_later_ones(tiny_dirs, tmp_path):
    """LRU evicts a session's oldest segment (its first turn) first; its later turn's segment cannot
    be served without it, so it goes too, and its room with it."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              host_bytes=200 * PER_TOKEN, policy="lru")
    store = llm.engine.store.store
    conv = _conv(1)
    out = llm.generate([conv], PARAMS, session_id="a")[0]
    conv = conv + out.token_ids + [5, 6, 7]
    llm.generate([conv], PARAMS, session_id="a")
    store.flush()
    first, second = store.records["a"].segment_ids()
    # other sessions fill the host until the first segment of "a" (its least recently used) goes
    s = 2
    while store.host.contains(first):
        llm.generate([_conv(s)], PARAMS, session_id=f"b{s}")
        store.flush()
        s += 1
    assert store.host.contains(second) or "a" not in store.records
    _assert_every_record_is_servable(store)
    assert "a" not in store.records and not store.host.contains(second)
    llm.close()
