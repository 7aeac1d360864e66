"""Bad input raises ValueError with a message that says what is wrong."""

import json

import pytest

from cachedattention import LLM, SamplingParams
from tests.util import fail_sampling_for_seed


def test_missing_model_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model="/no/such/model")


def test_absolute_position_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="absolute position"):
        LLM(model=str(tmp_path))


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        LLM(model=str(tmp_path))


BASE_CONFIG = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 512}


def test_a_checkpoint_weight_the_model_has_no_place_for_is_refused(tiny_dirs, tmp_path):
    """A config that leaves out what its weights hold (here attention_bias and mlp_bias) would answer
    without those weights, wrongly: refused, naming them."""
    import shutil

    path, _ = tiny_dirs["llama-biases"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False, "mlp_bias": False}))
    with pytest.raises(ValueError, match=r"has \d+ weights this engine's llama model has no place for, e.g. .*bias"):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize("change, match", [
    ({"vocab_size": None}, "lacks 'vocab_size'"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": None, "moe_intermediate_size": 16},
     "num_experts_per_tok must be an integer, got None"),
    ({"model_type": "granite", "attention_multiplier": 0}, "attention_multiplier must be a positive number"),
])  # fmt: skip
def test_a_malformed_config_names_its_field(change, match, tmp_path):
    config = {**BASE_CONFIG, "model_type": "llama", **change}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None or k == "num_experts_per_tok"}))
    with pytest.raises(ValueError, match=match):
        LLM(model=str(tmp_path))


def test_missing_fields_take_each_family_s_transformers_default():
    from cachedattention.model.spec import spec_from_hf_config

    granite = spec_from_hf_config({**BASE_CONFIG, "model_type": "granite"})
    assert granite.attn_scale == 1.0  # attention_multiplier's default, not head_dim ** -0.5
    assert granite.embed_scale is None and granite.residual_scale is None and granite.logits_scale is None
    assert spec_from_hf_config({**BASE_CONFIG, "model_type": "phi3"}).rms_norm_eps == 1e-5
    smollm3 = spec_from_hf_config({k: v for k, v in BASE_CONFIG.items() if k != "max_position_embeddings"}
                                  | {"model_type": "smollm3"})  # fmt: skip
    assert (smollm3.rope_theta, smollm3.max_position_embeddings, smollm3.tie_word_embeddings) == (2e6, 32768, True)


def test_fields_added_later_keep_the_other_models_fingerprints():
    """Adding Qwen3's flag and GGUF's rope divisors must not change a Llama's fingerprint: its stored
    KV stays servable."""
    import hashlib
    from dataclasses import asdict

    from cachedattention.model.spec import spec_from_hf_config

    llama = spec_from_hf_config({**BASE_CONFIG, "model_type": "llama"})
    later = ("qk_norm", "rope_freq_factors", "moe", "sliding_window", "window_layers", "hidden_act", "embed_scale",
             "sandwich_norms", "attn_scale", "residual_scale", "logits_scale", "local_rope_theta", "local_rope_layers", "o_bias", "mlp_bias",
             "nope_layers", "post_norms_only", "qk_norm_full", "rope_long_freq_factors", "rope_short_window", "rotary_dim",
             "rope_attention_factor", "attn_softcap", "final_softcap", "rope_interleaved", "layer_norm",
             "parallel_block", "attn_sinks", "qk_norm_per_head", "rope_context")
    before = {k: v for k, v in asdict(llama).items() if k not in later}  # the spec's fields until Qwen3
    assert llama.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert not llama.qk_norm and spec_from_hf_config({**BASE_CONFIG, "model_type": "qwen3"}).qk_norm


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("flag", ["0", "-1"])
def test_a_kv_pool_of_no_bytes_is_refused_not_sized_by_default(flag, capsys):
    from cachedattention.cli import main
    from cachedattention.config import CacheConfig

    with pytest.raises(ValueError, match="must be positive"):
        CacheConfig(memory_bytes=int(flag))
    assert main(["generate", "--kv-pool-bytes", flag, "--prompt", "hi"]) == 2  # before any model loads
    assert "--kv-pool-bytes) must be positive, got " + flag in capsys.readouterr().err


def test_prompt_past_window_and_bad_tokens(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), max_model_len=32)
    with pytest.raises(ValueError, match=r"the model's window is 32; shorten it$"):  # (no session: no other way)
        llm.generate([list(range(40))])
    with pytest.raises(ValueError, match=r"shorten it \(or let the store truncate the session's history"):
        llm.generate([list(range(40))], session_id="s")  # (the store off: it could truncate)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 99999]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text needs a tokenizer"])
    # the engine still works after refusing bad input
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].finished
    assert not llm.engine.has_unfinished()


def test_a_newest_turn_past_the_window_is_not_told_to_turn_truncation_on(chat_model_dir):
    """With the store off, a session's prompt past the window was always told to let the store
    truncate it, even when its newest message alone fills the window (truncation keeps it whole)."""
    llm = LLM(model=str(chat_model_dir), max_model_len=64, enable_store=False)
    long_turn = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(ValueError, match="newest turn alone, .* tokens, are past the window") as refused:
        llm.chat(long_turn, SamplingParams(max_tokens=2), session_id="s", use_tqdm=False)
    assert "let the store truncate" not in str(refused.value)
    history = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "hi"}]  # fmt: skip
    with pytest.raises(ValueError, match="let the store truncate"):  # older turns dropped, it would fit
        llm.chat(history, SamplingParams(max_tokens=2), session_id="s", use_tqdm=False)
    llm.close()


def test_pages_integrity_unit():
    from cachedattention.kvcache.hashing import block_hashes
    from cachedattention.kvcache.page_pool import PagePool

    pool = PagePool(6)
    a = pool.allocate(3)
    assert pool.num_available() == 3 and pool.allocate(4) is None
    toks = list(range(8))
    hashes = block_hashes(toks, 4)
    pool.register(a[0], hashes[0], toks[:4])
    pool.register(a[1], hashes[1], toks[4:])
    pool.free(a)
    pool.check_integrity()
    assert pool.num_cached() == 2 and pool.num_available() == 6
    b = pool.match_prefix(hashes, [toks[:4], toks[4:]])
    assert b == a[:2] and pool.refcount(a[0]) == 1
    assert pool.match_prefix(hashes, [toks[:4], [9, 9, 9, 9]]) == [a[0]]  # verified by tokens
    assert pool.refcount(a[0]) == 2
    pool.free([a[0]])
    pool.free(b)
    with pytest.raises(RuntimeError):
        pool.free([a[2]])
    pool.check_integrity()
    assert pool.allocate(6) is not None and pool.evictions == 2
    pool.check_integrity()


def test_a_window_past_the_trained_positions_is_refused_unless_asked_for(tiny_dirs, monkeypatch):
    """As vLLM: max_model_len past max_position_embeddings (512 here) is a clear error; the
    environment variable (ours, or vLLM's name) serves it anyway."""
    path, _ = tiny_dirs["qwen2"]
    with pytest.raises(ValueError, match="past the model's max_position_embeddings .512.*ALLOW_LONG_MAX_MODEL_LEN"):
        LLM(model=str(path), max_model_len=1024)
    assert LLM(model=str(path), max_model_len=512).engine.max_model_len == 512
    # RoPE scaling stretches it, as vLLM derives the window: YaRN's 64 x 8, linear's 512 x 4
    assert LLM(model=str(tiny_dirs["qwen2-yarn"][0]), max_model_len=512).engine.max_model_len == 512
    with pytest.raises(ValueError, match="past"):
        LLM(model=str(tiny_dirs["qwen2-yarn"][0]), max_model_len=513)
    assert LLM(model=str(tiny_dirs["llama-linear"][0]), max_model_len=2048).engine.max_model_len == 2048
    for name in ("CACHEDATTENTION_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        with monkeypatch.context() as m:
            m.setenv(name, "1")
            assert LLM(model=str(path), max_model_len=1024).engine.max_model_len == 1024


def test_a_refused_window_is_refused_before_any_weight_is_read(tiny_dirs, tmp_path):
    """As vLLM, the window is checked from the config: a folder whose weights cannot even be read
    says what is wrong with the window, not with the weights (a large model would have been loaded first)."""
    import shutil

    path, _ = tiny_dirs["qwen2"]
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="past the model's max_position_embeddings"):
        LLM(model=str(folder), max_model_len=1024)
    with pytest.raises(Exception) as caught:  # a window that fits gets as far as the weights
        LLM(model=str(folder), max_model_len=512)
    assert "max_position_embeddings" not in str(caught.value)


def test_a_request_whose_own_step_fails_ends_alone_and_its_batch_mates_go_on(tiny_dirs, monkeypatch, caplog):
    """Sampling (or what follows it: stop strings, the detokenizer) failing for one request ends that
    request with finish reason "error", logged, nothing of it saved; the others in its batch finish
    as they would alone, seeded ones with the draws they would have had (before, the whole step
    failed and the server aborted every running request)."""
    from cachedattention.engine import engine as engine_module

    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, store_dir=str(path.parent / "errors-store"))
    good = SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], good)[0].token_ids
    fail_sampling_for_seed(monkeypatch, 13)
    bad = SamplingParams(max_tokens=6, temperature=0.8, seed=13, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], [good, bad])
    assert outs[0].token_ids == alone and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and outs[1].finished and outs[1].token_ids == []
    assert "failed after its forward pass" in caplog.text
    # a failure after sampling (the stop-string search): the same
    real_stop = engine_module.LLMEngine._hit_stop_string
    monkeypatch.setattr(engine_module.LLMEngine, "_hit_stop_string",
                        lambda self, req: 1 / 0 if "boom" in req.params.stop else real_stop(self, req))
    outs = llm.generate([[5, 6, 7], [9, 10, 11]], [good, SamplingParams(max_tokens=6, stop=["boom"])])
    assert outs[0].token_ids == alone and outs[1].finish_reason == "error" and len(outs[1].token_ids) == 1
    pages = llm.engine.pages
    assert not llm.engine.has_unfinished() and pages.num_available() == pages.num_pages  # every page given back
    pages.check_integrity()
    # a turn that ends in an error is not stored (a good one's prompt is: an anonymous record)
    sessions = llm.stats()["sessions"]
    assert llm.generate([list(range(100, 140))], bad)[0].finish_reason == "error"
    assert llm.stats()["sessions"] == sessions
    assert llm.generate([list(range(200, 240))], good)[0].finish_reason == "length"
    assert llm.stats()["sessions"] == sessions + 1


def test_a_request_whose_prompt_logprobs_fail_ends_alone(tiny_dirs, monkeypatch, caplog):
    """Its prompt spans several steps (chunked): the step where its logprobs fail ends it, and the
    request decoding beside it goes on to the tokens it has alone."""
    import cachedattention.engine.engine as engine_module
    from cachedattention.config import SchedulerConfig

    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16))
    good = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], good)[0].token_ids
    real = engine_module.token_logprobs
    calls = []

    def fails_on_its_second_chunk(logits, tokens, k):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise RuntimeError("logprobs broke")
        return real(logits, tokens, k)

    monkeypatch.setattr(engine_module, "token_logprobs", fails_on_its_second_chunk)
    asked = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate([[5, 6, 7], list(range(20, 60))], [good, asked])
    assert outs[0].token_ids == alone and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and outs[1].token_ids == [] and len(calls) == 2
    assert "its prompt logprobs failed; ending it alone" in caplog.text
    pages = llm.engine.pages
    assert not llm.engine.has_unfinished() and pages.num_available() == pages.num_pages  # every page given back
    pages.check_integrity()


def test_a_config_json_that_is_no_object_and_a_template_that_fails_while_rendering_are_clear_errors(tiny_dirs, tmp_path):
    """Found by fuzzing the command line: an AttributeError and jinja2's own errors reached the user."""
    import shutil

    from cachedattention.errors import InvalidRequest
    from cachedattention.model.tokenizer import Tokenizer
    from tests.util import sentencepiece_like

    path, _ = tiny_dirs["llama"]
    for text, match in (("[1, 2]", "must hold a JSON object, got list"), ("{not json", "is not valid JSON")):
        folder = tmp_path / f"m{len(text)}"
        shutil.copytree(path, folder)
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            LLM(model=str(folder))
    messages = [{"role": "user", "content": "hi"}]
    for template in ('{{ raise_exception("no system prompts") }}', "{{ messages[7].content }}"):
        with pytest.raises(InvalidRequest, match="the chat template rejected the messages"):
            Tokenizer(sentencepiece_like().hf, template).render_chat(messages)
