"""The device read buffer and ahead-of-need host eviction.

- A queued job at the head of the queue gets pages for its stored prefix, and the store loads
  them while the running job computes; once admitted it finds its KV in place (no new load).
- A staged job gives its pages back before any running job is preempted, and an abort of a
  staged job waits for its load, then frees its pages.
- When free host memory falls under the threshold, the store demotes host -> disk ahead of need,
  with the policy's order (LRU outside the queue first; the look-ahead window kept).
- With a disk TTL, sessions not used for that long are forgotten (records and every copy).
"""

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig
from cachedattention.config import SchedulerConfig as SchedCfg
from cachedattention.engine.request import Request
from cachedattention.engine.scheduler import Scheduler
from cachedattention.kvcache.page_pool import PagePool
from cachedattention.outputs import RequestMetrics
from tests.util import capture_logits, rel_err

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PER_TOKEN = 2 * 3 * 2 * 16 * 4  # tiny llama: K and V * layers * kv heads * head dim * fp32 bytes


def _store_llm(path, **kw):
    return LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
               scheduler=SchedulerConfig(max_num_seqs=1), **kw)


def _queue_a_behind_c(llm):
    """Session A's first turn stored; C running (one sequence at a time), A's second turn queued."""
    eng = llm.engine
    a = list(range(5, 45))
    out_a = llm.generate([a], PARAMS, session_id="A")[0]
    eng.store.store.flush()
    turn2 = a + out_a.token_ids + [1, 2]
    eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=6, ignore_eos=True), session_id="C")
    rid = eng.add_request(turn2, PARAMS, session_id="A")
    return eng, rid, turn2


def test_queued_head_is_loaded_before_it_is_admitted(tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["llama"]
    llm = _store_llm(path)
    eng, rid, turn2 = _queue_a_behind_c(llm)
    submits = []
    real_submit = eng.store.loader.submit
    monkeypatch.setattr(eng.store.loader, "submit", lambda job, background: (submits.append(job), real_submit(job, background)))
    logits = capture_logits(monkeypatch)

    eng.step()  # C runs; A cannot (max_num_seqs=1): it is staged and its history loads meanwhile
    req = eng.requests[rid]
    assert req.status.value == "waiting" and req.staged
    job = req.store_state.pending_load
    assert submits == [job] and req.num_computed == len(turn2) - 3
    job.wait_all()  # the load finished while A was still queued

    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    out = outs[rid]
    assert submits == [job], "admission must reuse the preloaded KV, not load again"
    assert out.metrics.load_s == 0.0  # the forward never waited for (or wrote) a layer
    assert out.metrics.cached_tokens["host"] == len(turn2) - 3
    assert llm.stats()["preloads"] >= 1
    got = list(logits)

    ref = LLM(model=str(path))
    logits.clear()
    want = ref.generate([turn2], PARAMS)[0]
    assert out.token_ids == want.token_ids
    assert rel_err(got[-len(want.token_ids)], logits[0]) < 1e-4  # A's first logits (A ran last)
    eng.pages.check_integrity()
    eng.store.check_integrity()


def test_abort_while_staged_waits_for_the_load_and_frees_the_pages(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = _store_llm(path)
    eng, rid, _ = _queue_a_behind_c(llm)
    eng.step()
    req = eng.requests[rid]
    assert req.staged
    job = req.store_state.pending_load
    eng.abort(rid)
    assert all(ev.is_set() for ev in job.events) and req.pages == [] and not req.staged
    while eng.has_unfinished():
        eng.step()
    eng.pages.check_integrity()
    assert eng.pages.num_available() == eng.pages.num_pages  # nothing leaked
    eng.store.check_integrity()


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=50), RequestMetrics(arrival_s=0.0))


def test_a_staged_head_gives_way_before_a_running_job_is_preempted():
    pool = PagePool(12)
    sched = Scheduler(SchedCfg(max_num_seqs=1, max_num_batched_tokens=8), pool, page_size=4, prefix_cache=False)
    sched.store_lookup = lambda req, device_hit: 12 if req.request_id == "head" else 0
    unstaged = []
    sched.on_unstage = unstaged.append
    run, head = _req("run", 8), _req("head", 16)
    sched.add(run)
    sched.add(head)
    assert [s.request for s in sched.schedule()] == [run]  # one sequence at a time: head waits
    run.num_computed = 8
    assert sched.stage_head() is head and head.staged and len(head.pages) == 3 and head.num_computed == 12
    assert sched.stage_head() is None  # staged once
    others = pool.allocate(pool.num_available())  # someone else holds every free page
    run.output_token_ids.append(7)  # the running job's next token needs a third page
    out = sched.schedule()
    assert [s.request for s in out] == [run] and len(run.pages) == 3
    assert unstaged == [head] and not head.staged and head.pages == [] and head.num_computed == 0
    assert sched.num_preemptions == 0 and sched.waiting[0] is head
    pool.free(others)
    pool.check_integrity()


def test_stage_head_needs_room_for_the_running_jobs_too():
    pool = PagePool(6)
    sched = Scheduler(SchedCfg(max_num_seqs=1, max_num_batched_tokens=8), pool, page_size=4, prefix_cache=False)
    sched.store_lookup = lambda req, device_hit: 12 if req.request_id == "head" else 0
    sched.add(_req("run", 8))
    sched.add(_req("head", 16))
    sched.schedule()
    # 4 free pages: the head's prompt needs 4, plus headroom for the running job's next step
    assert sched.stage_head() is None and not sched.waiting[0].pages


def test_free_host_under_the_threshold_demotes_ahead_of_need(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    for queue, demoted, kept in (([], "A", "B"), (["A"], "B", "A")):
        llm = _store_llm(path, store_dir=str(tmp_path / f"st{len(queue)}"), host_bytes=100 * PER_TOKEN,
                         host_free_threshold=0.5)
        store = llm.engine.store.store
        llm.generate([list(range(5, 45))], PARAMS, session_id="A")
        store.flush()
        llm.generate([list(range(50, 90))], PARAMS, session_id="B")
        store.flush()
        seg = {k: store.records[k].spans[0].seg_id for k in ("A", "B")}
        assert store.host.contains(seg["A"]) and store.host.contains(seg["B"])  # both fit: no eviction needed
        store.on_queue(queue)  # the engine publishes the queue every step
        store._io.join()
        assert store.ledger.host_free >= 50 * PER_TOKEN
        assert not store.host.contains(seg[demoted]) and store.disk.contains(seg[demoted])
        assert store.host.contains(seg[kept])
        assert llm.stats()["threshold_demotions"] == 1
        store.check_integrity()
        llm.close()


def test_a_staged_head_that_cannot_grow_yet_keeps_its_loaded_prefix():
    pool = PagePool(12)
    sched = Scheduler(SchedCfg(max_num_seqs=1, max_num_batched_tokens=8), pool, page_size=4, prefix_cache=False)
    sched.store_lookup = lambda req, device_hit: 12 if req.request_id == "head" else 0
    run, head = _req("run", 8), _req("head", 16)
    sched.add(run)
    sched.add(head)
    sched.schedule()
    assert sched.stage_head() is head
    staged_pages = list(head.pages)
    sched.finish(run)  # the running job ends: the head may be admitted ...
    others = pool.allocate(pool.num_available())  # ... but its remaining page is not there yet
    assert sched.schedule() == []
    assert head.staged and head.pages == staged_pages and sched.waiting[0] is head
    pool.free(others)
    out = sched.schedule()
    assert [s.request for s in out] == [head] and out[0].num_new == 4 and not head.staged
    pool.check_integrity()


def test_preload_waits_for_no_save_in_flight(tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["llama"]
    llm = _store_llm(path)
    eng, rid, turn2 = _queue_a_behind_c(llm)
    monkeypatch.setattr(eng.store.store, "saving", lambda seg_id: True)  # as if A's segment were still saving
    eng.step()
    req = eng.requests[rid]
    assert req.staged and req.store_state.pending_load is None  # pages kept, load left to admission
    monkeypatch.undo()
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[rid].metrics.cached_tokens["host"] == len(turn2) - 3
    assert outs[rid].token_ids == LLM(model=str(path)).generate([turn2], PARAMS)[0].token_ids
    eng.pages.check_integrity()


def test_disk_ttl_forgets_sessions_not_used_for_that_long(tiny_dirs, tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    import cachedattention.store.store as store_module

    path, _ = tiny_dirs["llama"]
    llm = _store_llm(path, store_dir=str(tmp_path / "st"), disk_ttl_s=60)
    store = llm.engine.store.store
    a = list(range(5, 45))
    out = llm.generate([a], PARAMS, session_id="A")[0]
    store.flush()  # (fsyncs: a busy disk may take seconds, so the TTL is long and the clock is moved)
    seg = store.records["A"].spans[0].seg_id
    store._next_expiry_s = 0.0  # the sweep runs at most once a second; do not wait for it here
    store.on_queue([])
    store._io.join()
    assert "A" in store.records and store.disk.contains(seg)  # younger than the TTL: kept
    later = time.monotonic() + 120
    monkeypatch.setattr(store_module, "time", SimpleNamespace(monotonic=lambda: later, time=time.time))
    store._next_expiry_s = 0.0
    store.on_queue([])
    store._io.join()
    monkeypatch.undo()
    assert "A" not in store.records and not store.disk.contains(seg) and not store.host.contains(seg)
    assert llm.stats()["expired_segments"] == 1
    store.check_integrity()
    again = llm.generate([a + out.token_ids + [1, 2]], PARAMS, session_id="A")[0]
    assert again.metrics.cached_tokens["host"] == again.metrics.cached_tokens["disk"] == 0  # a miss, not an error
    llm.close()
