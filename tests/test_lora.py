"""LoRA adapters (PEFT folders, vLLM's LoRARequest): logits equal PEFT's over the same base model,
every family's weight changes at load applied to B too, a step mixing adapters and the base
model, KV keyed by adapter in every tier, and refusals that say why."""

from __future__ import annotations

import json

import pytest
import torch

from cachedattention import LLM, LoRARequest, SamplingParams
from cachedattention.errors import InvalidRequest
from tests.lora_files import ATTENTION, MLP, hand_written_adapter, write_adapter
from tests.util import capture_logits, rel_err, run_to_end

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [1, 5, 9, 33, 70, 2, 17, 40, 41, 8]


def lora_outputs(llm, prompt, lora, monkeypatch, params=GREEDY):
    """The engine's output for `prompt` with adapter `lora` and every logits row it sampled from."""
    seen = capture_logits(monkeypatch)
    out = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0]
    monkeypatch.undo()
    return out, seen


def assert_matches_peft(llm, peft, prompt, lora, monkeypatch, limit=1e-4):
    out, seen = lora_outputs(llm, prompt, lora, monkeypatch)
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([prompt + out.token_ids])).logits[0]
    assert len(seen) == len(out.token_ids)
    for step, logits in enumerate(seen):
        assert rel_err(logits, ref[len(prompt) - 1 + step]) <= limit, f"step {step}"
    return out


# each family's changes at load: llama plain; phi3 fused q/k/v and gate/up split; granite its
# multipliers folded into q/o/down; glm half-rotary pairs reordered, fused gate/up; phi4-mini partial
# rotary reordered and longrope's factor in q; qwen3 q/k norms after the projections; gemma3 windows
# and a query scale; mixtral and qwen2-moe: attention (and qwen2-moe's shared expert) beside experts
FAMILIES = {
    "llama": ATTENTION + MLP, "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "granite": ATTENTION + MLP, "glm": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi4-mini": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "qwen3": ATTENTION + MLP,
    "gemma3": ATTENTION + MLP, "mixtral": ATTENTION, "qwen2-moe": [*ATTENTION, "shared_expert.gate_proj",
                                                                   "shared_expert.up_proj", "shared_expert.down_proj"],
}  # fmt: skip


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_an_adapter_s_logits_equal_peft_s(kind, tiny_dirs, tmp_path, monkeypatch):
    path, hf = tiny_dirs[kind]
    peft = write_adapter(path, tmp_path / "adapter", FAMILIES[kind])
    llm = LLM(model=str(path), enable_lora=True, max_lora_rank=8)
    out = assert_matches_peft(llm, peft, PROMPT, LoRARequest("a", 1, str(tmp_path / "adapter")), monkeypatch)
    base = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    with torch.no_grad():  # the base model's answer is the base model's: the adapter added nothing to it
        ref = hf(input_ids=torch.tensor([PROMPT + base.token_ids])).logits[0, len(PROMPT) - 1]
    seen = capture_logits(monkeypatch)
    assert llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids == base.token_ids
    assert rel_err(seen[0], ref) <= 1e-4
    with torch.no_grad():  # and the adapter changes the answer's logits enough to matter
        adapted = peft(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    assert rel_err(adapted, ref) > 1e-2
    assert out.token_ids  # (decode steps ran through the adapter too: every logits row was compared)


def test_rslora_alpha_pattern_rank_pattern_and_some_layers(tiny_dirs, tmp_path, monkeypatch):
    """rsLoRA's alpha / sqrt(r), alpha_pattern's own alpha and rank_pattern's own rank for a module
    (decode steps through the fused layers: each linear layer's rank its own), some layers only."""
    path, _ = tiny_dirs["llama"]
    peft = write_adapter(path, tmp_path / "a", ["q_proj", "v_proj", "down_proj"], r=8, use_rslora=True,
                         alpha_pattern={"down_proj": 3}, rank_pattern={"q_proj": 2}, layers_to_transform=[0, 2])  # fmt: skip
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["alpha_pattern"] == {"down_proj": 3}
    llm = LLM(model=str(path), enable_lora=True, max_lora_rank=8)
    assert_matches_peft(llm, peft, PROMPT, LoRARequest("a", 1, str(tmp_path / "a")), monkeypatch)


def test_one_step_mixes_adapters_and_the_base_model(tiny_dirs, tmp_path, monkeypatch):
    """Prompts of two adapters and of none in one generate call (the same adapter on rows apart:
    grouped by index) give what each gives alone."""
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION + MLP, seed=1)
    write_adapter(path, tmp_path / "b", ["q_proj", "v_proj"], r=2, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), enable_lora=True, max_loras=2, max_lora_rank=8)
    prompts = [PROMPT, PROMPT[:7], PROMPT[2:], PROMPT[1:9]]
    loras = [a, b, a, None]
    steps = []
    real = llm.engine.runner.build_batch

    def spy(scheduled, hooks):
        batch = real(scheduled, hooks)
        steps.append(batch[0].lora)
        return batch

    llm.engine.runner.build_batch = spy
    together = llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)
    llm.engine.runner.build_batch = real
    groups = [len(s.groups) for s in steps if s is not None]
    assert max(groups) == 2 and any(isinstance(g.rows, torch.Tensor) for s in steps if s for g in s.groups)
    alone = [llm.generate([p], GREEDY, lora_request=r, use_tqdm=False)[0] for p, r in zip(prompts, loras)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in alone[:3]}) > 1  # (the adapters answer otherwise)


def test_max_loras_bounds_the_adapters_of_a_step(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), enable_lora=True, max_loras=1, max_cpu_loras=2)
    per_step = []
    real = llm.engine.runner.build_batch

    def spy(scheduled, hooks):
        per_step.append({s.request.lora.name if s.request.lora else None for s in scheduled})
        return real(scheduled, hooks)

    llm.engine.runner.build_batch = spy
    queued = [llm.engine.add_request(PROMPT, GREEDY, lora_request=r) for r in (a, b, None)]
    stats = llm.engine.stats()  # (vLLM's lora_requests_info: the adapters waiting and running)
    assert (stats["lora_max"], stats["lora_waiting"], stats["lora_running"]) == (1, ["a", "b"], [])
    llm.engine.step()
    assert (llm.engine.stats()["lora_waiting"], llm.engine.stats()["lora_running"]) == (["b"], ["a"])
    outs = run_to_end(llm, queued)
    assert all(len(names - {None}) <= 1 for names in per_step), per_step
    assert any(names == {"a", None} for names in per_step)  # the base model's request runs beside an adapter's
    llm.engine.runner.build_batch = real
    assert [o.token_ids for o in outs] == [llm.generate([PROMPT], GREEDY, lora_request=r, use_tqdm=False)[0].token_ids
                                           for r in (a, b, None)]  # fmt: skip


def test_adapters_past_max_cpu_loras_are_read_again(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), enable_lora=True)
    first = [llm.generate([PROMPT], GREEDY, lora_request=r, use_tqdm=False)[0].token_ids for r in (a, b)]
    assert [x.name for x in llm.engine.loras.loaded()] == ["b"]
    again = [llm.generate([PROMPT], GREEDY, lora_request=r, use_tqdm=False)[0].token_ids for r in (a, b)]
    assert first == again and first[0] != first[1]


def session_turns(llm, lora, session, turns=3):
    conv, outs = list(range(5, 40)), []
    for t in range(turns):
        out = llm.generate([conv], GREEDY, session_id=session, lora_request=lora, use_tqdm=False)[0]
        outs.append(out)
        conv = conv + out.token_ids + [10 + t, 11 + t]
        if llm.engine.store is not None:
            llm.engine.store.store.flush()
    return outs


def test_a_session_s_kv_is_kept_apart_by_adapter_in_every_tier(tiny_dirs, tmp_path):
    """Turns with an adapter reuse that adapter's KV (host, then disk after a restart) and equal
    recompute with it; the same session id with the base model or another adapter reuses none of it."""
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION + MLP, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION + MLP, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    plain = LLM(model=str(path), enable_lora=True, enable_prefix_caching=False)
    ref = {r: session_turns(plain, r, None) for r in (a, b, None)}
    store = tmp_path / "store"
    llm = LLM(model=str(path), enable_lora=True, enable_prefix_caching=False, store_dir=str(store))
    got = session_turns(llm, a, "s")
    assert [o.token_ids for o in got] == [o.token_ids for o in ref[a]]
    assert all(o.metrics.cached_tokens["host"] > 0 for o in got[1:])
    for other in (b, None):  # the same conversation, another model: nothing of a's reused
        out = session_turns(llm, other, "s", turns=1)[0]
        assert out.token_ids == ref[other][0].token_ids and sum(out.metrics.cached_tokens.values()) == 0
    llm.engine.store.check_integrity()
    llm.close()
    # a new engine on the same folder, the adapter read again (its fingerprint is its files'): from disk
    again = LLM(model=str(path), enable_lora=True, enable_prefix_caching=False, store_dir=str(store))
    conv = list(range(5, 40)) + got[0].token_ids + [10, 11]
    out = again.generate([conv], GREEDY, session_id="s", lora_request=LoRARequest("renamed", 7, str(tmp_path / "a")),
                         use_tqdm=False)[0]  # fmt: skip
    assert out.token_ids == ref[a][1].token_ids and out.metrics.cached_tokens["disk"] > 0
    assert again.forget_session("s", lora_request=a) and not again.forget_session("s", lora_request=a)
    assert again.forget_session("s")  # the base model's turn of it was kept apart, and is forgotten apart
    again.close()


def test_the_device_prefix_cache_is_kept_apart_by_adapter(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    a = LoRARequest("a", 1, str(tmp_path / "a"))
    llm = LLM(model=str(path), enable_lora=True, block_size=4)
    prompt = list(range(5, 45))
    llm.generate([prompt], GREEDY, lora_request=a, use_tqdm=False)
    base = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert base.metrics.cached_tokens["device"] == 0
    again = llm.generate([prompt], GREEDY, lora_request=a, use_tqdm=False)[0]
    assert again.metrics.cached_tokens["device"] > 0


def damage(folder, kind):
    if kind == "dora":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    elif kind == "bias":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    elif kind in ("alpha-not-a-number", "alpha-not-a-regex", "alpha-flags-inside"):
        config = json.loads((folder / "adapter_config.json").read_text())
        pattern = {"alpha-not-a-number": {"down_proj": "3"}, "alpha-not-a-regex": {"down_proj(": 3},
                   "alpha-flags-inside": {"(?i)down_proj": 3}}[kind]  # (flags: not where PEFT's pattern puts them)
        (folder / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": pattern}))
    elif kind == "not-json":
        (folder / "adapter_config.json").write_text("{")
    elif kind == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif kind == "truncated":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "bin-not-a-pickle":
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(b"\x80\x02garbage" * 10)
    elif kind == "rank-zero":
        from safetensors.torch import save_file

        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(0, 64),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 0)},
                  folder / "adapter_model.safetensors")  # fmt: skip
    elif kind in ("alpha-infinite", "alpha-past-float"):
        text = (folder / "adapter_config.json").read_text()
        config = json.loads(text)
        huge = "1e400" if kind == "alpha-infinite" else "1" + "0" * 400
        (folder / "adapter_config.json").write_text(text.replace(f'"lora_alpha": {config["lora_alpha"]}',
                                                                 f'"lora_alpha": {huge}'))  # fmt: skip
    elif kind == "half-a-pair":
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" not in k},
                  folder / "adapter_model.safetensors")  # fmt: skip


@pytest.mark.parametrize(("kind", "says"), [
    ("dora", "DoRA"), ("bias", "biases"), ("not-json", "not valid JSON"), ("no-weights", "has neither"),
    ("alpha-not-a-number", "must be a positive number"), ("alpha-not-a-regex", "not a regular expression"),
    ("alpha-flags-inside", "not a regular expression"), ("bin-not-a-pickle", "not a readable PyTorch state dict"),
    ("rank-zero", "are not an"), ("alpha-infinite", "must be a positive number"),
    ("alpha-past-float", "must be a positive number"),
    ("truncated", "not a readable safetensors"), ("half-a-pair", "without its other half"),
])  # fmt: skip
def test_a_damaged_or_unsupported_adapter_is_refused_saying_why(kind, says, tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION)
    damage(tmp_path / "a", kind)
    llm = LLM(model=str(path), enable_lora=True)
    with pytest.raises(InvalidRequest, match=says):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("a", 1, str(tmp_path / "a")), use_tqdm=False)
    assert llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids  # the engine serves on
    assert not llm.engine.requests or all(r.is_finished for r in llm.engine.requests.values())


@pytest.mark.parametrize(("kind", "targets", "says"), [
    ("llama", ["embed_tokens"], "embedding LoRA"), ("llama", ["lm_head"], "not a layer adapters may target"),
    ("mixtral", {"model.layers.0.block_sparse_moe.experts.0.w1": (48, 64)}, "not a layer adapters may target"),
    ("qwen2-moe", {"model.layers.0.mlp.gate": (8, 64)}, "not a layer adapters may target"),
])  # fmt: skip
def test_adapters_on_layers_not_served_are_refused(kind, targets, says, tiny_dirs, tmp_path):
    path, _ = tiny_dirs[kind]
    if isinstance(targets, dict):  # (PEFT itself refuses these modules of transformers' mixtures)
        hand_written_adapter(tmp_path / "a", targets)
    else:
        write_adapter(path, tmp_path / "a", targets)
    llm = LLM(model=str(path), enable_lora=True)
    with pytest.raises(InvalidRequest, match=says):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("a", 1, str(tmp_path / "a")), use_tqdm=False)


def test_requests_and_settings_lora_cannot_serve_are_refused(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    other, _ = tiny_dirs["qwen3"]
    write_adapter(path, tmp_path / "a", ATTENTION, r=8)
    write_adapter(other, tmp_path / "q", ATTENTION)
    a = LoRARequest("a", 1, str(tmp_path / "a"))
    with pytest.raises(InvalidRequest, match="enable_lora"):
        LLM(model=str(path)).generate([PROMPT], GREEDY, lora_request=a, use_tqdm=False)
    llm = LLM(model=str(path), enable_lora=True)  # max_lora_rank 16, as vLLM's
    small = LLM(model=str(path), enable_lora=True, max_lora_rank=4, loaded=llm.engine.loaded)
    with pytest.raises(InvalidRequest, match="greater than max_lora_rank 4"):
        small.generate([PROMPT], GREEDY, lora_request=a, use_tqdm=False)
    with pytest.raises(InvalidRequest, match="another base model"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("q", 2, str(tmp_path / "q")), use_tqdm=False)
    phi3, _ = tiny_dirs["phi3"]  # a fused weight's rows the model cannot split
    hand_written_adapter(tmp_path / "fused", {"model.layers.0.self_attn.qkv_proj": (100, 64)})
    with pytest.raises(InvalidRequest, match="another base model"):
        LLM(model=str(phi3), enable_lora=True).generate([PROMPT], GREEDY, use_tqdm=False,
                                                        lora_request=LoRARequest("f", 4, str(tmp_path / "fused")))
    for folder, says in ((str(tmp_path / "none"), "is not a folder"), ("/" + "x" * 300, "is not a folder"),
                         ("~no-such-user-here/a", "names no user")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=says):
            llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("x", 3, folder), use_tqdm=False)
    with pytest.raises(ValueError, match="LoRARequest"):
        llm.generate([PROMPT], GREEDY, lora_request=str(tmp_path / "a"), use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([PROMPT, PROMPT], GREEDY, lora_request=[a], use_tqdm=False)
    with pytest.raises(ValueError, match="at least 1"):
        LoRARequest("a", 0, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no lora_path"):
        LoRARequest("a", 1)
    with pytest.raises(InvalidRequest, match="NUL"):
        llm.generate([{"prompt_token_ids": PROMPT, "cache_salt": "\0lora\0x"}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(model=str(path), enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="lora_dtype"):
        LLM(model=str(path), enable_lora=True, lora_dtype="float16")
    assert LoRARequest("a", 1, lora_local_path="/x") == LoRARequest("a", 9, "/y")  # vLLM's: one name, one adapter


@pytest.mark.parametrize("kind", ["llama", "phi4-mini", "qwen3"])
def test_an_adapter_over_a_gguf_file_s_weights_equals_peft_s(kind, tmp_path, monkeypatch):
    """The base model from a GGUF file (llama.cpp's q/k rows permuted, Phi-3's fused rows), its
    adapter trained on the Hugging Face checkpoint of the same weights."""
    from tests.gguf_files import write_tiny_gguf

    write_tiny_gguf(kind, tmp_path)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if kind == "phi4-mini" else ATTENTION + MLP
    peft = write_adapter(tmp_path / "hf", tmp_path / "adapter", targets)
    llm = LLM(model=str(tmp_path / "model.gguf"), enable_lora=True)
    assert_matches_peft(llm, peft, PROMPT, LoRARequest("a", 1, str(tmp_path / "adapter")), monkeypatch)


def test_an_adapter_equals_its_weights_merged_into_the_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    """Without PEFT: an adapter written by hand gives the logits of the checkpoint with W + alpha / r * B A."""
    import transformers

    from tests.lora_files import llama_adapter_pairs, merged_checkpoint

    path, hf = tiny_dirs["llama"]
    hand_written_adapter(tmp_path / "a", llama_adapter_pairs(hf.config, [0, 2]))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_checkpoint(path, tmp_path / "a", tmp_path / "m"))
    llm = LLM(model=str(path), enable_lora=True)
    assert_matches_peft(llm, merged.eval(), PROMPT, LoRARequest("a", 1, str(tmp_path / "a")), monkeypatch)


@pytest.mark.parametrize(("config", "says"), [
    ({"alora_invocation_tokens": [33, 70], "task_type": "CAUSAL_LM"}, "activated LoRA"),
    ({"init_lora_weights": "pissa"}, "initialised by 'pissa'"), ({"init_lora_weights": "olora"}, "initialised by 'olora'"),
])  # fmt: skip
def test_adapters_peft_computes_otherwise_are_refused(config, says, tiny_dirs, tmp_path):
    """aLoRA leaves the tokens before its invocation to the base model; PiSSA and OLoRA take the
    adapter's start out of the base weights, which PEFT rewrites when it loads them: served as a plain
    LoRA over the checkpoint's weights, each would answer otherwise than PEFT."""
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ["q_proj", "v_proj"], **config)
    llm = LLM(model=str(path), enable_lora=True)
    with pytest.raises(InvalidRequest, match=says):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("a", 1, str(tmp_path / "a")), use_tqdm=False)


def test_requests_of_an_adapter_let_go_meanwhile_still_run_together_on_one_copy(tiny_dirs, tmp_path):
    """With vLLM's defaults (one adapter a step, one kept loaded), requests alternating between two
    adapters: each adapter is read once while requests hold it, and its requests run together."""
    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), enable_lora=True)
    reads = []
    real_read = llm.engine.loras.read
    llm.engine.loras.read = lambda request: reads.append(request.lora_name) or real_read(request)
    rows_a = []
    real = llm.engine.runner.build_batch

    def spy(scheduled, hooks):
        rows_a.append(sum(1 for s in scheduled if s.request.lora is not None and s.request.lora.name == "a"))
        return real(scheduled, hooks)

    llm.engine.runner.build_batch = spy
    outs = llm.generate([PROMPT] * 8, GREEDY, lora_request=[a, b] * 4, use_tqdm=False)
    assert sorted(reads) == ["a", "b"] and max(rows_a) == 4
    assert len({tuple(o.token_ids) for o in outs[0::2]}) == 1 and outs[0].token_ids != outs[1].token_ids


def test_a_read_under_way_when_its_adapter_is_replaced_is_not_kept(tiny_dirs, tmp_path):
    """The server replaces an adapter's files in place (load_inplace) while the engine's thread is
    reading the old ones: later requests get the new files, not the read that finished last."""
    import shutil

    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "v1", ATTENTION, seed=1)
    write_adapter(path, tmp_path / "v2", ATTENTION, seed=2)
    shutil.copytree(tmp_path / "v1", tmp_path / "live")
    llm = LLM(model=str(path), enable_lora=True)
    registry, lora = llm.engine.loras, LoRARequest("x", 1, str(tmp_path / "live"))
    real = registry.read

    def read_then_replaced(request):
        old = real(request)
        shutil.copytree(tmp_path / "v2", tmp_path / "live", dirs_exist_ok=True)  # the operator's new files
        registry.replace(request, real(request))  # the route's load_inplace
        return old

    registry.read = read_then_replaced
    old = registry.adapter(lora)
    registry.read = real
    new = registry.adapter(lora)
    assert old.fingerprint != new.fingerprint and registry.loaded() == [new]
    assert registry.fingerprints("x") == {old.fingerprint, new.fingerprint}  # (a request ran with the old one)


def test_a_queue_head_whose_adapter_must_wait_holds_no_read_buffer(tiny_dirs, tmp_path):
    """With max_loras 1, a session's next turn with adapter b waits while a's request runs; it is not
    staged (its stored prefix's pages would hold up the requests behind it), so the base model's
    request behind it runs beside a's at once."""
    from cachedattention.engine.request import Status

    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    write_adapter(path, tmp_path / "b", ATTENTION, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    llm = LLM(model=str(path), enable_lora=True, max_loras=1, store_dir=str(tmp_path / "store"), num_pages=48,
              block_size=4, max_model_len=128, enable_prefix_caching=False)  # fmt: skip
    engine, conv = llm.engine, list(range(5, 75))
    first = llm.generate([conv], GREEDY, lora_request=b, session_id="s", use_tqdm=False)[0]
    engine.store.store.flush()
    long_a = engine.add_request([1, 5, 9, 33, 2, 7, 8], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                                lora_request=a)  # fmt: skip
    engine.step()
    turn = engine.add_request(conv + first.token_ids + [10, 11], GREEDY, lora_request=b, session_id="s")
    engine.step()
    assert not engine.requests[turn].staged
    base = engine.add_request([(7 * i) % 250 + 3 for i in range(120)], GREEDY)
    engine.step()
    assert engine.requests[base].status is Status.RUNNING and engine.requests[long_a].status is Status.RUNNING
    run_to_end(llm, [long_a, turn, base])
    engine.pages.check_integrity()


def test_adapters_past_max_cpu_loras_leave_memory_after_fused_steps(tiny_dirs, tmp_path):
    """The fused decode layers' tables of earlier steps' adapters keep none of them alive: past
    max_cpu_loras an adapter no request holds is let go, and read again from its folder."""
    import gc
    import shutil

    path, _ = tiny_dirs["llama"]
    write_adapter(path, tmp_path / "a", ATTENTION, seed=1)
    llm = LLM(model=str(path), enable_lora=True)
    assert llm.engine.runner.fused_decode is not None
    loras = []
    for i in range(4):
        shutil.copytree(tmp_path / "a", tmp_path / f"c{i}")
        loras.append(LoRARequest(f"c{i}", i + 1, str(tmp_path / f"c{i}")))
        llm.generate([PROMPT], GREEDY, lora_request=loras[-1], use_tqdm=False)
    gc.collect()
    assert len(llm.engine.loras.loaded()) == 1 and len(llm.engine.loras._alive) == 1
    write_adapter(path, tmp_path / "c0", ATTENTION, seed=2)  # c0's files change: it is read again
    again = llm.generate([PROMPT], GREEDY, lora_request=loras[0], use_tqdm=False)[0]
    assert again.token_ids == LLM(model=str(path), enable_lora=True).generate(
        [PROMPT], GREEDY, lora_request=LoRARequest("fresh", 9, str(tmp_path / "c0")), use_tqdm=False)[0].token_ids
