"""CUDA checks (run by bench/gpu.sh on a GPU machine; skipped elsewhere): the model and the store on the device."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from tests.tiny_models import hf_greedy
from tests.util import capture_logits, rel_err

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mixtral", "qwen2-moe", "mistral-window", "qwen2-window",
                                  "gemma3-scaled", "granite", "phi4-mini", "qwen2-yarn", "gemma2", "olmo3", "exaone4",
                                  "ernie4_5", "gpt_oss"])
def test_cuda_float32_matches_transformers(kind, tiny_dirs, monkeypatch):
    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path), device="cuda")
    seen = capture_logits(monkeypatch)
    prompt = list(range(5, 60))
    out = llm.generate([prompt], PARAMS)[0]
    assert out.token_ids == hf_greedy(hf, prompt, 8)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for i, logits in enumerate(seen):
        assert rel_err(logits.cpu(), ref[len(prompt) - 1 + i]) <= 1e-3  # TF32-free fp32 on GPU, looser than CPU


def test_cuda_concurrent_decoders_in_one_padded_group_match_transformers(tiny_dirs, monkeypatch):
    """Decoders of different context lengths share one padded attention call over gathered pages."""
    path, hf = tiny_dirs["qwen2"]
    llm = LLM(model=str(path), device="cuda")
    assert llm.engine.runner.decode_kernel is None and llm.engine.runner.group_call_rows is None
    seen = capture_logits(monkeypatch)
    prompts = [[(3 * i + j) % 250 + 1 for i in range(n)] for j, n in enumerate((5, 60, 9, 64))]
    outs = llm.generate(prompts, PARAMS)
    for j, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.token_ids == hf_greedy(hf, prompt, 8)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
        for step in range(8):
            assert rel_err(seen[step * len(prompts) + j].cpu(), ref[len(prompt) - 1 + step]) <= 1e-3


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])  # fp8: the pages in e4m3, the store in float32
@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_cuda_store_turns_equal_recompute(tier, layerwise, kv_cache_dtype, tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    no_dev = CacheConfig(enable_prefix_cache=False, kv_cache_dtype=kv_cache_dtype)
    base = LLM(model=str(path), device="cuda", cache=no_dev)
    kw = {"store_dir": str(tmp_path), "host_bytes": 0} if tier == "disk" else {}
    llm = LLM(model=str(path), device="cuda", cache=no_dev, enable_store=True, layerwise=layerwise, **kw)
    conv = list(range(5, 70))
    for t in range(3):
        ref = base.generate([conv], PARAMS)[0]
        out = llm.generate([conv], PARAMS, session_id="s")[0]
        llm.engine.store.store.flush()
        assert out.token_ids == ref.token_ids
        if t:
            assert out.metrics.cached_tokens[tier] > 0
        conv = conv + ref.token_ids + [3, 4, 5]
    llm.engine.store.check_integrity()


def test_cuda_bfloat16_runs_and_reuses(tiny_dirs):
    path, _ = tiny_dirs["qwen2"]
    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", enable_store=True,
              cache=CacheConfig(enable_prefix_cache=False))
    conv = list(range(5, 70))
    first = llm.generate([conv], PARAMS, session_id="s")[0]
    llm.engine.store.store.flush()
    second = llm.generate([conv + first.token_ids + [1]], PARAMS, session_id="s")[0]
    assert second.metrics.cached_tokens["host"] > 0 and len(second.token_ids) == 8


def test_cuda_queued_head_preloaded_on_the_copy_stream_equals_recompute(tiny_dirs):
    """The read buffer on CUDA: the head's load runs on the copy stream while another job computes."""
    from cachedattention import SchedulerConfig

    path, _ = tiny_dirs["llama"]
    no_dev = CacheConfig(enable_prefix_cache=False)
    llm = LLM(model=str(path), device="cuda", cache=no_dev, enable_store=True, scheduler=SchedulerConfig(max_num_seqs=1))
    eng = llm.engine
    a = list(range(5, 70))
    first = llm.generate([a], PARAMS, session_id="A")[0]
    eng.store.store.flush()
    turn2 = a + first.token_ids + [3, 4]
    eng.add_request(list(range(100, 170)), PARAMS, session_id="C")
    rid = eng.add_request(turn2, PARAMS, session_id="A")
    eng.step()
    assert eng.requests[rid].staged and eng.requests[rid].store_state.pending_load is not None
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    ref = LLM(model=str(path), device="cuda", cache=no_dev).generate([turn2], PARAMS)[0]
    assert outs[rid].token_ids == ref.token_ids and outs[rid].metrics.cached_tokens["host"] > 0
    eng.pages.check_integrity()


def test_cuda_layerwise_host_hit_reports_its_load_time(tiny_dirs):
    """The loader thread times its copy stream after the forward has consumed the layers: the turn's
    metrics wait for that timing instead of reading it as zero."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), device="cuda", cache=CacheConfig(enable_prefix_cache=False), enable_store=True)
    conv = list(range(5, 200))
    first = llm.generate([conv], PARAMS, session_id="s")[0]
    llm.engine.store.store.flush()
    out = llm.generate([conv + first.token_ids + [3, 4, 5]], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["host"] > 0 and out.metrics.load_busy_s > 0


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_oss"])
def test_cuda_a_prefill_after_cached_tokens_matches_transformers(kind, tiny_dirs):
    """New tokens after a cached context take the bottom-right causal mask: SDPA's CausalBias on
    CUDA, which Gemma 2's cap and gpt-oss's sinks take through plain attention."""
    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path), device="cuda")  # (the device prefix cache on, as by default)
    first = list(range(5, 60))
    llm.generate([first], PARAMS)
    second = first + [7, 8, 9, 10, 11]
    out = llm.generate([second], PARAMS)[0]
    assert out.metrics.cached_tokens["device"] >= 32  # (whole pages of the first prompt)
    assert out.token_ids == hf_greedy(hf, second, 8)


def test_cuda_lora_adapter_equals_its_merged_weights_beside_the_base_model(tiny_dirs, tmp_path):
    """A LoRA adapter on CUDA (PEFT's layout, written without PEFT) gives the logits of its weights
    merged into the checkpoint, in one batch with a base-model request that gives the base model's."""
    import transformers

    from cachedattention import LoRARequest
    from tests.lora_files import hand_written_adapter, llama_adapter_pairs, merged_checkpoint

    path, hf = tiny_dirs["llama"]
    hand_written_adapter(tmp_path / "a", llama_adapter_pairs(hf.config, [0, 1, 2]))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_checkpoint(path, tmp_path / "a", tmp_path / "m"))
    llm = LLM(model=str(path), device="cuda", enable_lora=True)
    prompt = list(range(5, 60))
    outs = llm.generate([prompt, prompt], PARAMS, lora_request=[LoRARequest("a", 1, str(tmp_path / "a")), None])
    for out, ref_model in zip(outs, (merged.eval(), hf)):
        assert out.token_ids == hf_greedy(ref_model, prompt, 8)
