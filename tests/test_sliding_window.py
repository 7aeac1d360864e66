"""Sliding-window attention (Mistral 7B v0.1, Qwen with use_sliding_window): a windowed layer's query
sees only the last `sliding_window` keys, in every attention path (a whole prompt, a chunk over its
context, a lone decoder, padded decode groups, the split long-prompt path beside it), against
transformers. The store keeps every token: its equivalence and truncation tests run windowed too."""

import json

import pytest
import torch

from cachedattention import LLM, SamplingParams, SchedulerConfig
from cachedattention.kernels.paged_decode import PagedDecodeKernel
from cachedattention.model.spec import spec_from_hf_config
from tests.tiny_models import hf_greedy, make_tiny_model
from tests.util import capture_logits, rel_err

BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 512}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("config, window, layers", [
    ({"model_type": "mistral", "sliding_window": 128}, 128, (0, 1, 2, 3)),
    ({"model_type": "mistral", "sliding_window": None}, None, ()),
    ({"model_type": "mistral", "sliding_window": 512}, None, ()),  # no shorter than the context: never cuts
    ({"model_type": "qwen2", "sliding_window": 128}, None, ()),  # named, not used
    # transformers' default max_window_layers (28): no layer of four; its default window (4096), when none is named
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128}, None, ()),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1, "max_position_embeddings": 8192},
     4096, (1, 2, 3)),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 0}, 128,
     (0, 1, 2, 3)),
    ({"model_type": "qwen2_moe", "use_sliding_window": True, "sliding_window": 128}, 128, (0, 2)),
    ({"model_type": "mistral", "sliding_window": 128, "max_position_embeddings": None}, 128, (0, 1, 2, 3)),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 3}, 128, (3,)),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 128,
      "layer_types": ["full_attention", "sliding_attention"] * 2}, 128, (1, 3)),
    ({"model_type": "qwen3", "sliding_window": 128, "layer_types": ["sliding_attention"] * 4}, None, ()),
    ({"model_type": "llama", "sliding_window": 128}, None, ()),  # Llama has none
    ({"model_type": "granite", "sliding_window": 128, "layer_types": ["sliding_attention"] * 4}, None, ()),  # nor Granite
    ({"model_type": "mistral", "max_position_embeddings": 8192}, 4096, (0, 1, 2, 3)),  # transformers' default window
    ({"model_type": "qwen3_moe", "use_sliding_window": True, "sliding_window": 128,
      "layer_types": ["full_attention"] * 4}, 128, (0, 1, 2, 3)),  # its modeling windows every layer
    ({"model_type": "phi3", "sliding_window": 128}, 128, (0, 1, 2, 3)),  # Phi-3-mini-4k's (2047)
    ({"model_type": "ministral", "sliding_window": 128,
      "layer_types": ["sliding_attention", "full_attention"] * 2}, 128, (0, 2)),  # Ministral 8B's interleaving
])  # fmt: skip
def test_windows_are_read_as_transformers_reads_them(config, window, layers):
    spec = spec_from_hf_config({**BASE, **config})
    assert (spec.sliding_window, spec.window_layers) == (window, layers)
    assert [spec.window(i) for i in range(4)] == [window if i in layers else None for i in range(4)]


@pytest.mark.parametrize("window", [0.5, "8", -4, True])
def test_a_malformed_window_is_refused(window, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "mistral", "sliding_window": window}))
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        LLM(model=str(tmp_path))


def test_the_window_is_part_of_the_fingerprint():
    a = spec_from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 128})
    b = spec_from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 64})
    assert a.fingerprint() != b.fingerprint() != spec_from_hf_config({**BASE, "model_type": "mistral"}).fingerprint()


PROMPTS = [[(7 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((5, 30, 17, 50))]


@pytest.mark.parametrize("kind", ["mistral-window", "qwen2-window"])
def test_chunked_prompts_and_batched_decoders_equal_transformers(kind, tiny_dirs):
    """Chunks of 16 tokens over a context the window cuts; four decoders at once, through the paged
    kernel from each window's first token (a CPU with a compiler), and in padded groups: the same
    tokens, and each token's log-probability, as transformers (greedy tokens alone can miss a window
    one token off)."""
    path, hf = tiny_dirs[kind]
    expect = [hf_greedy(hf, p, 12) for p in PROMPTS]
    with torch.no_grad():
        ref = [torch.log_softmax(hf(torch.tensor([p + e])).logits[0, len(p) - 1 : -1], -1) for p, e in zip(PROMPTS, expect)]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    assert llm.engine.runner.fused_decode is None  # the fused C layers attend whole contexts
    assert llm.engine.runner.decode_kernel is not None or PagedDecodeKernel.load() is None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    for attempt in ("paged kernel", "padded groups"):
        outs = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == expect, attempt
        for out, lp in zip(outs, ref):
            got = torch.tensor([t.logprob for t in out.logprobs])
            assert (got - lp[torch.arange(12), out.token_ids]).abs().max() <= 1e-4, attempt
        llm.engine.runner.decode_kernel = None  # then the padded groups' window mask


def test_a_long_prompt_over_a_long_history_splits_only_its_full_layers(tmp_path, monkeypatch):
    """Layer 0 (full) takes the split history-then-new path; the windowed layers take the band."""
    hf = make_tiny_model("qwen2-window", tmp_path, max_position_embeddings=4096)
    llm = LLM(model=str(tmp_path), enable_store=True)
    history = [(5 * i) % 250 + 3 for i in range(2100)]
    first = llm.generate([history], SamplingParams(max_tokens=1, temperature=0), session_id="s")[0]
    llm.engine.store.store.flush()
    prompt = history + first.token_ids + [(3 * i) % 250 + 3 for i in range(120)]
    from cachedattention.model import llama

    split_calls = []
    split = llama.attend_history_then_new
    monkeypatch.setattr(llama, "attend_history_then_new", lambda *a: split_calls.append(1) or split(*a))
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), session_id="s")[0]
    assert out.metrics.num_cached_tokens >= 2048  # so the split path applies to layer 0
    assert len(split_calls) == 1  # layer 0's, in the prompt's one step; not the windowed layers 1 and 2
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= 1e-4


def test_vllm_s_disable_sliding_window_caps_the_window_at_the_model_s(tiny_dirs, monkeypatch):
    """vLLM's disable_sliding_window: the window no longer than the sliding window (8 tokens here),
    where the answers are those of the windowed model; a longer window asked for is refused, and a
    model without a window is served as it is."""
    from cachedattention.cli import build_parser, engine_config

    path = str(tiny_dirs["mistral-window"][0])
    capped = LLM(model=path, disable_sliding_window=True)
    assert capped.engine.max_model_len == 8 and LLM(model=path).engine.max_model_len == 512
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    assert (capped.generate([[3, 4, 5, 6]], params, use_tqdm=False)[0].token_ids
            == LLM(model=path).generate([[3, 4, 5, 6]], params, use_tqdm=False)[0].token_ids)  # fmt: skip
    assert LLM(model=path, disable_sliding_window=True, max_model_len=6).engine.max_model_len == 6
    with pytest.raises(ValueError, match="max_model_len 9 is past the sliding window .8 tokens."):
        LLM(model=path, disable_sliding_window=True, max_model_len=9)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # (as vLLM: the variable lets it past the cap)
    assert LLM(model=path, disable_sliding_window=True, max_model_len=9).engine.max_model_len == 9
    assert LLM(model=str(tiny_dirs["llama"][0]), disable_sliding_window=True).engine.max_model_len == 512
    assert engine_config(build_parser().parse_args(["serve", "m", "--disable-sliding-window"])).disable_sliding_window
