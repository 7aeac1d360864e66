"""The fused decode layers (two C calls per layer) give the per-operation path's results bit for bit,
are used exactly where they should be, and refuse what the C code cannot take."""

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.kernels.decode_layer import DecodeLayerKernel, LayerArgs, LayerShape, StepArgs
from cachedattention.model.fused_decode import FusedDecode
from tests.util import capture_logits, rel_err

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NO_PREFIX_CACHE = CacheConfig(enable_prefix_cache=False)  # a second run computes exactly what the first did
PROMPTS = [[(5 * i + j) % 250 + 1 for i in range(n)] for j, n in enumerate((5, 40, 17))]


def count_fused_steps(monkeypatch) -> list[int]:
    calls = []
    real = FusedDecode.run

    def spy(self, x, batch, cos, sin):
        calls.append(x.shape[0])
        return real(self, x, batch, cos, sin)

    monkeypatch.setattr(FusedDecode, "run", spy)
    return calls


def logits_of(llm, monkeypatch, run) -> list[torch.Tensor]:
    seen = capture_logits(monkeypatch)
    run(llm)
    out = list(seen)
    seen.clear()
    return out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])  # qwen2: q/k/v biases; qwen3: head norms
def test_fused_layers_equal_the_per_operation_path_bit_for_bit(kind, tiny_dirs, monkeypatch):
    path, _ = tiny_dirs[kind]
    llm = LLM(model=str(path), cache=NO_PREFIX_CACHE)
    runner = llm.engine.runner
    assert runner.fused_decode is not None  # this machine builds the kernels
    steps = count_fused_steps(monkeypatch)
    with_fused = logits_of(llm, monkeypatch, lambda m: m.generate(PROMPTS, GREEDY))
    assert steps == [3] * (GREEDY.max_tokens - 1)  # every step after the prefill: all rows are decoders
    runner.fused_decode = None
    per_op = logits_of(llm, monkeypatch, lambda m: m.generate(PROMPTS, GREEDY))
    assert len(steps) == GREEDY.max_tokens - 1  # not called again
    assert len(with_fused) == len(per_op) == len(PROMPTS) * GREEDY.max_tokens
    assert all(torch.equal(a, b) for a, b in zip(with_fused, per_op))


@pytest.mark.parametrize("sessions", [1, 2])
def test_the_store_gets_the_same_pre_rope_kv_from_fused_steps(sessions, tiny_dirs, monkeypatch):
    """The answers' K/V is saved by decode steps (each step hands every layer over at once, each
    sequence's rows sliced out of it): next turns reusing it see the same logits."""
    path, _ = tiny_dirs["llama"]
    # with two sessions, no device prefix cache: every reused token comes from the saved segments
    cache = None if sessions == 1 else NO_PREFIX_CACHE

    def conversation(llm):
        convs = [list(range(5 + 7 * i, 45 + 7 * i)) for i in range(sessions)]
        for t in range(3):
            outs = llm.generate(convs, GREEDY, session_id=[f"s{i}" for i in range(sessions)])
            convs = [c + o.token_ids + [10 + t, 11 + t] for c, o in zip(convs, outs)]
            llm.engine.store.store.flush()
        return outs

    runs = []
    for use_fused in (True, False):
        llm = LLM(model=str(path), enable_store=True, cache=cache)
        if not use_fused:
            llm.engine.runner.fused_decode = None
        seen, steps = capture_logits(monkeypatch), count_fused_steps(monkeypatch)
        last_turn = conversation(llm)
        runs.append(list(seen))
        assert (max(steps) if steps else 0) == (sessions if use_fused else 0)  # answers' K/V from fused steps
        monkeypatch.undo()
        for out in last_turn:
            tiers = out.metrics.cached_tokens
            assert tiers["host"] + tiers["disk"] > (0 if sessions == 1 else 40), tiers  # beyond the first prompt
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))


def test_embedded_gguf_blocks_fused_equal_per_operation(embedded_llm, monkeypatch):
    runner = embedded_llm.engine.runner
    fused = runner.fused_decode
    assert fused is not None and fused.layers  # the embedded model's Q4_1 layers
    steps = count_fused_steps(monkeypatch)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [[100 + i for i in range(14)], [200 + i for i in range(9)]]  # under a page: no prefix-cache hit
    try:
        with_fused = logits_of(embedded_llm, monkeypatch, lambda m: m.generate(prompts, params))
        runner.fused_decode = None
        per_op = logits_of(embedded_llm, monkeypatch, lambda m: m.generate(prompts, params))
    finally:
        runner.fused_decode = fused
    assert steps == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(with_fused, per_op))


@pytest.mark.parametrize("how", ["parameter", "data", "kernel"])
def test_a_replaced_weight_turns_the_fused_path_off(how, tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), cache=NO_PREFIX_CACHE)
    model = llm.engine.model
    q = model.model.layers[1].self_attn.q_proj
    if how == "parameter":  # the described address would be stale
        q.weight = torch.nn.Parameter(q.weight.detach() * 0.5)
    elif how == "data":  # the same Parameter, new memory
        q.weight.data = q.weight.data * 0.5
    else:  # this layer's calls would go to torch, which the fused path does not reproduce
        q.few_rows = None
    steps = count_fused_steps(monkeypatch)
    changed = logits_of(llm, monkeypatch, lambda m: m.generate(PROMPTS, GREEDY))
    assert steps == []  # noticed, so every step took the per-operation path, with the new weight
    llm.engine.runner.fused_decode = None
    assert all(torch.equal(a, b) for a, b in zip(changed, logits_of(llm, monkeypatch, lambda m: m.generate(PROMPTS, GREEDY))))


def test_engines_sharing_a_model_each_fuse_over_their_own_pool(tiny_dirs, monkeypatch):
    """The demo runs CachedAttention and a recompute engine on one loaded model, turn by turn: each
    engine's decode steps take its own fused layers, and give the same logits as the other's."""
    path, _ = tiny_dirs["llama"]
    first = LLM(model=str(path), cache=NO_PREFIX_CACHE)
    second = LLM.from_config(first.engine.config, loaded=first.engine.loaded)
    assert second.engine.model is first.engine.model and second.engine.pool is not first.engine.pool
    steps = count_fused_steps(monkeypatch)
    runs = [logits_of(llm, monkeypatch, lambda m: m.generate(PROMPTS, GREEDY)) for llm in (first, second, first)]
    assert steps == [3] * (3 * (GREEDY.max_tokens - 1))  # no engine's steps fell back
    assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))


@pytest.fixture(scope="module")
def kernel() -> DecodeLayerKernel:
    loaded = DecodeLayerKernel.load()
    assert loaded is not None, "this machine has a C compiler and AVX-512: the kernel must build"
    return loaded


def small_layer(shape: LayerShape, num_slots: int, **replace) -> LayerArgs:
    gen = torch.Generator().manual_seed(0)
    linears = {name: (torch.randn(*dims, generator=gen), None) for name, dims in shape.linear_shapes().items()}
    linears.update(replace)
    norms = (torch.ones(shape.hidden), torch.ones(shape.hidden))
    pools = (torch.zeros(num_slots, shape.kv_heads, shape.head_dim), torch.zeros(num_slots, shape.kv_heads, shape.head_dim))
    return LayerArgs(shape, linears, norms, pools)


def test_refuses_bad_layouts_and_slots_with_a_clear_error(kernel):
    shape = LayerShape(hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, eps=1e-6)
    with pytest.raises(ValueError, match="the q weight"):
        small_layer(shape, 32, q=(torch.zeros(32, 31), None))
    with pytest.raises(ValueError, match="the down weight"):
        small_layer(shape, 32, down=(torch.zeros(64, 32).t(), None))  # the right shape, not contiguous
    with pytest.raises(ValueError, match="the k bias"):
        small_layer(shape, 32, k=(torch.zeros(16, 32), torch.zeros(15)))
    layer = small_layer(shape, 32)
    rows = 2
    decoders = (torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 2]), torch.tensor([3, 5]))
    cos = sin = torch.zeros(rows, 1, 16)
    with pytest.raises(ValueError, match="one slot per row"):
        StepArgs(shape, torch.randn(rows, 32), cos, sin, torch.tensor([3]), decoders, 16, 32)
    step = StepArgs(shape, torch.randn(rows, 32), cos, sin, torch.tensor([3, 32]), decoders, 16, 32)
    k_pre, v = torch.zeros(rows, 16), torch.zeros(rows, 16)
    kernel.layer_in(layer, step, False, k_pre, v)
    pools = [p.clone() for p in layer.keep[2]]
    with pytest.raises(ValueError, match="out of range"):
        kernel.layer_out(layer, step, k_pre, v)  # slot 32 of a 32-slot pool
    assert all(torch.equal(a, b) for a, b in zip(pools, layer.keep[2]))  # found before anything was written


def test_steps_with_lora_adapters_fused_equal_the_per_operation_path_bit_for_bit(tiny_dirs, tmp_path, monkeypatch):
    """Decoders of two adapters (one of them on rows apart) and of the base model in one fused step:
    each linear layer adds its adapters' shares in C, as the per-operation path adds them."""
    from cachedattention import LoRARequest
    from tests.lora_files import hand_written_adapter, llama_adapter_pairs

    path, hf = tiny_dirs["qwen3"]  # (head norms between the projections and the rotation)
    pairs = llama_adapter_pairs(hf.config, [0, 1, 2])
    hand_written_adapter(tmp_path / "a", pairs, r=8, seed=1)
    hand_written_adapter(tmp_path / "b", {k: v for k, v in pairs.items() if "layers.1." not in k}, r=4, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), cache=NO_PREFIX_CACHE, enable_lora=True, max_loras=2)
    prompts, loras = [*PROMPTS, PROMPTS[0]], [a, None, a, b]
    runner = llm.engine.runner
    steps = count_fused_steps(monkeypatch)
    with_fused = logits_of(llm, monkeypatch, lambda m: m.generate(prompts, GREEDY, lora_request=loras))
    assert steps == [4] * (GREEDY.max_tokens - 1)
    runner.fused_decode = None
    per_op = logits_of(llm, monkeypatch, lambda m: m.generate(prompts, GREEDY, lora_request=loras))
    assert len(with_fused) == len(per_op) == len(prompts) * GREEDY.max_tokens
    assert all(torch.equal(x, y) for x, y in zip(with_fused, per_op))
    assert rel_err(with_fused[-4], with_fused[-1]) > 1e-3  # (one prompt, adapters a and b: they change the logits)
