"""Forgetting a conversation: its KV leaves every tier (device pages, host, disk files and rows, the
remote server), its next turn is computed whole, and other conversations keep theirs."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.errors import SessionBusy
from tests.redis_server import RedisServer

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NO_DEVICE = CacheConfig(enable_prefix_cache=False)


def turns(llm, session, n, start=5):
    conv, outs = list(range(start, start + 40)), []
    for t in range(n):
        out = llm.generate([conv], PARAMS, session_id=session)[0]
        outs.append(out)
        conv = conv + out.token_ids + [10 + t, 11 + t, 12 + t]
    return conv, outs


def test_a_forgotten_session_leaves_every_tier_and_is_computed_whole_next(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, store_dir=str(tmp_path), host_bytes=1 << 16)  # host overflows to disk
    plain = LLM(model=str(path), cache=NO_DEVICE)
    conv, _ = turns(llm, "gone", 3)
    kept, _ = turns(llm, "kept", 2, start=60)  # another conversation: no block in common
    store = llm.engine.store.store
    store.flush()
    files = set((tmp_path / "segments").glob("*.kv"))
    assert files and llm.stats()["sessions"] == 2
    assert llm.forget_session("gone") and not llm.forget_session("gone")
    store.flush()
    left = set((tmp_path / "segments").glob("*.kv"))
    assert left < files and "gone" not in store.records and llm.stats()["sessions_forgotten"] == 1
    store.check_integrity()
    llm.engine.pages.check_integrity()
    again = llm.generate([conv], PARAMS, session_id="gone")[0]
    assert sum(again.metrics.cached_tokens.values()) == 0  # not even the device pages were left
    assert again.token_ids == plain.generate([conv], PARAMS)[0].token_ids
    other = llm.generate([kept], PARAMS, session_id="kept")[0]
    assert sum(other.metrics.cached_tokens.values()) > 0  # the other conversation keeps its KV
    for bad in ("", "anon-1234"):
        with pytest.raises(ValueError, match="session_id"):
            llm.forget_session(bad)
    assert llm.forget_session("gone")  # (the turn above stored it again)
    llm.close()
    restarted = LLM(model=str(path), enable_store=True, store_dir=str(tmp_path))
    assert "gone" not in restarted.engine.store.store.records and "kept" in restarted.engine.store.store.records


def test_a_session_with_a_turn_in_progress_is_not_forgotten(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True)
    turns(llm, "busy", 1)
    rid = llm.engine.add_request(list(range(5, 60)), PARAMS, session_id="busy")
    with pytest.raises(SessionBusy, match="in progress"):
        llm.forget_session("busy")
    llm.engine.abort(rid)
    assert llm.forget_session("busy")


def test_forgetting_on_one_replica_reaches_the_remote_server_and_the_other_replicas(tiny_dirs, tmp_path):
    """Turn 1 on a, turn 2 on b (adopted through the server), then a forgets: every turn's segments
    leave the server, the record becomes a tombstone, and b drops its own copy at its next turn."""
    path, _ = tiny_dirs["llama"]
    redis = RedisServer(tmp_path)
    try:
        a = LLM(model=str(path), enable_store=True, remote_url=redis.url)
        b = LLM(model=str(path), enable_store=True, remote_url=redis.url)
        conv = list(range(5, 45))
        out = a.generate([conv], PARAMS, session_id="shared")[0]
        a.engine.store.store.flush()
        conv = conv + out.token_ids + [10, 11, 12]
        out = b.generate([conv], PARAMS, session_id="shared")[0]
        assert out.metrics.cached_tokens["remote"] > 0
        b.engine.store.store.flush()
        conv = conv + out.token_ids + [13, 14, 15]
        tier = a.engine.store.store.remote.tier
        assert len(list(tier.client.scan_iter(match=tier.segment_key("*")))) == 2
        assert a.forget_session("shared")
        a.engine.store.store.flush()
        assert tier.get_record("shared")["forgotten"] and not list(tier.client.scan_iter(match=tier.segment_key("*")))
        again = b.generate([conv], PARAMS, session_id="shared")[0]  # b learns it from the tombstone
        assert sum(again.metrics.cached_tokens.values()) == 0 and "shared" in b.engine.store.store.records
        b.engine.store.store.flush()  # b's new turn publishes: later than the forgetting, it replaces the tombstone
        assert "forgotten" not in tier.get_record("shared")
        c = LLM(model=str(path), enable_store=True, remote_url=redis.url)
        assert c.forget_session("shared")  # c never served it: the server's copy is what it forgets
        for llm in (a, b, c):
            llm.engine.store.store.check_integrity()
            llm.engine.pages.check_integrity()
    finally:
        redis.stop()
    down = LLM(model=str(path), enable_store=True, remote_url=redis.url)
    with pytest.raises(OSError):  # the server cannot be read: it may still hold the session (a 503)
        down.forget_session("shared")


def test_a_refused_turn_lets_its_history_go(tiny_dirs):
    """A session's turn refused after its plan (it does not fit) holds none of its segments."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, max_model_len=96)
    conv, _ = turns(llm, "s", 1)
    with pytest.raises(ValueError, match="window"):
        llm.engine.add_request(conv + list(range(5, 95)), PARAMS, session_id="s", truncate=False)
    assert llm.forget_session("s")
    llm.engine.store.store.flush()
    assert llm.stats()["host_bytes_used"] == 0


def test_every_device_block_of_a_forgotten_session_goes_an_edited_branch_too(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))  # no store: the device cache alone
    original = list(range(5, 70))
    llm.generate([original], PARAMS, session_id="u")
    llm.generate([original[:20] + list(range(80, 125))], PARAMS, session_id="u")  # an edited history
    llm.generate([list(range(130, 170))], PARAMS, session_id="other")
    assert llm.forget_session("u") and not llm.forget_session("u")
    replay = llm.generate([original], PARAMS)[0]  # someone sends u's original branch again
    assert replay.metrics.cached_tokens["device"] == 0
    assert llm.generate([list(range(130, 170))], PARAMS)[0].metrics.cached_tokens["device"] > 0  # not another's
    llm.engine.pages.check_integrity()


def test_a_turn_running_elsewhere_when_the_session_is_forgotten_does_not_bring_it_back(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    redis = RedisServer(tmp_path)
    try:
        a = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        b = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        conv, _ = turns(a, "raced", 1)
        a.engine.store.store.flush()
        rid = b.engine.add_request(conv, PARAMS, session_id="raced")  # planned now, on b
        b.engine.step()
        b.engine.step()
        assert a.forget_session("raced")  # while b's turn runs
        while b.engine.has_unfinished():
            b.engine.step()
        assert rid not in b.engine.requests or b.engine.requests[rid].is_finished
        b.engine.store.store.flush()  # b's publish: refused (planned before the forgetting), its uploads gone
        tier = a.engine.store.store.remote.tier
        assert tier.get_record("raced")["forgotten"] and not list(tier.client.scan_iter(match=tier.segment_key("*")))
        again = b.generate([conv], PARAMS, session_id="raced")[0]  # b reads the tombstone: its copy goes
        assert sum(again.metrics.cached_tokens.values()) == 0
    finally:
        redis.stop()


def test_forgetting_one_session_keeps_the_blocks_another_shares(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    system = list(range(5, 69))  # four 16-token pages
    llm.generate([system + [100, 101, 102]], PARAMS, session_id="u")
    assert llm.generate([system + [110, 111]], PARAMS, session_id="v")[0].metrics.cached_tokens["device"] == 64
    assert llm.forget_session("u")
    assert llm.generate([system + [120, 121]], PARAMS, session_id="v")[0].metrics.cached_tokens["device"] == 64
    llm.engine.pages.check_integrity()


def test_a_first_turn_running_elsewhere_is_refused_though_nothing_was_held(tiny_dirs, tmp_path):
    """Forgetting a session no replica holds yet (its first turn still running on another, or not
    yet published) answers that nothing was held, and still leaves the tombstone that refuses that turn."""
    path, _ = tiny_dirs["llama"]
    redis = RedisServer(tmp_path)
    try:
        a = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        b = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        conv = list(range(5, 45))
        b.engine.add_request(conv, PARAMS, session_id="new")  # planned now, on b
        b.engine.step()
        assert not a.forget_session("new")  # (a 404: no replica held it)
        while b.engine.has_unfinished():
            b.engine.step()
        b.engine.store.store.flush()  # b's publish: refused, planned before the forgetting
        tier = a.engine.store.store.remote.tier
        assert tier.get_record("new")["forgotten"] and not list(tier.client.scan_iter(match=tier.segment_key("*")))
        again = a.generate([conv + [7, 8, 9]], PARAMS, session_id="new")[0]
        assert sum(again.metrics.cached_tokens.values()) == 0
    finally:
        redis.stop()
