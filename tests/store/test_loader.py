"""The loader writes stored pre-RoPE KV into pages, rotated to the tokens' current positions,
whether the request's slots are consecutive (slice writes) or scattered (scatter writes)."""

from __future__ import annotations

import threading

import pytest
import torch

from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.kvcache.page_pool import PagePool
from cachedattention.model.rope import RotaryEmbedding, apply_rotary, rotate_into
from cachedattention.model.spec import spec_from_hf_config
from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.transfer import Loader, LoadJob, Piece

PAGE = 4
CFG = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=128,
)


def _hand_rope(x: torch.Tensor, positions: torch.Tensor, spec) -> torch.Tensor:
    """RoPE written out pair by pair (dims i and i + d/2 rotate together by pos * theta^(-2i/d))."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for t, pos in enumerate(positions.tolist()):
        for i in range(d // 2):
            ang = pos * spec.rope_theta ** (-2 * i / d)
            c, s = torch.tensor(ang, dtype=torch.float64).cos(), torch.tensor(ang, dtype=torch.float64).sin()
            a, b = x[t, :, i].double(), x[t, :, i + d // 2].double()
            out[t, :, i] = (a * c - b * s).float()
            out[t, :, i + d // 2] = (b * c + a * s).float()
    return out


def _load(pages: list[int], background: bool = True) -> tuple[KVPool, torch.Tensor, SegmentKV, torch.Tensor, LoadJob]:
    spec = spec_from_hf_config(CFG)
    pool, loader, _ = _cpu_loader(spec)
    torch.manual_seed(0)
    n = 10
    seg = SegmentKV(torch.randn(2, n, 2, 8), torch.randn(2, n, 2, 8))
    lo, hi = 2, 12  # request tokens 2..11 come from segment tokens 0..9, two pieces
    slots = KVPool.slots_for(pages, PAGE, lo, hi, torch.device("cpu"))
    positions = torch.arange(lo, hi) + 5  # as after a truncation: the tokens sit at new positions
    pieces = [Piece("a", 0, 4, lo, seg), Piece("a", 4, n, lo + 4, seg)]
    job = LoadJob(pieces, slots, positions, lo, spec.num_layers, first_slot=KVPool.contiguous_start(pages, PAGE, lo, hi))
    loader.submit(job, background=background)
    for layer in range(spec.num_layers):
        job.wait(layer)
    loader.close()
    return pool, slots, seg, positions, job


@pytest.mark.parametrize("background", [True, False])
def test_consecutive_and_scattered_slots_hold_rotated_keys(background):
    spec = spec_from_hf_config(CFG)
    for pages, consecutive in (([3, 4, 5, 6], True), ([9, 2, 7, 5], False)):
        pool, slots, seg, positions, job = _load(pages, background)
        assert (job.first_slot is not None) == consecutive
        for layer in range(spec.num_layers):
            k, v = pool.gather(layer, slots)
            torch.testing.assert_close(k, _hand_rope(seg.k[layer], positions, spec), rtol=1e-5, atol=1e-5)
            assert torch.equal(v, seg.v[layer])
        # nothing outside the request's slots was touched
        others = torch.ones(pool.k[0].shape[0], dtype=torch.bool)
        others[slots] = False
        assert all(pool.k[layer][others].abs().sum() == 0 for layer in range(spec.num_layers))


def _cpu_loader(spec) -> tuple[KVPool, Loader, KVLayout]:
    pool = KVPool(spec, num_pages=16, page_size=PAGE, device=torch.device("cpu"), dtype=torch.float32)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32)
    return pool, Loader(pool, RotaryEmbedding(spec, 128, torch.device("cpu"), torch.float32), layout,
                        torch.device("cpu")), layout


def test_cpu_disk_load_opens_at_submit_and_loads_each_layer_on_the_thread_that_waits(tmp_path):
    """On a CPU no other thread touches the job: submit opens the file (the kernel reads it ahead),
    and the forward's thread reads and writes layer l when it waits for it, each layer once."""
    spec = spec_from_hf_config(CFG)
    pool, loader, layout = _cpu_loader(spec)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    seg = SegmentKV(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8))
    disk.put("a", seg)
    slots = KVPool.slots_for([0, 1], PAGE, 0, 8, torch.device("cpu"))
    opened = []
    job = LoadJob([Piece("a", 0, 8, 0, None, open_disk=lambda: opened.append(disk.open("a")) or opened[-1])], slots,
                  torch.arange(8), 0, spec.num_layers, first_slot=0)
    writers = []
    real = loader._write_piece
    loader._write_piece = lambda *a: (writers.append(threading.current_thread()), real(*a))
    loader.submit(job, background=True)
    assert len(opened) == 1 and all(ev.is_set() for ev in job.events)  # open, and nothing to wait for...
    assert job.done.is_set()  # its timing is the forward's own: end_step need not wait for it
    assert pool.k[0].abs().sum() == 0 and pool.v[1].abs().sum() == 0  # ...but nothing read or written yet
    job.wait(0)
    job.wait(0)  # a second wait loads nothing more
    assert torch.equal(pool.v[0][:8], seg.v[0]) and pool.v[1].abs().sum() == 0  # layer 0 only
    job.wait(1)
    loader.close()
    disk.close()
    assert writers == [threading.current_thread()] * spec.num_layers and job.written_s > 0
    assert torch.equal(pool.v[1][:8], seg.v[1]) and job.bytes_read["disk"] > 0
    # both layers were read into one reused buffer: each was in the pages before the next read
    assert all(torch.equal(pool.v[i][:8], seg.v[i]) for i in range(2)) and loader._buffer is not None
    assert opened[0].f.closed  # closed after the last layer


def test_cpu_disk_load_cut_short_fails_the_job_not_the_forward(tmp_path):
    """A file that breaks between submit and the forward: the layer that cannot be read marks the
    job failed (the request recomputes); waiting raises nothing."""
    spec = spec_from_hf_config(CFG)
    pool, loader, layout = _cpu_loader(spec)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    disk.put("a", SegmentKV(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)))
    slots = KVPool.slots_for([0, 1], PAGE, 0, 8, torch.device("cpu"))
    job = LoadJob([Piece("a", 0, 8, 0, None, open_disk=lambda: disk.open("a"))], slots, torch.arange(8), 0,
                  spec.num_layers, first_slot=0)
    loader.submit(job, background=True)
    path = disk.path("a")
    path.write_bytes(path.read_bytes()[:-8])  # the last layer is cut
    for layer in range(spec.num_layers):
        job.wait(layer)
    job.wait_all()
    loader.close()
    disk.close()
    assert job.failed is not None and job.failed[0] == "a" and "layer 1" in job.failed[1]


def test_cpu_host_load_is_written_at_submit():
    """Nothing to read from host memory: the job is in the pages before submit returns."""
    spec = spec_from_hf_config(CFG)
    pool, loader, _ = _cpu_loader(spec)
    seg = SegmentKV(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8))
    slots = KVPool.slots_for([0, 1], PAGE, 0, 8, torch.device("cpu"))
    job = LoadJob([Piece("a", 0, 8, 0, seg)], slots, torch.arange(8), 0, spec.num_layers, first_slot=0)
    loader.submit(job, background=True)
    loader.close()
    assert all(ev.is_set() for ev in job.events) and job.load_layer is None
    assert torch.equal(pool.v[1][:8], seg.v[1]) and job.bytes_read["host"] > 0
    assert job.done.is_set() and job.read_s > 0  # timed, and that timing final


def test_an_unreadable_file_fails_the_job_not_the_loader(tmp_path):
    """An I/O error opening a file is a failed load (the request recomputes); the loader keeps serving."""
    spec = spec_from_hf_config(CFG)
    pool, loader, layout = _cpu_loader(spec)
    slots = KVPool.slots_for([0, 1], PAGE, 0, 8, torch.device("cpu"))

    def unreadable():
        raise OSError(5, "Input/output error")

    bad = LoadJob([Piece("gone", 0, 8, 0, None, open_disk=unreadable)], slots, torch.arange(8), 0, spec.num_layers)
    loader.submit(bad, background=True)
    bad.wait_all()
    assert bad.failed is not None and bad.failed[0] == "gone" and "Input/output" in bad.failed[1]
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    seg = SegmentKV(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8))
    disk.put("a", seg)
    good = LoadJob([Piece("a", 0, 8, 0, None, open_disk=lambda: disk.open("a"))], slots, torch.arange(8), 0,
                   spec.num_layers, first_slot=0)
    loader.submit(good, background=True)
    for layer in range(spec.num_layers):
        good.wait(layer)
    loader.close()
    disk.close()
    assert good.failed is None and torch.equal(pool.v[1][:8], seg.v[1])


def test_contiguous_start():
    assert KVPool.contiguous_start([3, 4, 5], PAGE, 2, 12) == 3 * PAGE + 2
    assert KVPool.contiguous_start([3, 5, 6], PAGE, 5, 12) == 5 * PAGE + 1  # only pages 5, 6 are covered
    assert KVPool.contiguous_start([3, 5, 6], PAGE, 2, 12) is None
    assert KVPool.contiguous_start([6, 5], PAGE, 0, 8) is None


def test_pages_come_back_in_ascending_order():
    pool = PagePool(8)
    a = pool.allocate(3)
    b = pool.allocate(3)
    pool.free(b)
    pool.free(a)
    again = pool.allocate(6)
    assert again == sorted(again)
    pool.check_integrity()


def test_an_error_outside_a_layer_fails_the_job_and_releases_the_forward(monkeypatch):
    """E.g. a CUDA error recording an event: the job fails (its request recomputes), every layer's
    event is set so the forward never waits forever, and the loader thread would live on."""
    spec = spec_from_hf_config(CFG)
    pool, loader, _ = _cpu_loader(spec)
    seg = SegmentKV(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8))
    slots = KVPool.slots_for([0, 1], PAGE, 0, 8, torch.device("cpu"))
    job = LoadJob([Piece("a", 0, 8, 0, seg)], slots, torch.arange(8), 0, spec.num_layers, first_slot=0)

    def broken(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loader, "_load_layer_or_fail", broken)
    loader.run(job)
    assert job.failed is not None and "illegal memory access" in job.failed[1]
    assert all(ev.is_set() for ev in job.events) and job.done.is_set()


def test_a_load_failing_through_no_segments_fault_recomputes_the_turn(tiny_dirs, monkeypatch):
    """Every load raises a non-segment error (a bug): the turn is recomputed without the store, once,
    with the same tokens as recompute; no segment is dropped as corrupt."""
    from cachedattention import LLM, CacheConfig, SamplingParams
    from cachedattention.store import transfer

    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    no_device = CacheConfig(enable_prefix_cache=False)
    llm = LLM(model=str(path), enable_store=True, cache=no_device)
    turn1 = list(range(5, 40))
    first = llm.generate([turn1], params, session_id="s")[0]
    llm.engine.store.store.flush()
    calls = []

    def broken(self, job, layer, readers, into=None):
        calls.append(layer)
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(transfer.Loader, "_load_layer", broken)
    turn2 = turn1 + first.token_ids + [7, 8, 9]
    got = llm.generate([turn2], params, session_id="s")[0]
    want = LLM(model=str(path), cache=no_device).generate([turn2], params)[0]
    assert got.token_ids == want.token_ids
    assert calls == [0] and got.metrics.cached_tokens["host"] == 0  # tried once (failed at layer 0), then recomputed
    assert llm.engine.store.store.stats.corrupt_segments == 0
    monkeypatch.undo()  # the loader works again: the record the recomputed turn committed serves turn 3
    llm.engine.store.store.flush()
    turn3 = turn2 + got.token_ids + [4, 5]
    third = llm.generate([turn3], params, session_id="s")[0]
    assert third.token_ids == LLM(model=str(path), cache=no_device).generate([turn3], params)[0].token_ids
    assert third.metrics.cached_tokens["host"] >= len(turn2)


def test_float_tables_undo_a_bf16_rotation_more_exactly():
    """The store recovers pre-RoPE keys from bf16 device pages (a prefix-cache hit it then saves):
    float32 tables undo the rotation with only the keys' own rounding left."""
    spec = spec_from_hf_config({**CFG, "head_dim": 64, "hidden_size": 256, "rope_theta": 500000.0,
                                "max_position_embeddings": 40000})  # fmt: skip
    positions = torch.arange(30000, 30256)
    f32 = RotaryEmbedding(spec, 40000, torch.device("cpu"), torch.float32)
    for a, b in zip(f32.float_tables(positions), f32.tables(positions)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same tables where the model is float32
    bf16 = RotaryEmbedding(spec, 40000, torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(0)
    pre = torch.randn(256, 2, 64).bfloat16()
    cos, sin = bf16.tables(positions)
    post = rotate_into(torch.empty_like(pre), pre, cos, sin)  # what the forward writes into the pages
    with_bf16 = apply_rotary(post, cos, -sin).bfloat16().float()
    fcos, fsin = bf16.float_tables(positions)
    with_f32 = apply_rotary(post.float(), fcos, -fsin).bfloat16().float()
    err = {name: (got - pre.float()).abs().mean().item() for name, got in (("bf16", with_bf16), ("f32", with_f32))}
    assert err["f32"] < 0.8 * err["bf16"], err
