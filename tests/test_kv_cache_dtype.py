"""vLLM's kv_cache_dtype: the device pool's pages in bfloat16 or FP8, read back in the model's dtype."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.kvcache.kv_pool import KVPool, kv_storage_dtype
from cachedattention.model.spec import spec_from_hf_config
from tests.store.test_store_equivalence import make, run_turns
from tests.tiny_models import tiny_config
from tests.util import capture_logits, rel_err

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _pool(name: str, num_pages: int = 8, page_size: int = 4) -> KVPool:
    spec = spec_from_hf_config(tiny_config("llama").to_dict())
    storage = kv_storage_dtype(name, torch.float32)
    return KVPool(spec, num_pages, page_size, torch.device("cpu"), torch.float32, storage)


@pytest.mark.parametrize("name", ["bfloat16", *FP8])
def test_pages_hold_the_narrow_values_and_read_back_in_the_model_dtype(name):
    pool = _pool(name)
    assert not pool.exact and pool.dtype == torch.float32
    assert pool.k[0].element_size() == (1 if name in FP8 else 2)
    shape = pool.k[0].shape[1:]
    k, v = torch.randn(6, *shape) * 3, torch.randn(6, *shape)
    narrow = FP8.get(name, torch.bfloat16)
    slots = torch.tensor([1, 5, 6, 7, 12, 30])
    pool.write(0, slots, k, v)
    got_k, got_v = pool.gather(0, slots)
    assert got_k.dtype == torch.float32
    assert torch.equal(got_k, k.to(narrow).float()) and torch.equal(got_v, v.to(narrow).float())
    assert torch.equal(got_k, pool.round_trip(k))
    assert not torch.equal(got_k, k)  # rounded: the pages are not float32
    pool.write_run(1, 8, k, v)  # consecutive slots 8..13 = pages 2 and 3
    rk, rv = pool.read(1, torch.tensor([0, 1, 2, 3]), 14, first_slot=None, start=8)  # a sequence's pages
    assert torch.equal(rk, got_k) and torch.equal(rv, got_v)
    rk, _ = pool.read(1, torch.tensor([0, 1, 2, 3]), 14, first_slot=0, start=8)
    assert torch.equal(rk, got_k)
    pk, _ = pool.gather_pages(1, torch.tensor([3, 2]))
    assert torch.equal(pk[4:6], got_k[:2]) and torch.equal(pk[:2], got_k[4:])


@pytest.mark.parametrize("name, largest", [("fp8", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_saturates_at_the_format_largest(name, largest):
    pool = _pool(name)
    big = torch.full((1, *pool.k[0].shape[1:]), 1e6)
    pool.write(0, torch.tensor([0]), big, -big)
    k, v = pool.gather(0, torch.tensor([0]))
    assert torch.all(k == largest) and torch.all(v == -largest)  # never infinity or NaN


def test_auto_keeps_the_model_dtype_and_writes_in_place():
    pool = _pool("auto")
    assert pool.exact and pool.k[0].dtype == torch.float32
    x = torch.randn(3, *pool.k[0].shape[1:])
    assert pool.round_trip(x) is x


@pytest.mark.parametrize("name, ratio", [("bfloat16", 2), ("fp8", 4), ("fp8_e5m2", 4)])
def test_the_same_memory_holds_more_pages(name, ratio, tiny_dirs):
    path, _ = tiny_dirs["llama"]
    base = LLM(model=str(path), kv_pool_bytes=1 << 20, enable_store=False)
    narrow = LLM(model=str(path), kv_pool_bytes=1 << 20, kv_cache_dtype=name, enable_store=False)
    assert 0 <= narrow.engine.pool.num_pages - ratio * base.engine.pool.num_pages < ratio  # (pages rounded down)
    # a CPU's paged decode kernel and fused decode layers read and write narrow pages too
    assert narrow.engine.runner.decode_kernel is not None and narrow.engine.runner.fused_decode is not None
    assert base.engine.runner.fused_decode is not None


def _first_logits(path, prompts, monkeypatch, **kw):
    """Each prompt's first answer logits, the prompts prefilled side by side."""
    seen = capture_logits(monkeypatch)
    LLM(model=str(path), enable_store=False, **kw).generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    monkeypatch.undo()
    return seen[: len(prompts)]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2", "qwen2-window", "gpt_oss"])
def test_fp8_pages_stay_close_to_float32_ones(kind, tiny_dirs, monkeypatch):
    """FP8 pages (3 bits of mantissa) give logits near those of float32 pages, not equal to them."""
    path, _ = tiny_dirs[kind]
    # the first two fill a chunk of 64: the third's prompt is prefilled over a cached chunk
    prompts = [list(range(5, 45)), list(range(7, 31)), list(range(50, 120))]
    ref = _first_logits(path, prompts, monkeypatch, max_num_batched_tokens=64)
    got = _first_logits(path, prompts, monkeypatch, max_num_batched_tokens=64, kv_cache_dtype="fp8")
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert 0 < min(errs) and max(errs) < 0.15, errs


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2", "qwen2-window"])
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_cached_turns_equal_recompute_over_fp8_pages(kind, tier, layerwise, tiny_dirs, tmp_path, monkeypatch):
    """The equivalence contract holds for FP8 pages: the store keeps the model's dtype, and a turn
    served from any tier writes its keys into the pages as a recomputed one does."""
    path, _ = tiny_dirs[kind]
    ref_logits, got_logits = [], []
    plain = LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False, kv_cache_dtype="fp8"))
    ref = run_turns(plain, None, 4, monkeypatch, ref_logits)
    llm = make(path, tier, layerwise, tmp_path, kv_cache_dtype="fp8")
    got = run_turns(llm, "conv-1", 4, monkeypatch, got_logits)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got_logits, ref_logits):
        assert rel_err(a, b) <= 1e-4
    for out in got[1:]:
        assert out.metrics.cached_tokens[tier] > 0, out.metrics.cached_tokens
    llm.engine.store.check_integrity()
    llm.engine.pages.check_integrity()


def test_unknown_kv_cache_dtypes_are_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bfloat16, fp8"):
        CacheConfig(kv_cache_dtype="int8")


def test_a_server_with_fp8_pages_reuses_a_conversation_and_says_its_cache_dtype(chat_model_dir, tmp_path):
    """`serve --kv-cache-dtype fp8`: the second turn reuses the first's KV from the store, and
    vllm:cache_config_info's labels name the pages' dtype, as vLLM's."""
    from cachedattention import EngineConfig, StoreConfig
    from tests.server.conftest import start_server
    from tests.server.test_server import converse, metric_samples

    config = EngineConfig(model=str(chat_model_dir), cache=CacheConfig(kv_cache_dtype="fp8", enable_prefix_cache=False),
                          store=StoreConfig(enable=True, store_dir=str(tmp_path / "kv")))  # fmt: skip
    server = start_server(config)
    try:
        turns = converse(server.url, "fp8-conv", ["Hello there.", "And what comes next?"])
        assert turns[1][1].prompt_tokens_details.cached_tokens > 0
        info = [dict(labels) for name, labels in metric_samples(server.url) if name == "vllm:cache_config_info"]
        assert info[0]["cache_dtype"] == "fp8" and int(info[0]["num_gpu_blocks"]) > 0
    finally:
        server.stop()
