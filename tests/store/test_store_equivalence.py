"""Equivalence: a turn served from the store (any tier, sync or layer-wise) == recomputing the whole prompt."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from tests.util import capture_logits, rel_err

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make(path, tier: str, layerwise: bool = True, tmp=None, **kw):
    """An engine whose reuse comes from exactly one tier."""
    if tier == "device":
        return LLM(model=str(path), enable_store=True, layerwise=layerwise, **kw)
    no_device = CacheConfig(enable_prefix_cache=False)
    if tier == "host":
        return LLM(model=str(path), enable_store=True, cache=no_device, layerwise=layerwise, **kw)
    # host budget 0: every segment goes straight to disk
    return LLM(model=str(path), enable_store=True, cache=no_device, layerwise=layerwise,
               store_dir=str(tmp / "store"), host_bytes=0, **kw)


def run_turns(llm, session, turns, monkeypatch, last_logits):
    """A multi-turn conversation on token ids; returns each turn's output."""
    conv, outs = list(range(5, 45)), []
    for t in range(turns):
        seen = capture_logits(monkeypatch)
        out = llm.generate([conv], PARAMS, session_id=session)[0]
        last_logits.append(seen[0])
        monkeypatch.undo()
        outs.append(out)
        conv = conv + out.token_ids + [10 + t, 11 + t, 12 + t]
        if llm.engine.store is not None:
            llm.engine.store.store.flush()
    return outs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen3-moe", "qwen2-window", "gemma3-scaled", "smollm3", "olmo2", "phi4-mini", "qwen2-yarn", "gemma2",
                                  "olmo3", "exaone4", "ernie4_5", "glm4", "cohere2", "gpt_oss", "cohere-qk-norm", "glm4_moe"])
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_cached_turns_equal_recompute(kind, tier, layerwise, tiny_dirs, tmp_path, monkeypatch):
    path, _ = tiny_dirs[kind]
    ref_logits, got_logits = [], []
    ref = run_turns(LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False)), None, 4, monkeypatch, ref_logits)
    llm = make(path, tier, layerwise, tmp_path)
    got = run_turns(llm, "conv-1", 4, monkeypatch, got_logits)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got_logits, ref_logits):
        assert rel_err(a, b) <= 1e-4
    for out in got[1:]:
        cached = out.metrics.cached_tokens
        assert cached[tier] > 0, cached
        if tier == "device":  # full pages from the device, the partial last page from host
            assert cached["disk"] == 0 and cached["host"] < 16
        else:
            assert sum(cached.values()) == cached[tier]  # served by exactly the tier we forced
    assert got[0].metrics.num_cached_tokens == 0
    llm.engine.store.check_integrity()
    llm.engine.pages.check_integrity()


def test_partial_and_edited_history_reuses_only_the_matching_prefix(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = make(path, "host")
    base = LLM(model=str(path))
    first = list(range(5, 70))
    llm.generate([first], PARAMS, session_id="s")
    llm.engine.store.store.flush()
    edited = first[:30] + [99, 98, 97] + first[33:] + [1, 2, 3]
    out = llm.generate([edited], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["host"] == 30  # verified token by token: stops at the edit
    assert out.token_ids == base.generate([edited], PARAMS)[0].token_ids


def test_anonymous_requests_reuse_the_longest_stored_prefix(tiny_dirs):
    path, _ = tiny_dirs["qwen2"]
    llm = make(path, "host")
    base = LLM(model=str(path))
    p1 = list(range(3, 60))
    o1 = llm.generate([p1], PARAMS)[0]
    llm.engine.store.store.flush()
    p2 = p1 + o1.token_ids + [5, 6, 7]
    o2 = llm.generate([p2], PARAMS)[0]
    assert o2.metrics.cached_tokens["host"] == len(p1) + len(o1.token_ids) - 1
    assert o2.token_ids == base.generate([p2], PARAMS)[0].token_ids


def test_bf16_storage_halves_bytes_and_still_hits(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    f32 = make(path, "host")
    b16 = make(path, "host", storage_dtype="bfloat16")
    conv = list(range(5, 60))
    for llm in (f32, b16):
        llm.generate([conv], PARAMS, session_id="s")
        llm.engine.store.store.flush()
    assert b16.stats()["host_bytes_used"] * 2 == f32.stats()["host_bytes_used"]
    out = b16.generate([conv + [1, 2]], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["host"] > 0
