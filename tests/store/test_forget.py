"""Forgetting a conversation: its KV leaves every tier (device pages, host, disk files and rows, the
remote server), its next turn is computed whole, and other conversations keep theirs."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.errors import SessionBusy
from tests.redis_server import RedisServer

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NO_DEVICE = CacheConfig(enable_prefix_cache=False)


def turns(llm, session, n):
    conv, outs = list(range(5, 45)), []
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
    kept, _ = turns(llm, "kept", 2)
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


def test_forgetting_on_one_replica_deletes_the_session_from_the_remote_server(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    redis = RedisServer(tmp_path)
    try:
        a = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        b = LLM(model=str(path), enable_store=True, remote_url=redis.url, cache=NO_DEVICE)
        conv, _ = turns(a, "shared", 2)
        a.engine.store.store.flush()  # published
        tier = a.engine.store.store.remote.tier
        assert tier.get_record("shared") is not None
        assert b.forget_session("shared")  # b never served it: the server's copy is what it forgets
        b.engine.store.store.flush()
        assert tier.get_record("shared") is None and not list(tier.client.scan_iter(match=f"{tier.prefix}:seg:*"))
        out = b.generate([conv], PARAMS, session_id="shared")[0]
        assert out.metrics.cached_tokens["remote"] == 0
    finally:
        redis.stop()
