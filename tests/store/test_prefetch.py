"""Scheduler-aware fetching: a queued session living on disk is in host memory before its job runs."""

import time

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PER_TOKEN = 2 * 3 * 2 * 16 * 4  # tiny llama: layers * kv heads * head dim * fp32 bytes, K and V


def engine_with_a_on_disk(path, tmp_path, **kw):
    """Session A saved, then demoted to disk by session B (the host tier holds about one session)."""
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_seqs=1), store_dir=str(tmp_path / "st"),
              host_bytes=60 * PER_TOKEN, prefetch_window=2, **kw)
    store = llm.engine.store.store
    a = list(range(5, 45))
    out_a = llm.generate([a], PARAMS, session_id="A")[0]
    store.flush()
    llm.generate([list(range(50, 90))], PARAMS, session_id="B")
    store.flush()
    seg_a = store.records["A"].spans[0].seg_id
    assert not store.host.contains(seg_a) and store.disk.contains(seg_a)
    return llm, store, seg_a, a + out_a.token_ids + [1, 2]


def test_queued_disk_session_is_prefetched_to_host_before_it_runs(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    # the I/O prefetch alone: with preload the queue head would be read from disk into its pages
    llm, store, seg_a, turn2 = engine_with_a_on_disk(path, tmp_path, preload=False)
    eng = llm.engine
    eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=6, ignore_eos=True), session_id="C")
    rid_a = eng.add_request(turn2, PARAMS, session_id="A")
    eng.step()  # C runs (max_num_seqs=1); A waits and is published as a look-ahead hint
    eng.step()
    store._io.join()  # the prefetch runs on the store's I/O thread
    assert eng.requests[rid_a].status.value == "waiting"
    assert store.host.contains(seg_a), "A's KV should be in host while its job is still queued"
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[rid_a].metrics.cached_tokens["host"] == len(turn2) - 3  # all but the 2 new and the last answer token
    assert outs[rid_a].metrics.cached_tokens["disk"] == 0
    assert llm.stats()["bytes_prefetched"] > 0
    store.check_integrity()


def test_a_slow_prefetch_never_stalls_the_job(tiny_dirs, tmp_path, monkeypatch):
    path, _ = tiny_dirs["llama"]
    llm, store, seg_a, turn2 = engine_with_a_on_disk(path, tmp_path)
    real = store._fetch

    def slow_fetch(seg_id):
        time.sleep(3.0)
        real(seg_id)

    monkeypatch.setattr(store, "_fetch", slow_fetch)
    t = time.perf_counter()
    out = llm.generate([turn2], PARAMS, session_id="A")[0]
    assert time.perf_counter() - t < 2.5  # did not wait for the 3 s prefetch
    assert out.metrics.cached_tokens["disk"] == len(turn2) - 3  # read from disk directly instead
    assert out.token_ids == LLM(model=str(path)).generate([turn2], PARAMS)[0].token_ids
    store._io.join()


def test_queue_head_living_on_disk_is_preloaded_into_its_pages(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    llm, store, seg_a, turn2 = engine_with_a_on_disk(path, tmp_path)
    eng = llm.engine
    eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=6, ignore_eos=True), session_id="C")
    rid_a = eng.add_request(turn2, PARAMS, session_id="A")
    eng.step()  # C runs; A, the queue head, is staged and read from disk into its pages meanwhile
    req = eng.requests[rid_a]
    assert req.staged and req.metrics.cached_tokens["disk"] == len(turn2) - 3
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[rid_a].token_ids == LLM(model=str(path)).generate([turn2], PARAMS)[0].token_ids
    assert llm.stats()["bytes_loaded"]["disk"] > 0
    store.check_integrity()


def test_a_queued_anonymous_prefix_on_disk_is_prefetched_too(tiny_dirs, tmp_path):
    """Clients of an OpenAI-style API send no session id: the look-ahead hint names the record each
    queued request's plan reuses, so the anonymous prefix a queued prompt matched is fetched too."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_seqs=1), store_dir=str(tmp_path / "st"),
              host_bytes=60 * PER_TOKEN, prefetch_window=2, preload=False)
    store = llm.engine.store.store
    a = list(range(5, 45))
    out_a = llm.generate([a], PARAMS)[0]
    store.flush()
    (key_a,) = store.records
    seg_a = store.records[key_a].spans[0].seg_id
    llm.generate([list(range(50, 90))], PARAMS)
    store.flush()
    assert not store.host.contains(seg_a) and store.disk.contains(seg_a)
    eng = llm.engine
    eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=6, ignore_eos=True))
    rid_a = eng.add_request(a + out_a.token_ids + [1, 2], PARAMS)
    eng.step()
    eng.step()
    store._io.join()
    assert eng.requests[rid_a].status.value == "waiting"
    assert store.host.contains(seg_a), "the prefix A's prompt matched should be in host while it is queued"
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[rid_a].metrics.cached_tokens["host"] > 0 and outs[rid_a].metrics.cached_tokens["disk"] == 0
    store.check_integrity()
