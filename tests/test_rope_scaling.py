"""RoPE beyond plain rotation: YaRN, longrope (its short and long factors), partial rotary (Phi-4-mini),
adjacent pairs (ERNIE 4.5, Helium), a RoPE per layer type (OLMo 3) and layers without it (EXAONE 4),
read as transformers reads them, served by the engine and reused from the store, truncation included."""

import json

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.model.rope import inv_frequencies
from cachedattention.model.spec import spec_from_hf_config
from tests.tiny_models import tiny_config
from tests.util import capture_logits, last_logits_after, rel_err, run_to_end

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("kind, scaling, extra", [
    ("qwen2-yarn", YARN, {}),
    ("qwen2-yarn", {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, {}),  # DeepSeek's form of the factor
    ("qwen2-yarn", {**YARN, "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0}, {}),
    ("qwen2-yarn", {**YARN, "truncate": False}, {}),
    ("qwen2-yarn", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128}, {}),  # from the windows
    ("phi4-mini", None, {}),
    ("phi4-mini", {"type": "su", "short_factor": [1.0, 1.1, 1.2, 1.4, 2.0, 2.5], "long_factor": [2.0] * 6,
                   "original_max_position_embeddings": 128}, {}),  # Phi-3 reads su (and yarn) as longrope
    ("phi4-mini", None, {"partial_rotary_factor": 0.5}),
])  # fmt: skip
def test_frequencies_and_attention_factor_are_transformers(kind, scaling, extra):
    """Each rotating frequency (the short and long sets of longrope) and the factor on cos and sin,
    against transformers' own RoPE initialisation."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    overrides = {**extra, **({"rope_scaling": scaling} if scaling else {})}
    if kind == "phi4-mini" and "partial_rotary_factor" in extra:
        overrides["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                     "long_factor": [2.0, 3.0, 5.0, 9.0]}  # fmt: skip
    cfg = tiny_config(kind, **overrides)
    spec = spec_from_hf_config(cfg.to_dict())
    init = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]]
    ref, factor = init(cfg, "cpu")
    rotating = len(ref)
    assert spec.head_dim // 2 - rotating == (spec.head_dim - (spec.rotary_dim or spec.head_dim)) // 2
    ours = inv_frequencies(spec)
    torch.testing.assert_close(ours[:rotating], ref.float(), rtol=1e-6, atol=0)
    assert not ours[rotating:].any()  # the dimensions a partial rotary leaves as they are
    assert (spec.rope_attention_factor or 1.0) == pytest.approx(factor, rel=1e-12)
    if cfg.rope_parameters["rope_type"] == "longrope":
        long, _ = init(cfg, "cpu", seq_len=spec.rope_short_window + 1)
        torch.testing.assert_close(inv_frequencies(spec, long=True)[:rotating], long.float(), rtol=1e-6, atol=0)
        assert not torch.equal(long, ref)


def test_longrope_serves_its_pretraining_window_by_default_and_the_long_factors_past_it(tiny_dirs, monkeypatch):
    """Within the pretraining window (the default), transformers rotates with the short factors; a
    longer --max-model-len rotates every token with the long ones, as transformers does for a
    sequence that long. Both against transformers' logits."""
    path, hf = tiny_dirs["phi4-mini"]
    short = LLM(model=str(path))
    assert short.engine.max_model_len == 128
    with pytest.raises(ValueError, match="128"):
        short.generate([list(range(3, 140))], GREEDY)
    long = LLM(model=str(path), max_model_len=512)
    for llm, prompt in ((short, list(range(3, 100))), (long, [(5 * i + 2) % 250 for i in range(150)])):
        seen = capture_logits(monkeypatch)
        out = llm.generate([prompt], GREEDY)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
        monkeypatch.undo()
        for step, logits in enumerate(seen):
            assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, (llm.engine.max_model_len, step)


def test_a_session_stored_under_the_short_factors_is_not_reused_under_the_long_ones(tiny_dirs, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """Past layer 0 a stored key came through attention rotated with the factors of its window, so a
    session stored under the short ones is a miss for an engine rotating with the long ones; one
    stored under the long ones is reused from disk, equal to recompute."""
    path, _ = tiny_dirs["phi4-mini"]
    store = dict(enable_store=True, store_dir=str(tmp_path / "store"), cache=CacheConfig(enable_prefix_cache=False))
    turn1 = list(range(5, 100))
    for window in (None, 512):  # the short window, then a long one (a new engine on the same folder)
        first = LLM(model=str(path), max_model_len=window, **store)
        out = first.generate([turn1], GREEDY, session_id=f"s{window}")[0]
        first.engine.store.store.flush()
        del first
    turn2 = turn1 + out.token_ids + [7, 8, 9] + list(range(30, 80))  # 154 tokens: past the short window
    after = LLM(model=str(path), max_model_len=512, host_bytes=0, **store)
    ref = LLM(model=str(path), max_model_len=512)
    for session, cached in (("sNone", 0), ("s512", len(turn1) + len(out.token_ids) - 1)):
        seen = capture_logits(monkeypatch)
        got = after.generate([turn2], GREEDY, session_id=session)[0]
        ref_seen = capture_logits(monkeypatch)
        want = ref.generate([turn2], GREEDY)[0]
        monkeypatch.undo()
        assert sum(got.metrics.cached_tokens.values()) == got.metrics.cached_tokens["disk"] == cached
        assert got.token_ids == want.token_ids
        for a, b in zip(seen[: len(ref_seen)], ref_seen):
            assert rel_err(a, b) <= 1e-4


# phi4-mini: partial rotary with longrope; ernie4_5, helium: pairs of adjacent dimensions; glm4: both; olmo3:
# YaRN on its full layer, its windowed ones unscaled; exaone4, cohere2: their full layer without RoPE
@pytest.mark.parametrize("kind", ["phi4-mini", "ernie4_5", "helium", "glm4", "olmo3", "exaone4", "cohere2"])
def test_truncated_cache_rotated_by_transformers_gives_the_engine_s_logits(kind, tiny_dirs, monkeypatch):
    """Overflowing the window: the retained pre-RoPE keys, put back in the checkpoint's order of each
    head's dimensions, rotated at their new positions by transformers' own rotary and fed to it as
    its cache, give the engine's logits."""
    import importlib

    from transformers import DynamicCache

    from cachedattention.model.loader import qk_dim_order

    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False), max_model_len=96,
              keep_head_tokens=8)  # fmt: skip
    eng, conv = llm.engine, list(range(5, 45))
    for t in range(10):
        rid = eng.add_request(conv, GREEDY, session_id="s")
        req = eng.requests[rid]
        if req.store_state.plan.truncated_now and req.store_state.plan.hit > 8:
            break
        out = run_to_end(llm, [rid])[0]
        eng.store.store.flush()
        conv = conv + out.token_ids + list(range(20 + t, 30 + t))
    else:
        pytest.fail("the conversation never overflowed the window")
    seen = capture_logits(monkeypatch)
    eng.step()
    hit = req.metrics.cached_tokens["host"]
    assert hit > 8 and req.metrics.truncated_tokens > 0
    store, spec = eng.store.store, eng.spec
    order = qk_dim_order(spec)
    theirs = torch.argsort(order) if order is not None else torch.arange(spec.head_dim)
    apply = importlib.import_module(type(hf).__module__).apply_rotary_pos_emb
    types = getattr(hf.config, "layer_types", None)
    cache = DynamicCache()
    positions = torch.arange(hit)[None]
    for layer in range(spec.num_layers):
        spans = req.store_state.reuse
        k = torch.cat([store.host.get(s.seg_id).k[layer, s.lo:s.hi] for s in spans])[:hit][..., theirs]
        v = torch.cat([store.host.get(s.seg_id).v[layer, s.lo:s.hi] for s in spans])[:hit]
        k = k.transpose(0, 1)[None]  # [1, kv_heads, hit, d], transformers' layout
        if not (kind in ("exaone4", "cohere2") and types[layer] == "full_attention"):  # their full layers: no RoPE
            cos, sin = hf.model.rotary_emb(k, positions, *([types[layer]] if kind == "olmo3" else []))
            k = apply(k, k, cos, sin)[1]
        cache.update(k, v.transpose(0, 1)[None], layer)
    assert rel_err(seen[0], last_logits_after(hf, cache, req.prompt_token_ids[hit:], hit)) <= 1e-4
    run_to_end(llm, [rid])


@pytest.mark.parametrize("config, match", [
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial rotary"),  # Llama's modeling rotates all
    ({"model_type": "phi3", "partial_rotary_factor": 0.3125}, "even number"),  # 5 of 16 dimensions
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor must be 8 positive numbers"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be a positive"),
])  # fmt: skip
def test_rope_settings_beyond_what_is_implemented_are_refused(config, match, tmp_path):
    base = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 512}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    with pytest.raises(ValueError, match=match):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize("kind", ["smollm3", "gemma3"])
def test_yarn_leaves_the_layers_that_do_not_rotate_with_it_unscaled(kind, tmp_path, monkeypatch):
    """YaRN's factor on cos and sin reaches only the layers that rotate with it: not SmolLM3's layers
    without RoPE (YaRN is its long-context setting), nor Gemma 3's windowed layers (their own RoPE,
    unscaled); folded into their queries it would sharpen their attention."""
    from tests.tiny_models import make_tiny_model

    hf = make_tiny_model(kind, tmp_path, rope_scaling=YARN)
    llm = LLM(model=str(tmp_path))
    spec = llm.engine.spec
    assert spec.rope_attention_factor is not None
    assert (spec.nope_layers, spec.local_rope_layers) == (((1,), ()) if kind == "smollm3" else ((), (0, 1)))
    seen = capture_logits(monkeypatch)
    prompt = [(3 * i + 7) % 250 for i in range(90)]  # past the pretraining window of 64
    out = llm.generate([prompt], GREEDY)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, step
