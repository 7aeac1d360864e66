"""The paged decode kernel equals torch's attention over each sequence's gathered context."""

import math

import pytest
import torch
from torch.nn import functional as F

from cachedattention.kernels import build
from cachedattention.kernels.paged_decode import CHUNK_TOKENS, PagedDecodeKernel


@pytest.fixture(scope="module")
def kernel() -> PagedDecodeKernel:
    loaded = PagedDecodeKernel.load()
    assert loaded is not None, "this machine has a C compiler: the kernel must build"
    return loaded


def reference(q, k_pool, v_pool, pages, length, page_size, start=0):
    """One token's attention over tokens [start, length) of these pages, gathered by torch."""
    slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[start:length]
    ks, vs = k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1)  # [kv_heads, L, d]
    group = q.shape[0] // ks.shape[0]
    ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(q[:, None], ks, vs)[:, 0]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, page_size",
    [(9, 3, 64, 16), (4, 4, 128, 16), (8, 2, 32, 4), (6, 1, 48, 7)],  # GQA, MHA, MQA; d 64/128 and others
)
def test_matches_torch_over_scattered_pages(kernel, heads, kv_heads, head_dim, page_size):
    gen = torch.Generator().manual_seed(heads * head_dim + page_size)
    num_pages = 900
    k_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    # one token; a page's worth plus one; exactly one work item; several work items
    lengths = [1, page_size + 1, 37, CHUNK_TOKENS, 2 * CHUNK_TOKENS + 3, page_size * 5]
    order = torch.randperm(num_pages, generator=gen)  # pages scattered over the pool
    tables, used = [], 0
    for n in lengths:
        count = math.ceil(n / page_size) + 1  # the table may hold more pages than the context uses
        tables.append(order[used : used + count])
        used += count
    rows = torch.tensor([2 * i + 1 for i in range(len(lengths))])  # their tokens sit between others
    q = 3 * torch.randn(2 * len(lengths) + 1, heads, head_dim, generator=gen)  # peaked softmax too
    out = torch.full_like(q, 7.0)
    page_start = torch.tensor([0] + [len(t) for t in tables]).cumsum(0)
    kernel(q, out, rows, k_pool, v_pool, torch.cat(tables), page_start, torch.tensor(lengths), page_size)
    for s, n in enumerate(lengths):
        ref = reference(q[rows[s]], k_pool, v_pool, tables[s], n, page_size)
        assert (out[rows[s]] - ref).abs().max() <= 1e-5 * ref.abs().max(), f"sequence {s} ({n} tokens)"
    others = [r for r in range(q.shape[0]) if r not in rows.tolist()]
    assert torch.all(out[others] == 7.0)  # rows of other tokens are left alone


NARROW = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("storage", NARROW)
@pytest.mark.parametrize("heads, kv_heads, head_dim, page_size", [(9, 3, 64, 16), (8, 2, 32, 4)])  # AVX-512, generic
def test_narrow_pages_are_widened_as_torch_widens_them(kernel, storage, heads, kv_heads, head_dim, page_size):
    """vLLM's --kv-cache-dtype: pages of bfloat16 or FP8 values (FP8 held as bytes) attended as
    torch attends the same pages widened to float32, subnormal FP8 values and a window included."""
    gen = torch.Generator().manual_seed(head_dim + page_size)
    num_pages = 300
    shape = (num_pages * page_size, kv_heads, head_dim)
    # values near 0 too: FP8's subnormals (below 2^-6 in e4m3, 2^-14 in e5m2)
    k, v = torch.randn(shape, generator=gen) * 2, torch.randn(shape, generator=gen) * 0.01
    k_pool, v_pool = k.to(storage), v.to(storage)
    held = (lambda t: t.view(torch.uint8)) if storage.itemsize == 1 else (lambda t: t)
    lengths = [1, page_size + 3, 2 * CHUNK_TOKENS + 5]
    order = torch.randperm(num_pages, generator=gen)
    tables = [order[0:1], order[1:3], order[3 : 3 + math.ceil(lengths[2] / page_size)]]
    rows = torch.tensor([0, 1, 2])
    q = 3 * torch.randn(3, heads, head_dim, generator=gen)
    page_start = torch.tensor([0] + [len(t) for t in tables]).cumsum(0)
    for starts in (None, torch.tensor([0, 2, CHUNK_TOKENS + 1])):
        out = torch.empty_like(q)
        kernel(q, out, rows, held(k_pool), held(v_pool), torch.cat(tables), page_start, torch.tensor(lengths), page_size,
               starts, storage=storage)  # fmt: skip
        for s, n in enumerate(lengths):
            first = 0 if starts is None else int(starts[s])
            ref = reference(q[s], k_pool.float(), v_pool.float(), tables[s], n, page_size, first)
            assert (out[s] - ref).abs().max() <= 1e-5 * ref.abs().max(), (storage, s, starts)
    with pytest.raises(ValueError, match="pages of"):  # FP8 pages given as FP8, bfloat16 as float32: refused
        kernel(q, out, rows, k, v, torch.cat(tables), page_start, torch.tensor(lengths), page_size, storage=storage)


@pytest.mark.parametrize("heads, kv_heads, head_dim, page_size", [(9, 3, 64, 16), (8, 2, 32, 4)])  # AVX-512, generic
def test_a_window_attends_from_its_first_token(kernel, heads, kv_heads, head_dim, page_size):
    """starts[s]: the first token a sliding window leaves; mid-page, on a page's first token, 0, and the
    last token alone; over contexts of one and of several work items."""
    gen = torch.Generator().manual_seed(7 + head_dim)
    num_pages = 800  # the six tables need 683 pages of 4
    k_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    cases = [(40, 3), (40, 2 * page_size), (37, 0), (37, 36), (2 * CHUNK_TOKENS + 9, CHUNK_TOKENS + 5),
             (3 * CHUNK_TOKENS, 2 * CHUNK_TOKENS - page_size + 1)]  # fmt: skip
    order = torch.randperm(num_pages, generator=gen)
    tables, used = [], 0
    for n, _ in cases:
        tables.append(order[used : used + math.ceil(n / page_size)])
        used += len(tables[-1])
    rows = torch.arange(len(cases))
    q = 3 * torch.randn(len(cases), heads, head_dim, generator=gen)
    out = torch.empty_like(q)
    page_start = torch.tensor([0] + [len(t) for t in tables]).cumsum(0)
    lengths, starts = torch.tensor([n for n, _ in cases]), torch.tensor([w for _, w in cases])
    for table, (_, start) in zip(tables, cases):  # what lies before a window is never read: not even NaN harms
        before = (table[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:start]
        k_pool[before], v_pool[before] = float("nan"), float("nan")
    kernel(q, out, rows, k_pool, v_pool, torch.cat(tables), page_start, lengths, page_size, starts)
    for s, (n, start) in enumerate(cases):
        ref = reference(q[s], k_pool, v_pool, tables[s], n, page_size, start)
        assert (out[s] - ref).abs().max() <= 1e-5 * ref.abs().max(), f"case {s} ({start}..{n})"
    for bad in ((-1,), (5,)):  # before the context, or past its last token
        with pytest.raises(ValueError, match="out of range"):
            kernel(q[:1], out[:1], rows[:1], k_pool, v_pool, tables[0][:1], torch.tensor([0, 1]), torch.tensor([5]),
                   page_size, torch.tensor(bad))  # fmt: skip


@pytest.mark.parametrize("heads, kv_heads, head_dim, page_size", [(9, 3, 64, 16), (4, 2, 256, 16)])  # AVX-512, generic
def test_capped_scores_equal_the_plain_attention_over_capped_scores(kernel, heads, kv_heads, head_dim, page_size):
    """Gemma 2's cap, cap * tanh(s / cap) on each score before the softmax, in a window too, against
    the capped attention of the per-operation path."""
    from cachedattention.model.plain_attention import plain_attention

    gen = torch.Generator().manual_seed(3 + head_dim)
    num_pages = 100
    k_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    cases = [(1, 0), (page_size + 3, 0), (CHUNK_TOKENS + 7, 5), (5 * page_size, 2 * page_size)]
    order = torch.randperm(num_pages, generator=gen)
    tables, used = [], 0
    for n, _ in cases:
        tables.append(order[used : used + math.ceil(n / page_size)])
        used += len(tables[-1])
    q = 4 * torch.randn(len(cases), heads, head_dim, generator=gen)  # scores well past the cap
    page_start = torch.tensor([0] + [len(t) for t in tables]).cumsum(0)
    lengths, starts = torch.tensor([n for n, _ in cases]), torch.tensor([w for _, w in cases])
    for cap in (0.5, 2.0):
        out = torch.empty_like(q)
        kernel(q, out, torch.arange(len(cases)), k_pool, v_pool, torch.cat(tables), page_start, lengths, page_size,
               starts, cap)  # fmt: skip
        for s, (n, start) in enumerate(cases):
            slots = (tables[s][:, None] * page_size + torch.arange(page_size)).reshape(-1)[start:n]
            ks, vs = k_pool[slots].transpose(0, 1)[None], v_pool[slots].transpose(0, 1)[None]
            ref = plain_attention(q[s].view(1, kv_heads, -1, head_dim), ks, vs, cap=cap).reshape(heads, head_dim)
            assert (out[s] - ref).abs().max() <= 1e-5 * ref.abs().max(), f"cap {cap}, case {s}"
            if n > 1:  # the cap bites: uncapped attention is another answer
                assert (out[s] - reference(q[s], k_pool, v_pool, tables[s], n, page_size, start)).abs().max() > 1e-3


def test_refuses_bad_inputs_with_a_clear_error(kernel):
    k_pool = torch.zeros(64, 2, 16)  # 4 pages of 16
    q, out = torch.zeros(2, 4, 16), torch.zeros(2, 4, 16)

    def call(rows=(0,), pages=(0,), page_start=(0, 1), lengths=(5,), q=q, out=out, page_size=16):
        t = torch.tensor
        kernel(q, out, t(rows), k_pool, k_pool, t(pages), t(page_start), t(lengths), page_size)

    call()  # the baseline call is fine
    for bad in (dict(lengths=(20,)), dict(pages=(4,)), dict(rows=(2,)), dict(lengths=(0,)),
                dict(rows=(0, 0), pages=(0, 1), page_start=(0, 1, 2), lengths=(5, 5)),  # two writers, one row
                dict(page_start=(0, 2))):  # past the end of the page table
        with pytest.raises(ValueError, match="out of range"):
            call(**bad)
    with pytest.raises(ValueError, match="float32"):
        call(q=q.double())
    with pytest.raises(ValueError, match="one entry per sequence"):
        call(page_start=(0,))
    with pytest.raises(ValueError, match="unsupported shape"):  # 3 query heads over 2 KV heads
        call(q=torch.zeros(1, 3, 16), out=torch.zeros(1, 3, 16))
    assert not kernel.supports(4, 2, 16, 512) and kernel.supports(4, 2, 16, 16)


def test_an_unsupported_page_size_falls_back_to_torch(tiny_dirs):
    from cachedattention import LLM, CacheConfig, SamplingParams
    from tests.tiny_models import hf_greedy

    path, hf = tiny_dirs["qwen2"]
    llm = LLM(model=str(path), cache=CacheConfig(page_size=512, num_pages=4))
    assert llm.engine.runner.decode_kernel is None  # pages of 512 tokens: more than the kernel takes
    prompts = [[(3 * i + j) % 250 + 1 for i in range(n)] for j, n in enumerate((5, 40))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]


def test_the_library_leaves_the_floating_point_mode_alone(kernel):
    """Linked without -ffast-math's startup code, which would flush denormals to zero."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a denormal
    assert (tiny * 1.0).item() != 0.0


def test_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    stale = tmp_path / "kernels" / "paged_decode-0123456789abcdef.so"  # a build of an older source
    stale.write_bytes(b"old")
    assert build.load_kernel("paged_decode") is not None
    built = list((tmp_path / "kernels").glob("paged_decode-*.so"))
    assert len(built) == 1 and built[0] != stale  # the new build replaced the stale one
    stamp = built[0].stat().st_mtime_ns
    assert build.load_kernel("paged_decode") is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("paged_decode-*.so")] == [stamp]
    assert not list((tmp_path / "kernels").glob(".*"))  # no temporary files left behind


def test_without_a_compiler_the_kernel_is_off_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert PagedDecodeKernel.load() is None
    assert "attention uses torch" in caplog.text


def test_a_build_is_keyed_by_every_file_its_source_includes(tmp_path):
    """decode_layer.c includes paged_decode.c, which includes kv_types.h: a change to the header
    must build decode_layer again, not load the build of the older header."""
    (tmp_path / "outer.c").write_text('#include "middle.c"\nint outer;\n')
    (tmp_path / "middle.c").write_text('#include "inner.h"\n#include "inner.h"\nint middle;\n')
    (tmp_path / "inner.h").write_text("enum { A = 0 };\n")
    before = build._source_with_includes(tmp_path / "outer.c")
    assert before.count(b"enum { A = 0 }") == 1  # each file once
    (tmp_path / "inner.h").write_text("enum { A = 1 };\n")
    assert build._source_with_includes(tmp_path / "outer.c") != before
