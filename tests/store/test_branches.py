"""A session's earlier branches: a turn that edits, regenerates or forks the conversation keeps the
branch it left, so going back to it reuses its KV instead of recomputing it. Answers stay those
of recompute."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.errors import InvalidRequest

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
NO_DEVICE = CacheConfig(enable_prefix_cache=False)


def store_llm(path, **kw) -> LLM:
    return LLM(model=str(path), enable_store=True, cache=NO_DEVICE, **kw)


def turn(llm: LLM, prompt: list[int], session: str = "s"):
    return llm.generate([prompt], PARAMS, session_id=session)[0]


def two_branches(llm: LLM) -> tuple[list[int], list[int]]:
    """Two turns on one branch, then the first turn's message edited: the next turn going back to
    the first branch (its prompt), and the length of the part of it both branches share."""
    first = list(range(5, 45))
    out = turn(llm, first)
    branch_a = first + out.token_ids + [9, 10, 11]
    out = turn(llm, branch_a)
    back = branch_a + out.token_ids + [12, 13]
    edited = first[:30] + [200, 201, 202]  # the first message, edited
    turn(llm, edited)
    return back, 30


@pytest.mark.parametrize("branches", [4, 0])
def test_going_back_to_an_earlier_branch_reuses_its_kv(branches, tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = store_llm(path, session_branches=branches)
    back, shared = two_branches(llm)
    out = turn(llm, back)
    assert out.token_ids == LLM(model=str(path)).generate([back], PARAMS)[0].token_ids
    reused = out.metrics.cached_tokens["host"]
    if branches:  # all of the first branch but the new message and the last answer token (never computed)
        assert reused == len(back) - 3
    else:  # only the latest branch is kept: the part both share
        assert reused == shared
    store = llm.engine.store.store
    store.flush()
    store.check_integrity()
    stats = llm.stats()
    # going back made the edited branch the one left behind
    assert (stats["sessions"], stats["session_branches"]) == (1, 1 if branches else 0)


def test_continued_branches_are_dropped_and_their_number_is_capped(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = store_llm(path, session_branches=2)
    store = llm.engine.store.store
    first = list(range(5, 45))
    turn(llm, first)
    for edit in range(4):  # four edits of the first message: each leaves the branch before it
        turn(llm, first[:30] + [100 + edit] * 5)
        store.check_integrity()
    assert len(store._branches["s"]) == 2  # the oldest went
    kept = [store.records[b].logical for b in store._branches["s"]]
    assert [k[30] for k in kept] == [101, 102]
    # going on from a kept branch: the new record serves it, so it is no branch any more
    turn(llm, kept[-1] + [7, 7])
    assert [store.records[b].logical[30] for b in store._branches["s"]] == [101, 103]
    store.flush()
    store.check_integrity()


def test_forgetting_a_session_drops_its_branches(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = store_llm(path)
    two_branches(llm)
    store = llm.engine.store.store
    store.flush()
    assert store._branches["s"] and store.host.segment_ids()
    assert llm.forget_session("s")
    assert not store.records and not store._branches and not store.host.segment_ids()
    store.check_integrity()


def test_branches_survive_a_restart(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    llm = store_llm(path, store_dir=str(tmp_path / "st"))
    back, _ = two_branches(llm)
    llm.close()
    again = store_llm(path, store_dir=str(tmp_path / "st"))
    assert len(again.engine.store.store._branches["s"]) == 1
    out = turn(again, back)
    assert out.metrics.cached_tokens["disk"] == len(back) - 3
    assert out.token_ids == LLM(model=str(path)).generate([back], PARAMS)[0].token_ids
    again.engine.store.check_integrity()
    again.close()


def test_a_session_id_may_not_hold_the_branch_separator(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = store_llm(path)
    with pytest.raises(InvalidRequest, match="U\\+001F"):
        llm.generate([[5, 6, 7]], PARAMS, session_id="a\x1fb")
    with pytest.raises(InvalidRequest):
        llm.forget_session("a\x1fb")
