"""The page allocator keeps growing sequences in consecutive slots; attention reads them as slices."""

import random

import pytest
import torch

import cachedattention.kvcache.kv_pool as kv_pool_mod
from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.kvcache.page_pool import PagePool
from tests.tiny_models import hf_greedy
from tests.util import capture_logits, rel_err


def test_allocate_after_takes_the_next_free_pages_first():
    pool = PagePool(10)
    a = pool.allocate(3)
    b = pool.allocate(2)  # pages 3, 4: the sequence `a` cannot grow in place any more
    assert a == [0, 1, 2] and b == [3, 4]
    pool.free(b)
    assert pool.allocate(2, after=a[-1]) == [3, 4]  # taken out of the middle of the free stack
    pool.check_integrity()
    c = pool.allocate(3, after=9)  # nothing after the last page: the free stack's order
    assert c == [5, 6, 7]
    d = pool.allocate(2, after=7)  # 8, 9 follow; then nothing is left
    assert d == [8, 9] and pool.num_available() == 0 and pool.allocate(1) is None
    pool.check_integrity()


def test_allocate_after_mixes_consecutive_and_stack_pages():
    pool = PagePool(8)
    a = pool.allocate(8)
    pool.free([a[2], a[3], a[6]])
    got = pool.allocate(3, after=1)  # 2, 3 follow page 1; the third comes from the stack
    assert got == [2, 3, 6]
    pool.check_integrity()
    assert pool.num_available() == 0


def test_allocator_random_operations_keep_integrity():
    """Stale stack entries (pages taken by `after`, then freed again) never hand a page out twice."""
    rng = random.Random(0)
    pool = PagePool(40)
    held: list[list[int]] = []
    for _ in range(3000):
        if held and (rng.random() < 0.45 or pool.num_available() == 0):
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            after = held[rng.randrange(len(held))][-1] if held and rng.random() < 0.7 else None
            got = pool.allocate(rng.randint(1, 4), after=after)
            if got is not None:
                held.append(got)
        owned = [p for pages in held for p in pages]
        assert len(owned) == len(set(owned))
        assert pool.num_available() == 40 - len(owned)
        pool.check_integrity()
    assert len(pool._free) <= 2 * pool.num_pages + 1  # stale entries are compacted


def test_read_is_a_slice_when_consecutive_and_equals_the_gather(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))
    pool = llm.engine.pool
    for layer in range(len(pool.k)):
        pool.k[layer].normal_()
        pool.v[layer].normal_()
    ps, length = pool.page_size, 2 * pool.page_size + 5

    def token_gather(pages):
        slots = (pages[:, None] * ps + torch.arange(ps)).view(-1)[:length]
        return pool.gather(1, slots)

    consecutive = torch.tensor([5, 6, 7])
    k, v = pool.read(1, consecutive, length, first_slot=5 * ps)
    assert k.data_ptr() == pool.k[1][5 * ps].data_ptr()  # a view: no copy
    gk, gv = token_gather(consecutive)
    assert torch.equal(k, gk) and torch.equal(v, gv)
    scattered = torch.tensor([9, 2, 30])
    k, v = pool.read(1, scattered, length, None)
    gk, gv = token_gather(scattered)
    assert k.shape == gk.shape and torch.equal(k, gk) and torch.equal(v, gv)
    for start in (1, ps, ps + 3):  # from a later token: the same tokens, from the page holding it on
        for pages, first in ((consecutive, 5 * ps), (scattered, None)):
            k, v = pool.read(1, pages, length, first, start)
            gk, gv = token_gather(pages)
            assert torch.equal(k, gk[start:]) and torch.equal(v, gv[start:])


def test_partial_pages_are_never_matched_where_a_window_reaches_them():
    pool = PagePool(8)
    pages = pool.allocate(4)
    blocks = [[i] * 4 for i in range(4)]
    for page, h, block in zip(pages, range(100, 104), blocks):
        pool.register(page, h, block)
    pool.mark_partial(pages[:2])  # their windowed layers were left unwritten by a load
    pool.free(pages)
    hashes = list(range(100, 104))
    got = pool.match_prefix(hashes, blocks, window_pages=2)  # the window reaches pages 2 and 3 only
    assert got == pages
    pool.free(got)
    assert pool.match_prefix(hashes, blocks, window_pages=3) == []  # page 1 in every cut's reach
    assert pool.match_prefix(hashes[:2], blocks[:2], window_pages=1) == []
    got = pool.match_prefix(hashes[:3], blocks[:3], window_pages=1)
    assert got == pages[:3]
    pool.free(got)
    got = pool.match_prefix(hashes[:2], blocks[:2])  # a model without windows reads them all
    assert got == pages[:2]
    pool.free(got)
    assert pool.match_prefix(hashes, blocks, owner="x") == []  # another session's turn could not be saved from it
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="not in use"):
        pool.mark_partial([pages[0]])  # cached, not in use
    (whole,) = pool.allocate(1)  # block 0 computed again, all layers written: it replaces the partial copy
    pool.register(whole, 100, blocks[0], owner="x")
    pool.free([whole])
    assert pool.match_prefix(hashes, blocks, owner="y") == [whole]  # (block 1 is still partial)
    pool.free([whole])
    assert not pool.is_partial(pages[0]) and pool.num_available() == 8  # the partial copy went back to the free list
    pool.check_integrity()
    pool.clear_cache()
    again = pool.allocate(8)  # written anew by their next owner: no longer partial
    assert not any(pool.is_partial(p) for p in again)
    pool.check_integrity()


def test_private_pages_serve_their_session_alone_and_an_exact_copy_replaces_them():
    pool = PagePool(8)
    pages = pool.allocate(2)
    blocks, hashes = [[1] * 4, [2] * 4], [200, 201]
    pool.register(pages[0], 200, blocks[0], owner="s")
    pool.register(pages[1], 201, blocks[1], owner="s", private=True)  # KV computed before a cut of its history
    pool.free(pages)
    for other in (None, "t"):  # a request without a session, another session: the exact part only
        got = pool.match_prefix(hashes, blocks, owner=other)
        assert got == pages[:1]
        pool.free(got)
    got = pool.match_prefix(hashes, blocks, owner="s", private=True)  # its own session's next turn: both
    assert got == pages
    pool.free(got)
    got = pool.match_prefix(hashes, blocks, owner="s")  # a turn of it that the store plans as exact (its
    assert got == pages[:1]  # client cut the history itself): it computes the rest, not reading the cut's KV
    pool.free(got)
    pool.check_integrity()
    (exact,) = pool.allocate(1)  # block 1 computed again over the tokens alone: it serves everyone from now on
    pool.register(exact, 201, blocks[1], owner=None)
    pool.free([exact])
    got = pool.match_prefix(hashes, blocks, owner="t")
    assert got == [pages[0], exact]
    pool.free(got)
    (late,) = pool.allocate(1)  # a private copy never replaces an exact one
    pool.register(late, 201, blocks[1], owner="s", private=True)
    pool.free([late])
    assert pool.match_prefix(hashes, blocks, owner="s", private=True) == [pages[0], exact]
    pool.check_integrity()


@pytest.mark.parametrize("fragment", [False, True])
def test_scattered_and_consecutive_pages_give_the_same_logits(fragment, tiny_dirs, monkeypatch):
    """The slice path (consecutive pages) and the gather path (pages scattered by other holders) both
    match transformers, and each path is the one actually taken."""
    path, hf = tiny_dirs["llama"]
    llm = LLM(model=str(path), cache=CacheConfig(page_size=4, num_pages=64, enable_prefix_cache=False), max_model_len=256)
    llm.engine.runner.decode_kernel = None  # the torch path reads the pool (the kernel has its own tests)
    pages = llm.engine.pages
    if fragment:  # hold every other page, so no run of free pages is longer than one
        pages.allocate(64)
        pages.free(list(range(0, 64, 2)))
    firsts: list = []
    real = kv_pool_mod.KVPool.read

    def spy(self, layer, pages, length, first_slot, start=0):
        firsts.append(first_slot)
        return real(self, layer, pages, length, first_slot, start)

    monkeypatch.setattr(kv_pool_mod.KVPool, "read", spy)
    seen = capture_logits(monkeypatch)
    prompt = [(5 * i + 1) % 250 for i in range(21)]
    out = llm.generate([prompt], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, prompt, 9)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, f"step {step}"
    assert firsts  # decode steps read the cached context
    if fragment:
        assert all(f is None for f in firsts)
    else:
        assert all(f is not None for f in firsts)  # the decode steps grew in place


def test_cpu_pool_memory_is_zeroed_aligned_and_outlives_its_base():
    """On a Linux CPU the pool lives in memory advised for transparent huge pages: zeroed, 2 MiB
    aligned, and a view of it stays valid after the tensor it came from is gone."""
    import gc
    import mmap

    t, lazy = kv_pool_mod._zeros((4096, 3, 64), torch.device("cpu"), torch.float32)
    assert lazy or not hasattr(mmap, "MADV_HUGEPAGE")  # lazy unless the kernel has no huge pages at all
    assert t.shape == (4096, 3, 64) and t.is_contiguous() and torch.all(t == 0)
    if lazy:
        assert t.data_ptr() % (2 << 20) == 0
    view = t[100:200]
    del t
    gc.collect()
    view.fill_(2.0)
    assert float(view.sum()) == 2.0 * 100 * 3 * 64
