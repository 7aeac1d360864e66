"""The store's records, driven directly (no model): the anonymous-prefix index after records are cut
or dropped, a turn that names a segment lost while it ran, the branch cap across a restart, which
record a session's prompt continues, and keys a remote server could forge."""

import torch

from cachedattention.config import StoreConfig
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.session import SessionRecord, Span, slice_spans
from cachedattention.store.store import AttentionStore

LAYOUT = KVLayout(1, 1, 4, torch.float32)
TOKEN = LAYOUT.segment_bytes(1)


def kv(n: int) -> SegmentKV:
    return SegmentKV(torch.zeros(1, n, 1, 4), torch.zeros(1, n, 1, 4))


def new_store(**kw) -> AttentionStore:
    return AttentionStore(StoreConfig(**{"host_bytes": 1000 * TOKEN, **kw}), LAYOUT, "fp", pin=False)


def turn(store: AttentionStore, key, prompt: list[int], window: int = 1000, plan=None, saved: bool = True):
    """One turn as the engine runs it: plan, reuse what is available, commit prompt + one answer
    token (its KV never computed), save the new segment."""
    if plan is None:
        key, plan = store.plan(key, prompt, window, 5, 2)
    avail = [s for s, _ in store.available(plan.reuse)]
    computed = len(plan.effective_prompt)
    hit = min(sum(s.length for s in avail), computed)
    seg = store.new_segment_id()
    logical = (prompt + [7])[: len(prompt)]  # the answer's only token is not computed: not in the record
    store.commit(key, logical, plan, slice_spans(avail, 0, hit), Span(seg, 0, computed - hit))
    if saved:
        store.add_segment(seg, kv(computed - hit))
    store.release(plan.reuse)
    return key, seg


def lose(store: AttentionStore, seg: str) -> None:
    """What an eviction from the last tier holding it does (settled at the engine's next step)."""
    with store._lock:
        store.host.evict(seg)
        store.ledger.drop_host(seg)
        store._maybe_lost.add(seg)


def test_a_dropped_anonymous_record_hides_no_prefix_another_holds():
    """Two clients sent the same prompt at once: two records of it. The latest one's KV ages out;
    the other still serves the prefix."""
    store = new_store()
    prompt = list(range(100, 140))
    key_a, plan_a = store.plan(None, prompt, 1000, 5, 0)
    key_b, plan_b = store.plan(None, prompt, 1000, 5, 0)  # both miss: neither is committed yet
    turn(store, key_a, prompt, plan=plan_a)
    _, seg_b = turn(store, key_b, prompt, plan=plan_b)
    lose(store, seg_b)
    store.on_queue([])
    assert key_b not in store.records and key_a in store.records
    _, plan = store.plan(None, prompt + [1, 2], 1000, 5, 0)
    assert plan.hit == len(prompt)
    store.release(plan.reuse)
    store.check_integrity()


def test_a_segment_lost_while_its_turn_ran_is_settled_with_the_new_record():
    """Its turn was admitted with the segment in host; it left every tier (and was settled) before
    the turn ended. The new record names it again: its later segment, never servable, must go too."""
    store = new_store()
    prompt = list(range(10, 50))
    _, first = turn(store, "s", prompt)
    longer = store.records["s"].logical + [60, 61]
    _, plan = store.plan("s", longer, 1000, 5, 2)
    avail = [s for s, _ in store.available(plan.reuse)]  # admitted: loaded from host
    lose(store, first)
    store.on_queue([])
    seg = store.new_segment_id()
    n = len(plan.effective_prompt) - plan.hit
    store.commit("s", longer, plan, avail, Span(seg, 0, n))
    store.add_segment(seg, kv(n))
    store.release(plan.reuse)
    store.on_queue([])
    assert "s" not in store.records and not store.host.contains(seg)
    store.check_integrity()


def test_a_restart_with_fewer_branches_allowed_drops_the_oldest(tmp_path):
    store = new_store(store_dir=str(tmp_path), session_branches=4)
    first = list(range(10, 50))
    turn(store, "s", first)
    for edit in range(3):
        turn(store, "s", first[:10] + [200 + edit] * 3)
    assert len(store._branches["s"]) == 3
    store.close()
    again = new_store(store_dir=str(tmp_path), session_branches=1)
    assert [again.records[b].logical[10] for b in again._branches["s"]] == [201]  # the latest left
    again.close()
    none = new_store(store_dir=str(tmp_path), session_branches=0)
    assert not none._branches and set(none.records) == {"s"}
    turn(none, "s", first[:10] + [300] * 3)
    assert not none._branches
    none.check_integrity()
    none.close()


def test_the_record_a_prompt_continues_is_chosen_by_its_tokens_not_by_what_the_tiers_hold():
    """A session's first turn left as a branch by an edit; the next prompt continues the first
    turn and overflows the window. Whichever truncation mode, and whether or not the branch's KV is
    still held, the same record is chosen: the prompt's cut does not depend on the cache."""
    effective = {}
    for mode, evicted in (("reuse", False), ("recompute", False), ("reuse", True)):
        store = new_store(truncation=mode)
        first = list(range(10, 50))
        turn(store, "s", first)
        logical = store.records["s"].logical
        turn(store, "s", first[:10] + [200, 201, 202])
        if evicted:  # not settled yet: the branch is still a record, its KV gone
            with store._lock:
                for seg in store.records[store._branches["s"][0]].segment_ids():
                    store.host.evict(seg)
                    store.ledger.drop_host(seg)
        _, plan = store.plan("s", logical + list(range(300, 309)), 50, 5, 2)
        assert plan.source == store._branches["s"][0]
        effective[(mode, evicted)] = plan.effective_prompt
        store.release(plan.reuse)
    # the "reuse" and "recompute" modes cut the same history; only what they reuse differs
    assert effective[("reuse", False)] == effective[("recompute", False)] == effective[("reuse", True)]


def test_a_forged_anonymous_key_is_never_taken_for_a_branch():
    """A remote server could name an anonymous record "anon-x\\x1fy": it is no branch of "anon-x", and
    dropping it (its segment cannot be fetched) leaves every index consistent."""
    store = new_store()
    with store._lock:
        store._replace_record(SessionRecord("anon-x\x1fy", list(range(40)), [Span("gone", 0, 40)]))
    store.check_integrity()
    store.cut_records_at("gone")
    assert not store.records and not store._namers and not store._anon
    store.check_integrity()
