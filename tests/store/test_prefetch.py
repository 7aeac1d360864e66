"""Scheduler-aware fetching: a queued session living on disk is in host memory before its job runs."""

import threading
import time

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PER_TOKEN = 2 * 3 * 2 * 16 * 4  # tiny llama: layers * kv heads * head dim * fp32 bytes, K and V


def engine_with_a_on_disk(path, tmp_path, anonymous: bool = False, **kw):
    """Conversation A saved, then demoted to disk by conversation B (the host tier holds about one);
    with session ids "A" and "B", or none (`anonymous`: an OpenAI-style client's)."""
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_seqs=1), store_dir=str(tmp_path / "st"),
              host_bytes=60 * PER_TOKEN, prefetch_window=2, **kw)
    store = llm.engine.store.store
    a = list(range(5, 45))
    out_a = llm.generate([a], PARAMS, session_id=None if anonymous else "A")[0]
    store.flush()
    (record_a,) = store.records.values()
    llm.generate([list(range(50, 90))], PARAMS, session_id=None if anonymous else "B")
    store.flush()
    seg_a = record_a.spans[0].seg_id
    assert not store.host.contains(seg_a) and store.disk.contains(seg_a)
    return llm, store, seg_a, a + out_a.token_ids + [1, 2]


@pytest.mark.parametrize("anonymous", [False, True])
def test_queued_disk_session_is_prefetched_to_host_before_it_runs(anonymous, tiny_dirs, tmp_path):
    """Also for clients of an OpenAI-style API, which send no session id: the look-ahead hint names
    the record each queued request's plan reuses, so the anonymous prefix a queued prompt matched
    is fetched too."""
    path, _ = tiny_dirs["llama"]
    # the I/O prefetch alone: with preload the queue head would be read from disk into its pages
    llm, store, seg_a, turn2 = engine_with_a_on_disk(path, tmp_path, anonymous, preload=False)
    eng = llm.engine
    eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=6, ignore_eos=True),
                    session_id=None if anonymous else "C")  # fmt: skip
    rid_a = eng.add_request(turn2, PARAMS, session_id=None if anonymous else "A")
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
    release = threading.Event()

    def held_fetch(seg_id):
        release.wait(120)  # (held until the job is done: a job waiting for it would take 120 s)
        real(seg_id)

    monkeypatch.setattr(store, "_fetch", held_fetch)
    t = time.perf_counter()
    out = llm.generate([turn2], PARAMS, session_id="A")[0]
    took = time.perf_counter() - t
    release.set()
    assert took < 60  # did not wait for the held prefetch
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

