"""The remote tier: replicas sharing sessions through a real Redis server (a Unix socket in a temporary folder)."""

import json
import logging
import sys
import threading
import time

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.config import StoreConfig
from cachedattention.store import segment_format
from cachedattention.store.remote import RemoteTier, connect
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV
from cachedattention.store.session import salt_tag
from tests.redis_server import RedisServer
from tests.util import generate_capturing, rel_err, run_to_end

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
NO_DEVICE = CacheConfig(enable_prefix_cache=False)  # every reuse comes from the store's tiers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


def replica(path, url, **kw):
    return LLM(model=str(path), enable_store=True, cache=NO_DEVICE, remote_url=url, **kw)


def store_of(llm):
    return llm.engine.store.store


def settle(*llms):
    """Every save landed and every publish reached the server."""
    for llm in llms:
        store_of(llm).flush()


def grow(conv, out, t):
    return conv + out.token_ids + [10 + t, 11 + t, 12 + t]


def test_turns_alternating_between_replicas_equal_recompute(tiny_dirs, server, monkeypatch):
    path, _ = tiny_dirs["llama"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a, b = replica(path, server.url), replica(path, server.url)
    conv = list(range(5, 45))
    for t, llm in enumerate([a, b, a, b]):
        out, seen = generate_capturing(llm, conv, PARAMS, monkeypatch, session_id="alternating")
        expect, want = generate_capturing(ref, conv, PARAMS, monkeypatch)
        assert out.token_ids == expect.token_ids
        assert max(rel_err(x, y) for x, y in zip(seen, want)) <= 1e-4
        cached = out.metrics.cached_tokens
        if t == 0:
            assert out.metrics.num_cached_tokens == 0
        else:  # the other replica served the turn before: what it added comes from the remote store
            assert out.metrics.num_cached_tokens >= len(conv) - 8 and cached["remote"] >= (40 if t == 1 else 8), cached
            assert (cached["host"] == 0) == (t == 1), cached  # later, what it served or fetched before is in its host
        settle(a, b)
        conv = grow(conv, out, t)
    for llm, adopted in ((a, 1), (b, 2)):  # each turn but the first took the other replica's record
        store_of(llm).check_integrity()
        stats = llm.engine.store.stats()
        assert stats["remote_records_adopted"] == adopted and stats["store_hit_tokens"]["remote"] > 0


def test_a_replica_serves_its_own_sessions_from_its_tiers(tiny_dirs, server):
    path, _ = tiny_dirs["llama"]
    a = replica(path, server.url)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="own")[0]
    settle(a)
    again = a.generate([grow(conv, out, 0)], PARAMS, session_id="own")[0]
    assert again.metrics.cached_tokens["host"] >= len(conv) and again.metrics.cached_tokens["remote"] == 0
    assert a.engine.store.stats()["remote_records_adopted"] == 0  # the server's record is its own: nothing to fetch


def test_a_fetched_segment_lands_on_disk_when_host_has_no_room(tiny_dirs, server, tmp_path):
    path, _ = tiny_dirs["qwen2"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a = replica(path, server.url)
    b = replica(path, server.url, store_dir=str(tmp_path / "b"), host_bytes=0)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="to-disk")[0]
    settle(a)
    conv = grow(conv, out, 0)
    got = b.generate([conv], PARAMS, session_id="to-disk")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    assert got.metrics.cached_tokens["disk"] >= 40  # fetched into b's disk tier, read from there
    settle(b)
    store_of(b).check_integrity()
    assert store_of(b).disk.used_bytes() > 0 and store_of(b).host.used_bytes() == 0


def test_an_unreachable_remote_store_costs_nothing_but_sharing(tiny_dirs, tmp_path, caplog):
    path, _ = tiny_dirs["llama"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a = replica(path, f"unix://{tmp_path / 'nobody-listens.sock'}")
    conv = list(range(5, 45))
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        for t in range(3):
            out = a.generate([conv], PARAMS, session_id="offline")[0]
            assert out.token_ids == ref.generate([conv], PARAMS)[0].token_ids
            if t:
                assert out.metrics.cached_tokens["host"] >= len(conv) - 8
            settle(a)
            conv = grow(conv, out, t)
    assert caplog.text.count("a remote store read failed") == 1  # told once, then reads pause
    assert a.engine.store.stats()["remote_failed_calls"] >= 1
    store_of(a).check_integrity()


def published(llm, key):
    """The session's record as the server holds it."""
    tier = store_of(llm).remote.tier
    return json.loads(tier.client.get(tier.record_key(key)))


def after_one_turn(path, url, session):
    """The recompute reference, replicas a and b, and the session's first turn served by a (published)."""
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a, b = replica(path, url), replica(path, url)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id=session)[0]
    settle(a)
    return ref, a, b, grow(conv, out, 0)


def test_a_corrupt_remote_segment_is_recomputed_and_deleted(tiny_dirs, server, caplog):
    ref, a, b, conv = after_one_turn(tiny_dirs["llama"][0], server.url, "corrupt")
    tier = store_of(a).remote.tier
    seg = published(a, "corrupt")["spans"][0][0]
    key = tier.segment_key(seg)
    tier.client.setrange(key, tier.client.strlen(key) - 5, b"\xff\x00")  # a flipped byte in the last layer
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        got = b.generate([conv], PARAMS, session_id="corrupt")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    assert got.metrics.num_cached_tokens == 0 and "checksum mismatch" in caplog.text
    assert not tier.client.exists(key) and b.engine.store.stats()["corrupt_segments"] == 1
    settle(b)
    store_of(b).check_integrity()


def test_a_segment_the_server_evicted_ends_the_hit_there(tiny_dirs, server):
    path, _ = tiny_dirs["llama"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a, b = replica(path, server.url), replica(path, server.url)
    conv = list(range(5, 45))
    for t in range(2):
        out = a.generate([conv], PARAMS, session_id="evicted")[0]
        settle(a)
        conv = grow(conv, out, t)
    spans = published(a, "evicted")["spans"]
    assert len(spans) == 2
    tier = store_of(a).remote.tier
    tier.client.delete(tier.segment_key(spans[1][0]))  # as the server's LRU would
    got = b.generate([conv], PARAMS, session_id="evicted")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    first = spans[0][2] - spans[0][1]
    assert got.metrics.cached_tokens["remote"] == first  # the first turn's segment, then recompute
    assert b.engine.store.stats()["remote_failed_fetches"] == 1
    settle(b)
    store_of(b).check_integrity()


def test_another_model_never_sees_the_session(tiny_dirs, server):
    llama, _ = tiny_dirs["llama"]
    mistral, _ = tiny_dirs["mistral"]
    a = replica(llama, server.url)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="shared-name")[0]
    settle(a)
    other = replica(mistral, server.url)
    got = other.generate([grow(conv, out, 0)], PARAMS, session_id="shared-name")[0]
    assert got.metrics.num_cached_tokens == 0
    assert other.engine.store.stats()["remote_records_adopted"] == 0


def test_an_adapter_s_session_moves_between_replicas_serving_its_files(tiny_dirs, server, tmp_path):
    """Two replicas with the same adapter files (under other names): its session's KV goes from one
    to the other through the remote tier; the base model, or another adapter, of the same session id
    there reuses none of it."""
    from cachedattention import LoRARequest
    from tests.lora_files import ATTENTION, MLP, write_adapter

    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION + MLP, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION + MLP, seed=2)
    ref = LLM(model=str(path), cache=NO_DEVICE, enable_lora=True)
    first, second = (replica(path, server.url, enable_lora=True) for _ in range(2))
    conv = list(range(5, 45))
    out = first.generate([conv], PARAMS, session_id="tuned", lora_request=LoRARequest("a", 1, str(tmp_path / "a")))[0]
    settle(first)
    conv = grow(conv, out, 0)
    other = LoRARequest("b", 2, str(tmp_path / "b"))
    for lora in (None, other):  # another model: nothing of the adapter's conversation
        got = second.generate([conv], PARAMS, session_id="tuned", lora_request=lora)[0]
        assert got.metrics.num_cached_tokens == 0
        assert got.token_ids == ref.generate([conv], PARAMS, lora_request=lora)[0].token_ids
    same = LoRARequest("renamed", 3, str(tmp_path / "a"))
    got = second.generate([conv], PARAMS, session_id="tuned", lora_request=same)[0]
    assert got.metrics.cached_tokens["remote"] >= 40
    assert got.token_ids == ref.generate([conv], PARAMS, lora_request=same)[0].token_ids


def test_a_record_of_another_model_under_our_key_is_not_served(tiny_dirs, server, caplog):
    path, _ = tiny_dirs["llama"]
    a = replica(path, server.url)
    tier = store_of(a).remote.tier
    tier.client.set(tier.record_key("forged"), json.dumps(
        {"key": "forged", "logical": list(range(5, 45)), "head": 0, "dropped_until": 0,
         "spans": [["x" * 32, 0, 40]], "fingerprint": "another-model"}))
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        out = a.generate([list(range(5, 50))], PARAMS, session_id="forged")[0]
    assert out.metrics.num_cached_tokens == 0 and "fingerprint differs" in caplog.text
    assert a.engine.store.stats()["remote_records_adopted"] == 0


def hold_fetches(llm, monkeypatch) -> threading.Event:
    """The replica's fetches from the server wait (at most 30 s) until the returned event is set."""
    tier = store_of(llm).remote.tier
    release, real_get = threading.Event(), tier.get

    def slow_get(seg_id):
        release.wait(30)
        return real_get(seg_id)

    monkeypatch.setattr(tier, "get", slow_get)
    return release


def test_admission_waits_for_a_slow_fetch_only_so_long(tiny_dirs, server, monkeypatch):
    path, _ = tiny_dirs["llama"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a = replica(path, server.url)
    b = replica(path, server.url, remote_wait_s=0.05)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="slow")[0]
    settle(a)
    release = hold_fetches(b, monkeypatch)  # the fetch lands only after the turn was admitted
    conv = grow(conv, out, 0)
    got = b.generate([conv], PARAMS, session_id="slow")[0]
    release.set()
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    assert got.metrics.num_cached_tokens == 0  # it did not wait for the fetch (30 s): it recomputed
    settle(b)
    # the fetch landed after the turn had saved its own KV of every token: nothing names it, so it is not kept
    assert b.engine.store.stats()["remote_segments_fetched"] == 0 and store_of(b).host.used_bytes() == got_bytes(b)
    store_of(b).check_integrity()


def got_bytes(llm):
    """Bytes of the segments the replica's records name."""
    store = store_of(llm)
    return sum(store.host.get(seg).nbytes for rec in store.records.values() for seg in rec.segment_ids())


def test_truncated_sessions_move_between_replicas_unchanged(tiny_dirs, server):
    """Context overflow: replicas taking turns decide and reuse exactly as one replica would."""
    path, _ = tiny_dirs["mistral"]
    window = dict(max_model_len=128, keep_head_tokens=8)
    one = LLM(model=str(path), enable_store=True, cache=NO_DEVICE, **window)
    a, b = replica(path, server.url, **window), replica(path, server.url, **window)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    solo = pair = list(range(5, 45))
    truncated = 0
    for t in range(8):
        want = one.generate([solo], params, session_id="long")[0]
        got = (a, b)[t % 2].generate([pair], params, session_id="long")[0]
        assert got.token_ids == want.token_ids
        assert got.metrics.truncated_tokens == want.metrics.truncated_tokens
        assert got.metrics.num_cached_tokens == want.metrics.num_cached_tokens
        truncated += got.metrics.truncated_tokens
        settle(one, a, b)
        solo, pair = grow(solo, want, t), grow(pair, got, t)
    assert truncated > 0


def test_values_expire_when_a_ttl_is_set(tiny_dirs, server):
    path, _ = tiny_dirs["llama"]
    a = replica(path, server.url, remote_ttl_s=600)
    a.generate([list(range(5, 45))], PARAMS, session_id="ttl")
    settle(a)
    tier = store_of(a).remote.tier
    seg = published(a, "ttl")["spans"][0][0]
    for key in (tier.record_key("ttl"), tier.segment_key(seg)):
        assert 0 < tier.client.pttl(key) <= 600_000


LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_segment_value_round_trips_and_refuses_damage(dtype):
    layout = KVLayout(3, 2, 4, dtype)
    kv = SegmentKV(torch.randn(3, 5, 2, 4).to(dtype), torch.randn(3, 5, 2, 4).to(dtype))
    blob = segment_format.encode_bytes("seg", kv, "fp", layout)
    back = segment_format.decode_bytes(blob, "seg", "fp", layout, "seg")
    assert torch.equal(back.k, kv.k) and torch.equal(back.v, kv.v) and back.nbytes == kv.nbytes
    assert len(blob) == segment_format.encoded_size("seg", kv, "fp", layout)
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    for bad, why in [(bytes(flipped), "checksum"), (blob[:-1], "wrong size"), (b"nonsense" * 4, "bad magic")]:
        with pytest.raises(CorruptSegment, match=why):
            segment_format.decode_bytes(bad, "seg", "fp", layout, "seg")
    with pytest.raises(CorruptSegment, match="fingerprint"):
        segment_format.decode_bytes(blob, "seg", "another", layout, "seg")
    with pytest.raises(CorruptSegment, match="holds segment 'seg'"):  # a value copied under another key
        segment_format.decode_bytes(blob, "other", "fp", layout, "other")
    empty = SegmentKV(torch.empty(3, 0, 2, 4, dtype=dtype), torch.empty(3, 0, 2, 4, dtype=dtype))
    assert segment_format.decode_bytes(segment_format.encode_bytes("e", empty, "fp", layout), "e", "fp", layout, "e").num_tokens == 0


def test_the_tier_contract_against_the_server(server):
    tier = RemoteTier(server.url, "tier-contract", LAYOUT)
    kv = SegmentKV(torch.randn(3, 5, 2, 4), torch.randn(3, 5, 2, 4))
    assert tier.get("s1") is None and not tier.contains("s1")
    size = tier.put("s1", kv)
    assert tier.contains_many(["s1", "s2"]) == [True, False] and size == tier.stats()["remote_bytes_written"]
    assert torch.equal(tier.get("s1").k, kv.k)
    tier.check_integrity()
    tier.client.setrange(tier.segment_key("s1"), 0, b"\x00" * 4)  # same size: the check reads values' sizes
    tier.check_integrity()
    tier.client.append(tier.segment_key("s1"), b"tail")  # a value that is not what was written
    with pytest.raises(RuntimeError, match="were written"):
        tier.check_integrity()
    tier.evict("s1")
    assert tier.get("s1") is None
    tier.check_integrity()
    tier.close()


@pytest.mark.parametrize("url", ["http://localhost:6379", "redis://", "unix://", "localhost:6379", "memcached://h:1"])
def test_a_remote_url_that_is_not_redis_is_refused(url):
    with pytest.raises(ValueError, match="remote_url"):
        StoreConfig(remote_url=url)


def test_without_the_redis_client_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ValueError, match="pip install"):
        connect("redis://localhost:6379/0", 1.0)


def test_the_cli_flags_reach_the_store_config():
    from cachedattention.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--remote-url", "redis://cache:6379/2", "--remote-wait-s", "0.5",
                                      "--remote-ttl-s", "3600"])
    store = engine_config(args).store
    assert (store.remote_url, store.remote_wait_s, store.remote_ttl_s) == ("redis://cache:6379/2", 0.5, 3600)
    with pytest.raises(ValueError, match="remote_url"):
        engine_config(build_parser().parse_args(["serve", "--remote-url", "cache:6379"]))


def test_copies_of_the_weights_share_the_fingerprint_and_other_weights_do_not(tiny_dirs, tmp_path, monkeypatch):
    """Replicas on other machines load copies with other file times: the remote namespace must match;
    any change to the weights (a fine-tune, a merged adapter, one edited row) must not."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from cachedattention.model.weights_id import DIGESTS_FILE, weights_id

    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path / "home"))
    path, _ = tiny_dirs["llama"]
    copy = shutil.copytree(path, tmp_path / "copy", copy_function=shutil.copyfile)  # new file times
    for f in copy.iterdir():
        os.utime(f, (1, 1))
    assert weights_id(copy) == weights_id(path)
    assert (tmp_path / "home" / DIGESTS_FILE).is_file()  # the digests are kept: the next start reads nothing
    (weights,) = copy.glob("*.safetensors")
    tensors, size = load_file(str(weights)), weights.stat().st_size
    name = max(tensors, key=lambda n: tensors[n].numel())
    tensors[name][len(tensors[name]) // 2, 3] += 1  # one weight of the largest matrix, in its middle
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size and weights_id(copy) != weights_id(path)
    (tmp_path / "home" / DIGESTS_FILE).write_text("{not json")  # a damaged list is computed again
    assert weights_id(copy) != weights_id(path)


def test_a_hostile_or_damaged_remote_record_is_not_served(tiny_dirs, server, caplog):
    """Records on the server are shared input: wrong types, spans out of range, a segment shorter
    than its record says: never served, never an error to the client."""
    ref, a, b, conv = after_one_turn(tiny_dirs["llama"][0], server.url, "hostile")
    tier = store_of(a).remote.tier
    good = published(a, "hostile")
    seg, lo, hi = good["spans"][0]
    want = ref.generate([conv], PARAMS)[0].token_ids
    bad_records = [
        {**good, "spans": ["abc"]},
        {**good, "spans": [[seg, -5, -1]]},
        {**good, "spans": [[seg, 0, 10_000]]},
        {**good, "logical": "not a list"},
        {**good, "head": 3, "dropped_until": 1},
        {**good, "stamp": "late"},
    ]
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        for i, body in enumerate(bad_records):
            tier.client.set(tier.record_key(f"hostile-{i}"), json.dumps(body))
            got = b.generate([conv], PARAMS, session_id=f"hostile-{i}")[0]
            assert got.token_ids == want and got.metrics.num_cached_tokens == 0, body
    assert caplog.text.count("malformed") == len(bad_records)
    # a well-formed record naming more tokens than its segment holds: the load refuses it, the turn recomputes
    short = {**good, "spans": [[seg, lo, hi]], "logical": conv[: hi + 5]}
    held = store_of(a).host.get(seg)
    one_token = SegmentKV(held.k[:, :1], held.v[:, :1])  # a valid value, of one token
    tier.client.set(tier.segment_key(seg), segment_format.encode_bytes(seg, one_token, tier.fingerprint, tier.layout))
    tier.client.set(tier.record_key("short"), json.dumps(short))
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        got = b.generate([conv], PARAMS, session_id="short")[0]
    assert got.token_ids == want and got.metrics.num_cached_tokens == 0
    assert "fewer tokens than its record names" in caplog.text
    settle(b)
    store_of(b).check_integrity()


def test_a_late_publish_does_not_replace_a_later_turn(server):
    tier = RemoteTier(server.url, "newest-wins", LAYOUT)
    body = {"key": "s", "logical": [1, 2], "head": 0, "dropped_until": 0, "spans": []}
    assert tier.put_record("s", {**body, "stamp": 20.0})
    assert not tier.put_record("s", {**body, "logical": [1], "stamp": 10.0})  # turn N lands after N + 1
    assert tier.get_record("s")["stamp"] == 20.0 and tier.get_record("s")["logical"] == [1, 2]
    assert tier.put_record("s", {**body, "stamp": 30.0})
    tier.close()


def test_turns_behind_a_slow_fetch_are_admitted_first(tiny_dirs, server, monkeypatch):
    """A turn waiting for its history from remote does not hold up the queue behind it."""
    path, _ = tiny_dirs["llama"]
    a = replica(path, server.url)
    b = replica(path, server.url, remote_wait_s=30)
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="slow-head")[0]
    settle(a)
    release = hold_fetches(b, monkeypatch)
    engine = b.engine
    head = engine.add_request(grow(conv, out, 0), PARAMS, session_id="slow-head")
    other = engine.add_request(list(range(100, 130)), PARAMS)
    done = {}
    for _ in range(200):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        if other in done:
            break
    assert other in done and head not in done  # the second request ran to the end while the head waited
    release.set()
    while head not in done:
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert done[head].metrics.cached_tokens["remote"] >= 40  # then the head was served from remote


def test_a_fetch_that_fails_unexpectedly_ends_the_wait(tiny_dirs, server, monkeypatch, caplog):
    ref, _, _, conv = after_one_turn(tiny_dirs["llama"][0], server.url, "fetch-bug")
    b = replica(tiny_dirs["llama"][0], server.url, remote_wait_s=30)
    tier = store_of(b).remote.tier

    def broken_get(seg_id):
        raise MemoryError("no room for the value")  # not an OSError: a fetch must end however it fails

    monkeypatch.setattr(tier, "get", broken_get)
    got = b.generate([conv], PARAMS, session_id="fetch-bug")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids and got.metrics.num_cached_tokens == 0
    assert not store_of(b).remote.fetching and b.engine.store.stats()["remote_failed_fetches"] == 1


def test_anonymous_conversations_move_between_replicas_by_their_prefix(tiny_dirs, server, monkeypatch):
    """No session id (an OpenAI client sending the whole conversation): a replica finds the longest
    prefix another replica published by the prompt's block hashes, verified token by token."""
    path, _ = tiny_dirs["qwen2"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    a, b = replica(path, server.url), replica(path, server.url)
    conv = list(range(100, 140))
    for t, llm in enumerate([a, b, a]):
        out, seen = generate_capturing(llm, conv, PARAMS, monkeypatch)
        expect, want = generate_capturing(ref, conv, PARAMS, monkeypatch)
        assert out.token_ids == expect.token_ids
        assert max(rel_err(x, y) for x, y in zip(seen, want)) <= 1e-4
        if t:  # the other replica served the turn before: what it added comes from the remote store
            cached = out.metrics.cached_tokens
            assert cached["remote"] >= (40 if t == 1 else 1) and out.metrics.num_cached_tokens >= len(conv) - 8, cached
        settle(a, b)
        conv = grow(conv, out, t)
    # a shared system prompt: another user's question after the same 48 tokens reuses their blocks
    system = list(range(150, 198))
    a.generate([system + [7, 8, 9]], PARAMS)
    settle(a)
    other = b.generate([system + [1, 2, 3, 4]], PARAMS)[0]
    assert other.metrics.cached_tokens["remote"] == 48
    assert other.token_ids == ref.generate([system + [1, 2, 3, 4]], PARAMS)[0].token_ids
    for llm in (a, b):
        store_of(llm).check_integrity()


def test_an_anonymous_prefix_moves_between_replicas_only_within_its_cache_salt(tiny_dirs, server):
    path, _ = tiny_dirs["qwen2"]
    a, b = replica(path, server.url), replica(path, server.url)
    system = list(range(60, 108))

    def ask(llm, question, salt=None):
        item = {"prompt_token_ids": system + question, **({"cache_salt": salt} if salt else {})}
        return llm.generate([item], PARAMS)[0].metrics.cached_tokens

    ask(a, [7, 8, 9], "tenant-a")
    settle(a)
    sync = store_of(b).remote  # (the server's block index leads only tenant a's prompts to its record)
    assert sync.read_prefix(system + [1, 2, 3]) is None
    assert sync.read_prefix(system + [1, 2, 3], salt_tag("tenant-b")) is None
    assert sync.read_prefix(system + [1, 2, 3], salt_tag("tenant-a")).num_kv >= 48
    assert sum(ask(b, [1, 2, 3]).values()) == 0  # (unsalted: tenant a's blocks are not found)
    settle(b)
    assert sum(ask(b, [4, 5, 6], "tenant-b").values()) == 0
    assert ask(b, [1, 2, 4], "tenant-a")["remote"] == 48  # (its own salt's, from the other replica)
    for llm in (a, b):
        store_of(llm).check_integrity()


def test_an_anonymous_conversation_is_found_by_its_first_blocks_after_the_server_lost_them(tiny_dirs, server):
    """The server flushed (or restarted empty) between two turns: the next publish puts back the
    earlier turns' segments and their blocks' keys, not only the new ones."""
    path, _ = tiny_dirs["qwen2"]
    a, b = replica(path, server.url), replica(path, server.url)
    conv = list(range(200, 240))
    out = a.generate([conv], PARAMS)[0]
    settle(a)
    store_of(a).remote.tier.client.flushall()
    a.generate([grow(conv, out, 0)], PARAMS)
    settle(a)
    other = b.generate([conv + [1, 2, 3]], PARAMS)[0]  # the first turn's prefix only
    assert other.metrics.cached_tokens["remote"] >= 32
    for llm in (a, b):
        store_of(llm).check_integrity()


def test_the_block_keys_are_the_same_everywhere():
    from cachedattention.store.remote import block_keys

    keys = block_keys(list(range(40)), 16)
    assert len(keys) == 2 and keys == block_keys(list(range(40)), 16)
    assert keys[0] == block_keys(list(range(16)) + [99] * 16, 16)[0] and keys[1] != block_keys(list(range(16)) + [99] * 16, 16)[1]
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)  # 128 bits, hex
    salted = block_keys(list(range(40)), 16, "\x1etag")
    assert len(salted) == 2 and not set(salted) & set(keys)  # (a salted prefix's chain is its own)


def test_a_client_may_not_name_a_session_like_the_store_s_anonymous_records(tiny_dirs):
    a = LLM(model=str(tiny_dirs["llama"][0]), enable_store=True)
    with pytest.raises(ValueError, match="may not start with 'anon-'"):
        a.generate([list(range(5, 45))], PARAMS, session_id="anon-mine")


def test_an_adopted_prefix_whose_segments_are_gone_hides_nothing_this_replica_holds(tiny_dirs, server):
    """B's record of S + q2 is adopted by A for S + q2 + q3, but its segments are gone from the server:
    A cuts it, and its own record of S + q1 serves S again to the prompts after."""
    path, _ = tiny_dirs["llama"]
    a, b = replica(path, server.url), replica(path, server.url)
    system = list(range(60, 108))  # 48 tokens: three blocks
    a.generate([system + [1, 2, 3]], PARAMS)
    # A's record on the server first: the blocks both records share name the last record published,
    # which must be B's (a loaded machine could publish A's after B's: then nothing is adopted)
    settle(a)
    theirs = b.generate([system + [4, 5, 6]], PARAMS)[0]
    settle(a, b)
    tier = store_of(b).remote.tier
    for seg in list(store_of(b).host.segment_ids()):
        tier.client.delete(tier.segment_key(seg))  # as the server's eviction would
    # a turn that keeps nothing of its own (its index entries would replace R's): n > 1's other choices
    rid = a.engine.add_request(system + [4, 5, 6] + theirs.token_ids + [7, 8], PARAMS, save_to_store=False)
    cont = run_to_end(a, [rid])[0]
    assert cont.metrics.cached_tokens["remote"] == 0
    settle(a)  # the fetch has failed by now (on a loaded machine the turn may not have waited for it)
    assert a.engine.store.stats()["remote_failed_fetches"] >= 1
    again = a.generate([system + [9, 10, 11]], PARAMS)[0]
    assert again.metrics.cached_tokens["host"] >= 48  # S, from its own record again
    store_of(a).check_integrity()


def test_a_server_that_restarts_costs_only_the_turns_in_between(tiny_dirs, tmp_path, caplog, monkeypatch):
    """The remote server is killed mid-conversation and comes back empty: the replicas keep answering
    from their own tiers (one warning), and sharing resumes once calls work again."""
    import cachedattention.store.write_pause as write_pause

    path, _ = tiny_dirs["llama"]
    ref = LLM(model=str(path), cache=NO_DEVICE)
    srv = RedisServer(tmp_path)
    a, b = replica(path, srv.url), replica(path, srv.url)
    for tier in (store_of(a).remote.tier, store_of(b).remote.tier):
        for pause in (tier.reads, tier.record_reads, tier.writes):
            pause.seconds = 0.2  # short pauses, so the test does not wait out the 5 s default
    conv = list(range(5, 45))
    out = a.generate([conv], PARAMS, session_id="restart")[0]
    settle(a)
    srv.stop()
    with caplog.at_level(logging.WARNING, logger=write_pause.__name__):
        conv = grow(conv, out, 0)
        out = a.generate([conv], PARAMS, session_id="restart")[0]  # the server is down: a's own host serves
        assert out.token_ids == ref.generate([conv], PARAMS)[0].token_ids and out.metrics.cached_tokens["host"] > 0
        settle(a)
        srv = RedisServer(tmp_path)  # back, empty, on the same socket
        try:
            time.sleep(0.3)  # the pauses end
            conv = grow(conv, out, 1)
            out = a.generate([conv], PARAMS, session_id="restart")[0]  # publishes again
            settle(a)
            conv = grow(conv, out, 2)
            got = b.generate([conv], PARAMS, session_id="restart")[0]
            assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
            assert got.metrics.cached_tokens["remote"] >= len(conv) - 8  # sharing resumed
        finally:
            srv.stop()
    assert "work again" in caplog.text
    for llm in (a, b):
        store_of(llm).check_integrity()
