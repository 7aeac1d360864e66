"""Our Llama-family forward equals transformers' (logits and greedy tokens) on tiny random models."""

import json

import pytest
import torch

from cachedattention import LLM, SamplingParams
from tests.tiny_models import hf_greedy
from tests.util import assert_logits_match, capture_logits, rel_err

KINDS = ["llama", "llama-linear", "llama-tied", "qwen2", "qwen3", "mistral", "mixtral", "qwen2-moe", "qwen3-moe",
         "mistral-window", "qwen2-window", "phi3", "phi3-window", "smollm3", "llama-biases",
         "granite", "ministral", "olmo2", "phi4-mini", "qwen2-yarn", "gemma", "gemma2", "olmo3", "exaone4",
         "ernie4_5", "seed_oss", "helium", "glm", "glm4", "cohere", "cohere-qk-norm", "cohere2", "granitemoe", "granitemoeshared", "gpt_oss",
         "glm4_moe"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_prefill_and_decode(kind, tiny_dirs, monkeypatch):
    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path))
    seen = capture_logits(monkeypatch)
    prompt = [(7 * i + 3) % 250 for i in range(37)]
    out = llm.generate([prompt], GREEDY)[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert len(seen) == 8
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4, f"step {step}"


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, tiny_dirs):
    path, hf = tiny_dirs[kind]
    llm = LLM(model=str(path))
    for prompt in ([5, 9, 13], list(range(20, 80))):
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == hf_greedy(hf, prompt, 12)


def test_batched_chunked_prefill_equals_one_at_a_time(tiny_dirs):
    from cachedattention import SchedulerConfig

    path, _ = tiny_dirs["llama"]
    prompts = [list(range(3, 3 + n)) for n in (5, 41, 17, 90, 1)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    single = [LLM(model=str(path)).generate([p], params)[0].token_ids for p in prompts]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    batched = llm.generate(prompts, params)
    assert [o.token_ids for o in batched] == single
    llm.engine.pages.check_integrity()


def test_tiny_pool_preempts_and_still_completes_correctly(tiny_dirs):
    from cachedattention import CacheConfig, SchedulerConfig

    path, _ = tiny_dirs["qwen2"]
    prompts = [list(range(10 + i, 40 + i)) for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    single = [LLM(model=str(path)).generate([p], params)[0].token_ids for p in prompts]
    llm = LLM(
        model=str(path),
        cache=CacheConfig(page_size=4, num_pages=24, enable_prefix_cache=False), max_model_len=96,
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
    )
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == single
    assert llm.stats()["preemptions"] > 0
    llm.engine.pages.check_integrity()
    assert llm.engine.pages.num_available() == 24


def test_a_preempted_request_reports_the_reuse_of_its_first_admission(tiny_dirs):
    """Its prompt and output recomputed after a preemption may come from its own cached pages: its
    usage still says what its prompt reused when it was first admitted (nothing here), as vLLM's."""
    from cachedattention import CacheConfig, SchedulerConfig

    path, _ = tiny_dirs["qwen2"]
    prompts = [list(range(10 + i, 40 + i)) for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    llm = LLM(model=str(path), cache=CacheConfig(page_size=4, num_pages=24), max_model_len=96,
              scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4))  # fmt: skip
    outs = llm.generate(prompts, params)
    assert llm.stats()["preemptions"] > 0
    assert [o.metrics.cached_tokens for o in outs] == [{"device": 0, "host": 0, "disk": 0, "remote": 0}] * 4
    llm.engine.pages.check_integrity()


def test_prefix_cache_reuses_pages_and_keeps_tokens(tiny_dirs):
    path, _ = tiny_dirs["mistral"]
    llm = LLM(model=str(path))
    prompt = list(range(5, 70))
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert second.token_ids == first.token_ids
    assert first.metrics.cached_tokens["device"] == 0
    assert second.metrics.cached_tokens["device"] == 64  # 4 full pages of 16, the last token recomputed
    llm.engine.pages.check_integrity()


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    prompt = list(range(30, 60))
    p = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate([prompt, prompt], p)
    b = llm.generate([prompt], p)[0]
    assert a[0].token_ids == a[1].token_ids == b.token_ids
    other = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.5, seed=7, ignore_eos=True))[0]
    assert other.token_ids != b.token_ids
    topk1 = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=1, ignore_eos=True))
    greedy = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert topk1[0].token_ids == greedy[0].token_ids


def test_stop_token_ids_and_eos_and_window(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), max_model_len=64)
    prompt = list(range(30, 60))
    free = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    long = llm.generate([prompt], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert long.finish_reason == "length" and len(prompt) + len(long.token_ids) == 64


def test_stats_count_steps_that_left_the_queue_waiting(tiny_dirs):
    from cachedattention import CacheConfig, SchedulerConfig

    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[(3 * i + j) % 250 for j in range(10)] for i in range(3)]
    one_at_a_time = LLM(model=str(path), scheduler=SchedulerConfig(max_num_seqs=1))
    one_at_a_time.generate(prompts, params)
    stats = one_at_a_time.stats()
    assert stats["steps_blocked_on_max_seqs"] > 0 and stats["steps_blocked_on_pages"] == 0
    # 3 pages of 4 tokens per request (10 prompt + 4 answer tokens), 7 pages in all: two run at once
    small_pool = LLM(model=str(path), cache=CacheConfig(page_size=4, num_pages=7, enable_prefix_cache=False),
                     max_model_len=28)  # (the window a pool of 28 tokens can hold)
    small_pool.generate(prompts, params)
    stats = small_pool.stats()
    assert stats["steps_blocked_on_pages"] > 0 and stats["steps_blocked_on_max_seqs"] == 0


@pytest.mark.parametrize("mode", ["kernel", None, 16, 0])
def test_concurrent_decoders_match_transformers(mode, tiny_dirs, monkeypatch):
    """Several sequences decoding in one step, each over its own context length: by the paged
    decode kernel (the CPU default), or through torch in one padded attention call (None), in groups
    of similar length (16), each alone (0). Every sequence's logits match its own transformers reference."""
    path, hf = tiny_dirs["qwen2"]
    llm = LLM(model=str(path))
    runner = llm.engine.runner
    assert runner.decode_kernel is not None  # this machine builds it
    if mode != "kernel":
        runner.decode_kernel, runner.group_call_rows = None, mode
    groups = []
    real = runner.build_batch

    def spy(scheduled, hooks):
        batch, *rest = real(scheduled, hooks)
        paged = [len(batch.paged_decode.rows)] if batch.paged_decode is not None else []
        groups.append((paged, sorted(len(g.rows) for g in batch.decode)))
        return batch, *rest

    monkeypatch.setattr(runner, "build_batch", spy)
    seen = capture_logits(monkeypatch)
    prompts = [[(3 * i + j) % 250 + 1 for i in range(n)] for j, n in enumerate((5, 60, 9, 64))]
    outs = llm.generate(prompts, GREEDY)
    assert len(seen) == 8 * len(prompts)  # every step samples all three, in submission order
    for j, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.token_ids == hf_greedy(hf, prompt, 8)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
        for step in range(8):
            assert rel_err(seen[step * len(prompts) + j], ref[len(prompt) - 1 + step]) <= 1e-4, f"seq {j} step {step}"
    decode_steps = groups[1:]  # the first step prefills
    expected = {"kernel": ([4], []), None: ([], [4]), 16: ([], [2, 2]), 0: ([], [])}[mode]
    assert decode_steps and all(g == expected for g in decode_steps)


def test_bucket_by_length_pays_for_calls_with_less_padding():
    from cachedattention.engine.runner import bucket_by_length

    lengths = [100, 100, 4000, 4100, 120]
    assert bucket_by_length(lengths, 1024) == [[0, 1, 4], [2, 3]]
    assert bucket_by_length(lengths, None) == [[0, 1, 4, 2, 3]]  # one call for all
    assert bucket_by_length(lengths, 100_000) == [[0, 1, 4, 2, 3]]  # calls dearer than any padding
    assert bucket_by_length(lengths, 0) == [[0, 1], [4], [2], [3]]  # calls free: no padding (ties: fewer calls)
    assert bucket_by_length([], 1024) == []


def test_onednn_packed_weight_equals_the_plain_linear():
    from torch.nn import functional as F

    from cachedattention.model.layers import OneDNNWeight

    weight = torch.randn(300, 48, generator=torch.Generator().manual_seed(0))
    head = OneDNNWeight(weight, rows=(4, 128))
    assert head.packed is not None  # this machine's torch has oneDNN
    for rows in (1, 4, 9, 128, 129):  # below, inside and above the packed range
        x = torch.randn(rows, 48)
        assert rel_err(head.linear(x), F.linear(x, weight)) <= 1e-5, f"{rows} rows"


@pytest.mark.parametrize("tied", [True, False])  # the head tied as the top level of the config says
def test_the_language_model_of_a_mistral3_checkpoint_serves(tied, tmp_path, monkeypatch):
    """Mistral Small 3.1 / 3.2 are Mistral3ForConditionalGeneration: their language model is served
    (under model.language_model.*, or the hub's language_model.model.*), the vision tower left out."""
    import transformers

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=16, head_dim=16)  # fmt: skip
    hf = transformers.Mistral3ForConditionalGeneration(
        transformers.Mistral3Config(text_config=tiny_config("mistral"), vision_config=vision,
                                    tie_word_embeddings=tied)).float().eval()  # fmt: skip
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral3"
    llm = LLM(model=str(tmp_path))
    assert llm.engine.spec.model_type == "mistral"
    assert_logits_match(llm, hf, [(11 * i + 5) % 250 + 3 for i in range(29)], GREEDY, monkeypatch)


def _tiny_qwen_vl(kind: str):
    """A tiny Qwen2-VL, Qwen2.5-VL or Qwen3-VL (vision tower and multimodal RoPE sections included)."""
    import transformers

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    base = {"qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3-moe"}.get(kind, "qwen2")
    # (the experts' width apart from hidden / 2: their stacked layouts' shapes then differ)
    text = tiny_config(base, **({"moe_intermediate_size": 16} if kind == "qwen3_vl_moe" else {})).to_dict()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3],
                               **({"mrope_interleaved": True} if kind.startswith("qwen3") else {})}  # fmt: skip
    text.pop("model_type", None)
    if kind == "qwen3_vl_moe":
        text["norm_topk_prob"] = False  # (its router rescales the top-k all the same)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
        return transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(text_config=text,
                                                                                             vision_config=vision))
    if kind == "qwen3_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
        return transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(text_config=text, vision_config=vision))
    if kind == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
        return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(text_config=text,
                                                                                             vision_config=vision))
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14)
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(text_config=text, vision_config=vision))


def test_qwen3_vl_moe_serves_its_language_model_from_either_layout_of_its_stacked_experts(tmp_path, monkeypatch):
    """Qwen3-VL-MoE (Qwen3-VL-30B-A3B's family): a Qwen3-MoE whose experts are stacked in two tensors
    a layer, as transformers 5 saves them (linear weights) and as the hub's files hold them (their
    transposes); its router rescales the top-k even when norm_topk_prob says not to."""
    from safetensors.torch import load_file, save_file

    hf = _tiny_qwen_vl("qwen3_vl_moe").float().eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path))
    spec = llm.engine.spec
    assert (spec.model_type, spec.moe.num_experts, spec.moe.normalize_top_k) == ("qwen3_moe", 8, True)
    prompt = [(11 * i + 5) % 250 + 3 for i in range(29)]
    assert_logits_match(llm, hf, prompt, GREEDY, monkeypatch)
    llm.close()
    weights = load_file(tmp_path / "model.safetensors")
    stacked = [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert stacked and weights[stacked[0]].shape[0] == 8
    save_file({n: t.transpose(1, 2).contiguous() if n in stacked else t for n, t in weights.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})  # the hub's layout
    hub = LLM(model=str(tmp_path))
    experts = [p for n, p in hub.engine.model.named_parameters() if ".experts." in n]
    assert experts and all(p.is_contiguous() for p in experts)  # (the CPU kernel takes only those)
    assert_logits_match(hub, hf, prompt, GREEDY, monkeypatch)
    save_file({n: t[:, :-1].contiguous() if n.endswith("down_proj") else t for n, t in weights.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="are not a layer's stacked experts"):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_language_model_of_a_qwen_vl_checkpoint_serves(kind, tmp_path, monkeypatch):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: their language model serves text (each text token has the same
    position in the three sections of their multimodal RoPE: plain RoPE), the vision tower left out;
    also from the hub's Qwen2.5-VL config, whose text fields are at its top level with rope_scaling "mrope"."""
    hf = _tiny_qwen_vl(kind).float().eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path))
    assert llm.engine.spec.model_type == ("qwen3" if kind == "qwen3_vl" else "qwen2")
    prompt = [(11 * i + 5) % 250 + 3 for i in range(29)]
    assert_logits_match(llm, hf, prompt, GREEDY, monkeypatch)
    if kind != "qwen2_5_vl":
        return
    cfg = json.loads((tmp_path / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    hub = {**cfg, **{k: v for k, v in text.items() if k != "model_type"}, "rope_theta": rope["rope_theta"],
           "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert_logits_match(LLM(model=str(tmp_path)), hf, prompt, GREEDY, monkeypatch)
