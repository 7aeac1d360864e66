"""A store load fills a sliding-window layer only from the page holding the oldest key the turn's
first new token sees there: the older keys are never read by any query of that request. The pages
left without them are partial; the device prefix cache never serves them to a query that would read
them, and a turn is never saved from them."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from tests.util import capture_logits, rel_err

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PAGE = 4


def _reference(path):
    return LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))


def _greedy_and_logits(llm, prompt, monkeypatch, session=None):
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], PARAMS, session_id=session)[0]
    monkeypatch.undo()
    return out, seen[0]


def _stored_then_garbled(path, prompt):
    """An engine that served `prompt` as session "a"'s first turn, stored it in host, then lost its
    device pages and had every slot of its pool filled with large random values: a read of a slot
    that no load or forward wrote for a request shows in its tokens."""
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(page_size=PAGE))
    out = llm.generate([prompt], PARAMS, session_id="a")[0]
    llm.engine.store.store.flush()
    llm.engine.pages.clear_cache()
    gen = torch.Generator().manual_seed(0)
    for t in (*llm.engine.pool.k, *llm.engine.pool.v):
        t.copy_(torch.randn(t.shape, generator=gen) * 50)
    return llm, out


@pytest.mark.parametrize("kind", ["gemma3-scaled", "mistral-window", "gpt_oss"])
def test_windowed_layers_load_only_what_the_first_new_token_sees(kind, tiny_dirs, monkeypatch):
    path, _ = tiny_dirs[kind]
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(page_size=PAGE, enable_prefix_cache=False))
    ref = _reference(path)
    spec, layout = llm.engine.spec, llm.engine.store.layout
    window, windowed = spec.sliding_window, len(spec.window_layers)
    token_bytes = 2 * layout.num_kv_heads * layout.head_dim * layout.dtype.itemsize  # K and V of one layer
    conv, skipped = list(range(5, 45)), 0
    for turn in range(4):
        before = llm.stats()["bytes_loaded"]["host"]
        got, got_logits = _greedy_and_logits(llm, conv, monkeypatch, "s")
        want, want_logits = _greedy_and_logits(ref, conv, monkeypatch)
        assert got.token_ids == want.token_ids
        assert rel_err(got_logits, want_logits) <= 1e-4
        hit = got.metrics.cached_tokens["host"]
        assert (hit > 0) == (turn > 0)
        window_from = max(0, (hit - window + 1) // PAGE * PAGE)
        loaded = (spec.num_layers - windowed) * hit + windowed * (hit - window_from)
        assert llm.stats()["bytes_loaded"]["host"] - before == loaded * token_bytes
        skipped += windowed * window_from
        llm.engine.store.store.flush()
        conv = conv + got.token_ids + [10 + turn, 11 + turn, 12 + turn]
    assert skipped > 0  # the conversation outgrew the window: the loads left keys out
    llm.engine.pages.check_integrity()


@pytest.mark.parametrize("kind", ["gemma3-scaled", "mistral-window"])
@pytest.mark.parametrize("paged_kernel", [True, False])
def test_the_device_prefix_cache_never_serves_a_query_keys_a_load_left_out(kind, paged_kernel, tiny_dirs,
                                                                           monkeypatch):  # fmt: skip
    """A long conversation's second turn is loaded from host into a pool of garbage: its old pages
    keep garbage in their windowed layers. It decodes beside another request (through the paged
    kernel, or gathered in a padded group). Another request sharing the start of its history must
    not match those pages as far as its own first token's window would read them."""
    path, _ = tiny_dirs[kind]
    first = list(range(5, 61))
    llm, out1 = _stored_then_garbled(path, first)
    if not paged_kernel:
        llm.engine.runner.decode_kernel = llm.engine.runner.fused_decode = None
    ref = _reference(path)
    second, beside = first + out1.token_ids + [7, 8, 9], list(range(100, 130))
    got = llm.generate([second, beside], PARAMS, session_id=["a", "c"])
    want = ref.generate([second, beside], PARAMS)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[0].metrics.cached_tokens["host"] >= 56
    pages = llm.engine.pages
    assert any(pages.is_partial(p) for p in range(pages.num_pages))  # the old pages' windowed layers: garbage

    # the first 28 tokens' pages are cached and partial; this prompt's first new token would read them
    other = first[:28] + [200, 201, 202, 203, 204]
    got, got_logits = _greedy_and_logits(llm, other, monkeypatch, "b")
    want, want_logits = _greedy_and_logits(ref, other, monkeypatch)
    assert got.token_ids == want.token_ids and rel_err(got_logits, want_logits) <= 1e-4
    assert got.metrics.cached_tokens["device"] < 28  # the match was cut before the partial pages
    pages.check_integrity()
    llm.engine.store.check_integrity()


def _second_turn_in_garbage(path):
    """Session "a": its first turn stored, its second loaded from host into a garbled pool (its old
    pages partial, cached with their garbage in the windowed layers); returns the engine and the
    conversation so far."""
    first = list(range(5, 61))
    llm, out1 = _stored_then_garbled(path, first)
    second = first + out1.token_ids + [7, 8, 9]
    out2 = llm.generate([second], PARAMS, session_id="a")[0]
    llm.engine.store.store.flush()
    return llm, second + out2.token_ids + [20, 21, 22]


def _edited_turn_equals_recompute(llm, ref, session, prompt, monkeypatch):
    llm.engine.pages.clear_cache()
    got, got_logits = _greedy_and_logits(llm, prompt, monkeypatch, session)
    want, want_logits = _greedy_and_logits(ref, prompt, monkeypatch)
    assert got.token_ids == want.token_ids and rel_err(got_logits, want_logits) <= 1e-4
    llm.engine.store.check_integrity()
    llm.engine.pages.check_integrity()
    return got


def test_another_session_never_reuses_partial_pages(tiny_dirs, monkeypatch):
    """A new session starting with session a's conversation stops its device match at a's partial
    pages (its turn could not be saved from them): it computes the rest, all layers, and is saved;
    a later turn of it that edits its start loads that from host."""
    path, _ = tiny_dirs["gemma3-scaled"]
    llm, conv = _second_turn_in_garbage(path)
    ref = _reference(path)
    got = llm.generate([conv], PARAMS, session_id="d")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    assert got.metrics.cached_tokens["device"] == 0  # a's pages are partial from its first one
    llm.engine.store.store.flush()
    edited = conv[:30] + [40, 41, 42, 43]  # its first new token's window reaches back into a's garbage
    assert _edited_turn_equals_recompute(llm, ref, "d", edited, monkeypatch).metrics.cached_tokens["host"] == 30


def test_a_turn_is_never_saved_from_partial_pages(tiny_dirs, monkeypatch):
    """Session a's stored segments are gone while its partial pages are still cached: its next turn
    reuses them from the device, but cannot be captured from them, so it is not saved, and a later
    turn that edits its start recomputes rather than load garbage."""
    path, _ = tiny_dirs["gemma3-scaled"]
    llm, conv = _second_turn_in_garbage(path)
    ref = _reference(path)
    store = llm.engine.store.store
    for span in store.records["a"].spans:
        store.drop_corrupt(span.seg_id, "test: lost")
    got = llm.generate([conv], PARAMS, session_id="a")[0]
    assert got.token_ids == ref.generate([conv], PARAMS)[0].token_ids
    assert got.metrics.cached_tokens["device"] > 40
    store.flush()
    edited = conv[:30] + [40, 41, 42, 43]
    assert _edited_turn_equals_recompute(llm, ref, "a", edited, monkeypatch).metrics.num_cached_tokens == 0


def test_a_cold_disk_load_reads_windowed_layers_only_from_the_window(tiny_dirs, tmp_path, monkeypatch):
    """From disk too, a windowed layer is read only from the chunk holding the window's first key
    (checksums cover chunks of tokens, here 4): a turn over a one-segment history reads at most a
    chunk's tail more than it loads in each layer, where whole layers would be most of the file."""
    from cachedattention.store import segment_format
    from tests.store.test_disk_read import _file_reads

    monkeypatch.setattr(segment_format, "CHUNK_TOKENS", 4)
    path, _ = tiny_dirs["gemma3-scaled"]
    llm = LLM(model=str(path), enable_store=True, store_dir=str(tmp_path / "store"), host_bytes=0,
              cache=CacheConfig(page_size=PAGE, enable_prefix_cache=False))  # fmt: skip
    ref = _reference(path)
    spec, layout = llm.engine.spec, llm.engine.store.layout
    first = llm.generate([list(range(5, 65))], PARAMS, session_id="s")[0]
    llm.engine.store.store.flush()
    conv = list(range(5, 65)) + first.token_ids + [70, 71, 72]
    reads = _file_reads(monkeypatch)
    got, got_logits = _greedy_and_logits(llm, conv, monkeypatch, "s")
    want, want_logits = _greedy_and_logits(ref, conv, monkeypatch)
    assert got.token_ids == want.token_ids and rel_err(got_logits, want_logits) <= 1e-4
    hit = got.metrics.cached_tokens["disk"]
    assert hit >= 60 and spec.window_layers
    loaded = llm.stats()["bytes_loaded"]["disk"]
    token_bytes = 2 * layout.token_bytes()  # K and V of one layer
    assert loaded < spec.num_layers * hit * token_bytes  # the windowed layers loaded less
    assert loaded <= sum(reads) <= loaded + spec.num_layers * 2 * 3 * token_bytes  # at most 3 more tokens at each end
