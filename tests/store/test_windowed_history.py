"""A segment whose tokens no later turn's window reaches (more than the window and a page before
its record's newest turn, and not the record's first) drops its windowed layers' KV from host
memory: continuing the conversation, regenerating or editing its last message give the same
tokens and reuse as much as before. An edit reaching further back reads them from the segment's
file ("disk", the default: once the file holds every layer), or resumes before the first segment
without them ("drop": a store without a disk tier)."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.store import segment_format
from cachedattention.store.disk import DiskTier, SegmentReader
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV
from tests.util import capture_logits, rel_err

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PAGE = 4  # the tiny models' window is 8: a load reads windowed layers from 12 tokens back at most


def _engine(path, **store):
    """A store without a disk tier that drops them (or as `store` says)."""
    store = {"windowed_history": "drop", **store}
    return LLM(model=str(path), enable_store=True, cache=CacheConfig(page_size=PAGE, enable_prefix_cache=False), **store)


def _reference(path):
    return LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))


def _turn(llm, prompt, monkeypatch, session=None, flush=True, params=PARAMS):
    """One turn (its tokens and last logits); `flush`: its saves landed, every segment on disk too."""
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], params, session_id=session)[0]
    monkeypatch.undo()
    if llm.engine.store is not None and flush:
        llm.engine.store.store.flush()
    return out, seen[0]


def _same(got, want) -> None:
    assert got[0].token_ids == want[0].token_ids
    assert rel_err(got[1], want[1]) <= 1e-4


def _converse(engines, ref, monkeypatch, turns=6, flush=True):
    """The same conversation (session "s") on each engine; every turn's tokens and logits equal the
    plain engine's. Returns the prompts and each engine's host hits."""
    conv, prompts, hits = list(range(5, 45)), [], [[] for _ in engines]
    for turn in range(turns):
        want = _turn(ref, conv, monkeypatch)
        for llm, h in zip(engines, hits):
            got = _turn(llm, conv, monkeypatch, "s", flush)
            _same(got, want)
            h.append(got[0].metrics.cached_tokens["host"])
        prompts.append(conv)
        conv = conv + want[0].token_ids + [50 + turn, 51 + turn, 52 + turn, 53 + turn, 54 + turn]
    return prompts, hits


def _positions(rec):
    """(segment, first effective position, length) of each of the record's spans."""
    out, pos = [], 0
    for s in rec.spans:
        out.append((s.seg_id, pos, s.length))
        pos += s.length
    return out


@pytest.mark.parametrize("kind", ["mistral-window", "gemma3-scaled", "gpt_oss"])
def test_history_past_every_window_keeps_only_the_full_layers(kind, tiny_dirs, monkeypatch):
    path, _ = tiny_dirs[kind]
    llm, whole, ref = _engine(path), _engine(path, windowed_history="keep"), _reference(path)
    _, hits = _converse([llm, whole], ref, monkeypatch)
    assert hits[0] == hits[1] and all(h > 0 for h in hits[0][1:])  # a follow-up reuses all it did
    store, spec = llm.engine.store.store, llm.engine.spec
    full = tuple(i for i in range(spec.num_layers) if i not in spec.window_layers)
    rec = store.records["s"]
    spans = _positions(rec)
    newest = spans[-1][1]
    for i, (seg, pos, length) in enumerate(spans):
        past = i > 0 and pos + length <= newest - (spec.sliding_window + PAGE)
        assert store.host.get(seg).layers == (full if past else None), (i, pos, length, newest)
    dropped = store.stats.windowed_bytes_dropped
    assert dropped > 0
    assert store.host.used_bytes() == whole.engine.store.store.host.used_bytes() - dropped
    store.check_integrity()


def test_regenerating_or_editing_the_last_message_reuses_as_before(tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["gemma3-scaled"]
    llm, whole, ref = _engine(path), _engine(path, windowed_history="keep"), _reference(path)
    prompts, _ = _converse([llm, whole], ref, monkeypatch)
    last = prompts[-1]
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)  # an answer longer than the window
    for engine in (ref, llm, whole):
        _turn(engine, last, monkeypatch, None if engine is ref else "s", params=long)
    edited = last[:-2] + [99]
    for prompt in (last, edited):  # the last answer regenerated; its question edited
        want = _turn(ref, prompt, monkeypatch, params=long)
        got, got_whole = (_turn(e, prompt, monkeypatch, "s", params=long) for e in (llm, whole))
        _same(got, want)
        _same(got_whole, want)
        assert got[0].metrics.cached_tokens["host"] == got_whole[0].metrics.cached_tokens["host"] > len(prompts[-2])
    llm.engine.store.check_integrity()


def test_an_edit_reaching_a_segment_without_its_windowed_layers_resumes_before_it(tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["gemma3-scaled"]
    llm, whole, ref = _engine(path), _engine(path, windowed_history="keep"), _reference(path)
    prompts, _ = _converse([llm, whole], ref, monkeypatch)
    store = llm.engine.store.store
    slim = [(seg, pos, n) for seg, pos, n in _positions(store.records["s"]) if store.windowless(seg)]
    seg, pos, n = slim[0]
    at = pos + n // 2  # a token inside the first segment without them
    edited = prompts[-1][:at] + [98, 97, 96]
    want = _turn(ref, edited, monkeypatch)
    got, got_whole = _turn(llm, edited, monkeypatch, "s"), _turn(whole, edited, monkeypatch, "s")
    _same(got, want)
    _same(got_whole, want)
    assert got_whole[0].metrics.cached_tokens["host"] == at
    # its first new token's window would read that segment's windowed layers: resume where it starts
    assert got[0].metrics.cached_tokens["host"] == pos
    store.check_integrity()


def test_segments_without_windowed_layers_are_written_and_served_after_a_restart(tiny_dirs, tmp_path, monkeypatch):
    """Without write-through, a host copy without its windowed layers is what demotion writes: its
    file holds the full layers alone, and a new engine on the folder knows it."""
    path, _ = tiny_dirs["gemma3-scaled"]
    opts = dict(store_dir=str(tmp_path / "kv"), write_through=False)  # ("drop": written without a file)
    llm, ref = _engine(path, **opts), _reference(path)
    prompts, _ = _converse([llm], ref, monkeypatch, flush=False)  # (a flush writes host-only segments)
    llm.engine.store.store.wait_saved(llm.engine.store.store.records["s"].spans[-1].seg_id)
    slim = sorted(s for s in llm.engine.store.store.host.segment_ids() if llm.engine.store.store.windowless(s))
    assert slim
    llm.engine.store.close()  # writes every host segment to disk
    del llm

    again = _engine(path, **opts)
    store = again.engine.store.store
    assert sorted(s for s in store.disk.segment_ids() if not store.disk.holds_every_layer(s)) == slim
    assert all(store.windowless(s) for s in slim)
    store.check_integrity()
    follow_up = prompts[-1] + [60, 61, 62]
    got, want = _turn(again, follow_up, monkeypatch, "s"), _turn(ref, follow_up, monkeypatch)
    _same(got, want)
    assert got[0].metrics.cached_tokens["disk"] >= len(prompts[-2])
    edited = prompts[-1][: len(prompts[1]) + 2] + [98, 97]  # reaches back into one without them
    got, want = _turn(again, edited, monkeypatch, "s"), _turn(ref, edited, monkeypatch)
    _same(got, want)
    store.check_integrity()


@pytest.mark.parametrize("kind", ["gemma3-scaled", "gpt_oss"])
def test_with_a_disk_tier_an_edit_further_back_reads_the_windowed_layers_from_the_files(kind, tiny_dirs, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """The default: host drops them once the file (written through) holds every layer. A fork or an
    edit two turns back reuses as much as with every layer kept, its windowed layers read from there."""
    path, _ = tiny_dirs[kind]
    llm = _engine(path, windowed_history="disk", store_dir=str(tmp_path / "kv"))
    whole, ref = _engine(path, windowed_history="keep"), _reference(path)
    prompts, hits = _converse([llm, whole], ref, monkeypatch)
    assert hits[0] == hits[1]
    store = llm.engine.store.store
    slim = [(seg, pos, n) for seg, pos, n in _positions(store.records["s"]) if store.windowless(seg)]
    assert slim and all(store.host.get(seg).layers is not None and store.disk.holds_every_layer(seg) for seg, _, _ in slim)
    assert store.host.used_bytes() == whole.engine.store.store.host.used_bytes() - store.stats.windowed_bytes_dropped
    seg, pos, n = slim[-1]
    edited = prompts[-1][: pos + n // 2] + [98, 97, 96]  # inside the last segment without them in host
    before = llm.stats()["bytes_loaded"]["disk"]
    want = _turn(ref, edited, monkeypatch)
    got, got_whole = _turn(llm, edited, monkeypatch, "s"), _turn(whole, edited, monkeypatch, "s")
    _same(got, want)
    _same(got_whole, want)
    assert got_whole[0].metrics.cached_tokens["host"] == pos + n // 2
    # as much reused; the tokens whose windowed layers came from a file count as disk hits
    cached = got[0].metrics.cached_tokens
    assert cached["host"] + cached["disk"] == pos + n // 2
    window_from = (pos + n // 2 - 8 + 1) // PAGE * PAGE  # (the page of the oldest key the first new token sees)
    assert cached["disk"] == pos + n // 2 - window_from
    assert llm.stats()["bytes_loaded"]["disk"] > before  # (the windowed layers it lacks in host)
    store.check_integrity()
    # a copy brought back from its file by a prefetch holds only the full layers too, read alone
    store.host.evict(seg)
    store.ledger.drop_host(seg)
    read = []
    real_read = SegmentReader.read_tokens
    monkeypatch.setattr(SegmentReader, "read_tokens", lambda self, layer, *a, **k: read.append(layer) or real_read(self, layer, *a, **k))
    store._fetch(seg)
    monkeypatch.undo()
    full = tuple(layer for layer in range(store.layout.num_layers) if layer not in store.windowed)
    assert store.host.get(seg).layers == tuple(read) == full
    assert store.disk.holds_every_layer(seg)  # (the file is still taken as whole)
    store.check_integrity()


def test_an_unreadable_file_costs_a_segment_its_file_not_its_host_copy(tiny_dirs, tmp_path, monkeypatch):
    """A load that reads the windowed layers a host copy lacks from the file, and finds it damaged
    (or gone): the turn recomputes, the file goes, and the host copy stays for the turns that need
    only its full layers. (Found by a review: the whole segment was dropped, cutting the records.)"""
    path, _ = tiny_dirs["gemma3-scaled"]
    llm, ref = _engine(path, windowed_history="disk", store_dir=str(tmp_path / "kv")), _reference(path)
    prompts, _ = _converse([llm], ref, monkeypatch)
    store = llm.engine.store.store
    seg, pos, n = [(s, p, k) for s, p, k in _positions(store.records["s"]) if store.windowless(s)][-1]
    with store.disk.open(seg) as reader:
        at = reader.body  # layer 0's first K bytes: a windowed layer's
    damaged = bytearray(store.disk.path(seg).read_bytes())
    damaged[at : at + 8] = bytes(b ^ 0xFF for b in damaged[at : at + 8])
    store.disk.path(seg).write_bytes(damaged)
    edited = prompts[-1][: pos + n // 2] + [98, 97, 96]
    # (its tokens: the failed load's step is sampled, then thrown away and the turn recomputed)
    assert _turn(llm, edited, monkeypatch, "s")[0].token_ids == _turn(ref, edited, monkeypatch)[0].token_ids
    # (the flush after the turn wrote the host copy back: without the windowed layers, as it is)
    assert store.stats.corrupt_segments == 1 and store.host.contains(seg) and not store.windowed_held(seg)
    follow_up = prompts[-1] + [60, 61, 62]  # the conversation before the edit, going on: full layers only
    got = _turn(llm, follow_up, monkeypatch, "s")
    _same(got, _turn(ref, follow_up, monkeypatch))
    assert got[0].metrics.cached_tokens["host"] >= len(prompts[-1]) - 1
    store.check_integrity()


def test_a_file_without_them_that_the_index_does_not_name_is_found_out(tiny_dirs, tmp_path, monkeypatch):
    """The index lost its held_layers rows (a damaged index): a prefetch brings such a file's copy
    into host, which marks it, and a turn that would read its windowed layers resumes before it.
    (Found by fuzzing: the copy went unmarked, the load failed, and the turn retried for ever.)"""
    import sqlite3

    path, _ = tiny_dirs["gemma3-scaled"]
    opts = dict(store_dir=str(tmp_path / "kv"), write_through=False)
    llm, ref = _engine(path, **opts), _reference(path)
    prompts, _ = _converse([llm], ref, monkeypatch, flush=False)
    llm.engine.store.close()  # (its slim host copies written as files without them)
    db = sqlite3.connect(str(tmp_path / "kv" / "index.db"))
    assert db.execute("DELETE FROM held_layers").rowcount > 0
    db.commit()
    db.close()
    again = _engine(path, **opts)
    store = again.engine.store.store
    slim = [seg for seg in store.disk.segment_ids() if store.disk.get(seg).layers is not None]
    assert slim and not any(store.windowless(seg) for seg in slim)  # (the index says they are whole)
    for seg in slim:
        store._fetch(seg)
    assert all(store.windowless(seg) for seg in slim)
    store.check_integrity()
    for prompt in (prompts[-1] + [60, 61, 62], prompts[2][:-2] + [98, 97]):  # a follow-up; an edit further back
        _same(_turn(again, prompt, monkeypatch, "s"), _turn(ref, prompt, monkeypatch))
    store.check_integrity()


def test_an_unreadable_file_behind_a_host_copy_without_them_marks_it(tiny_dirs, tmp_path):
    """(So a retry stops before the segment instead of reading the missing layers again.)"""
    path, _ = tiny_dirs["gemma3-scaled"]
    llm = _engine(path, windowed_history="disk", store_dir=str(tmp_path / "kv"))
    llm.generate([list(range(5, 45))], PARAMS, session_id="s")
    store = llm.engine.store.store
    store.flush()
    seg = store.records["s"].spans[0].seg_id
    store.drop_corrupt(seg, "a test", file_only=True)
    assert store.host.contains(seg) and not store.disk.contains(seg) and store.windowless(seg)


LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def _segment(tokens=200):
    gen = torch.Generator().manual_seed(0)
    shape = (LAYOUT.num_layers, tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return SegmentKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))


def test_a_segment_without_some_layers_round_trips_through_its_bytes_and_files(tmp_path):
    kv = _segment()
    slim = kv.without({0, 2})
    assert slim.layers == (1, 3) and slim.nbytes == kv.nbytes // 2
    assert torch.equal(slim.layer(3)[0], kv.k[3]) and slim.layer(2) is None
    back = segment_format.decode_bytes(segment_format.encode_bytes("s1", slim, "fp", LAYOUT), "s1", "fp", LAYOUT, "s1")
    assert back.layers == (1, 3) and torch.equal(back.k, slim.k) and torch.equal(back.v, slim.v)
    whole = segment_format.decode_bytes(segment_format.encode_bytes("s2", kv, "fp", LAYOUT), "s2", "fp", LAYOUT, "s2")
    assert whole.layers is None and torch.equal(whole.k, kv.k)

    disk = DiskTier(str(tmp_path / "kv"), 1 << 30, "fp", LAYOUT)
    disk.put("s1", slim)
    disk.put("s2", kv)
    assert disk.size("s1") == segment_format.encoded_size("s1", slim, "fp", LAYOUT) < disk.size("s2")
    got = disk.get("s1")
    assert got.layers == (1, 3) and torch.equal(got.k, slim.k) and torch.equal(got.v, slim.v)
    with disk.open("s1") as reader:
        k, v = reader.read_tokens(3, 150, 200)
        assert torch.equal(k, kv.k[3, 150:]) and torch.equal(v, kv.v[3, 150:])
        with pytest.raises(CorruptSegment, match="layer 2 is not held"):
            reader.read_tokens(2, 150, 200)
    none = kv.without(range(4))  # (a model whose every layer has a window)
    disk.put("s3", none)
    for back in (disk.get("s3"), segment_format.decode_bytes(segment_format.encode_bytes("s3", none, "fp", LAYOUT),
                                                              "s3", "fp", LAYOUT, "s3")):  # fmt: skip
        assert back.layers == () and back.num_tokens == 200 and back.nbytes == 0
    disk.check_integrity()
    disk.close()
    disk = DiskTier(str(tmp_path / "kv"), 1 << 30, "fp", LAYOUT)  # a restart reads which it is
    assert not disk.holds_every_layer("s1") and disk.holds_every_layer("s2")
    disk.remove("s1")
    disk.close()
    disk = DiskTier(str(tmp_path / "kv"), 1 << 30, "fp", LAYOUT)
    assert disk._db.execute("SELECT seg_id, layers FROM held_layers").fetchall() == [("s3", "[]")]
    assert not disk.holds_every_layer("s3")
    disk.close()


@pytest.mark.parametrize("layers", [[1, 1], [3, 1], [0, 7], ["1"], "all"])
def test_a_header_naming_impossible_layers_is_refused(layers):
    blob = bytearray(segment_format.encode_bytes("s1", _segment(4).without({0, 2}), "fp", LAYOUT))
    text = b'"layers": [1, 3]'
    at = blob.index(text)
    new = f'"layers": {layers!r}'.replace("'", '"').encode()
    blob[at : at + len(text)] = new.ljust(len(text))  # (the header is padded: room to spare)
    with pytest.raises(CorruptSegment, match="bad layer list"):
        segment_format.decode_bytes(bytes(blob), "s1", "fp", LAYOUT, "s1")
