"""The offline API given what a vLLM user writes, or gets wrong (found by fuzzing it): vLLM's dict
prompts and engine arguments, wrong types as ValueErrors naming the argument, a pool too small for
the window refused at start (a request that long would wait for pages for ever), a closed LLM, two
turns of one session at once, and Ctrl-C landing between steps."""

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.errors import InvalidRequest
from cachedattention.interrupts import StepInterrupted
from cachedattention.sampling import GuidedFormError

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
IDS = [5, 9, 13, 17, 21]


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return LLM(model=str(tiny_dirs["llama"][0]))


def _healthy(llm: LLM) -> None:
    assert not llm.engine.has_unfinished()
    assert llm.generate(IDS, GREEDY)[0].finish_reason == "length"
    llm.engine.pages.check_integrity()


def test_vllm_dict_prompts_run_as_their_prompt(llm, chat_model_dir):
    want = llm.generate(IDS, GREEDY)[0].token_ids
    assert llm.generate({"prompt_token_ids": IDS}, GREEDY)[0].token_ids == want
    assert [o.token_ids for o in llm.generate([{"prompt_token_ids": IDS}, IDS], GREEDY)] == [want, want]
    chat = LLM(model=str(chat_model_dir))
    text = chat.generate("Hello there", GREEDY)[0]
    assert chat.generate({"prompt": "Hello there"}, GREEDY)[0].token_ids == text.token_ids
    assert chat.generate({"prompt": "Hello there"}, GREEDY)[0].prompt_token_ids == chat.engine.tokenize("Hello there")  # (the dict's key was once run as the text)


@pytest.mark.parametrize("prompt, match", [
    (5, "got a int"), (torch.tensor([1, 2]), r"got a Tensor \(an array or tensor of ids: pass .tolist\(\)\)"),
    (np.array([1, 2]), "got a ndarray"), (b"Hi", "got a bytes"), ({1, 2}, "got a set"),
    ({"prompt": "a", "prompt_token_ids": [1]}, r"one of them only, and may hold a \"cache_salt\"; got the keys \['prompt', 'prompt_token_ids'\]"),
    ({"multi_modal_data": {}}, "got the keys"), ([], "at least one prompt"), ([[1, 2], 7], "got a int"),
    ({"prompt_token_ids": "Hello"}, "got 'prompt_token_ids': str"), ({"prompt": [1, 2]}, "got 'prompt': list"),
])  # fmt: skip
def test_a_prompt_of_the_wrong_type_is_refused_naming_it(prompt, match, llm):
    with pytest.raises(InvalidRequest, match=match) as e:
        llm.generate(prompt, GREEDY)
    assert e.value.param == "prompt"
    _healthy(llm)


@pytest.mark.parametrize("kw", [{"head_tokens": "3"}, {"head_tokens": None}, {"head_tokens": -2}, {"head_tokens": True},
                                {"tail_tokens": 1.5}, {"tail_tokens": -3}])  # fmt: skip
def test_an_engine_request_s_kept_head_and_tail_must_be_token_counts(kw, llm):
    """(What LLM.chat and the server work out themselves, given wrong by a direct engine caller.)"""
    with pytest.raises(InvalidRequest, match=f"{next(iter(kw))} must be a whole number") as e:
        llm.engine.add_request(IDS, GREEDY, session_id="ht", **kw)
    assert e.value.param == next(iter(kw)) and not llm.engine.requests


def test_two_turns_of_one_session_at_once_are_refused(llm):
    with pytest.raises(InvalidRequest, match="distinct session ids"):
        llm.generate([IDS, IDS + [3]], GREEDY, session_id="s")
    outs = llm.generate([IDS, IDS + [3]], GREEDY, session_id=["s", None])  # none for one of them is fine
    assert len(outs) == 2
    _healthy(llm)


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": "x"}, "seed must be None or an integer"), ({"seed": 1.5}, "seed must"), ({"seed": 2**70}, "seed must"),
    ({"seed": True}, "seed must"), ({"stop": [5]}, "stop strings must be non-empty strings"),
    ({"stop": b"x"}, "stop must be a list, got bytes"), ({"stop_token_ids": 5}, "stop_token_ids must be a list"),
    ({"logit_bias": 5}, "logit_bias must map token ids"), ({"bad_words_ids": [5]}, "bad_words_ids must be lists"),
    ({"max_tokens": True}, "max_tokens"), ({"top_k": True}, "top_k"), ({"ignore_eos": "no"}, "ignore_eos must be true or false"),
    ({"json_object": 1}, "json_object must be true or false"), ({"skip_special_tokens": None}, "skip_special_tokens"),
    # found by the input audit: n=10**30 was taken, and LLM.generate then added requests until memory ran
    # out; a list as tool_call_format was a TypeError (unhashable), not a ValueError naming it
    ({"n": 10**30}, r"n must be an integer in \[1, 65536\]"), ({"tool_call_format": ["hermes"]}, "tool_call_format must be"),
])  # fmt: skip
def test_sampling_params_of_the_wrong_type_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_a_huge_integer_for_a_float_field_samples_as_its_float(field, llm):
    """Found by the input audit: temperature=10**30 (an int past int64) was taken, then failed in the
    sampler (torch cannot take it as a scalar), the request ending with finish reason error."""
    params = SamplingParams(max_tokens=4, seed=3, ignore_eos=True, **{field: 10**30})
    assert isinstance(getattr(params, field), float)
    assert llm.generate(IDS, params)[0].finish_reason == "length"
    _healthy(llm)


def test_sampling_params_take_none_for_a_list_and_deep_schemas_are_a_clear_error():
    p = SamplingParams(stop=None, stop_token_ids=None, allowed_token_ids=None, bad_words=None, logit_bias=None)
    assert (p.stop, p.stop_token_ids, p.allowed_token_ids, p.bad_words, p.logit_bias) == ((), (), (), (), ())
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=-(2**63)).seed == -(2**63)
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GuidedFormError, match="nested too deeply"):
        SamplingParams(json_schema=deep)
    with pytest.raises(GuidedFormError, match="nested too deeply"):
        SamplingParams(json_schema='{"items": ' * 5000 + "{}" + "}" * 5000)


@pytest.mark.parametrize("make, match", [
    (lambda: EngineConfig(max_model_len="100"), "max_model_len must be int or None, got str '100'"),
    (lambda: EngineConfig(max_model_len=100.5), "max_model_len must be int or None, got float"),
    (lambda: EngineConfig(max_model_len=True), "max_model_len must be int or None, got bool"),
    (lambda: EngineConfig(device="bogus"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (lambda: EngineConfig(device="meta"), "device must be"), (lambda: EngineConfig(model=5), "model must be str or None"),
    (lambda: EngineConfig(max_logprobs=True), "max_logprobs must be int"),
    (lambda: EngineConfig(seed=True), "seed must be int or None, got bool"),
    (lambda: EngineConfig(override_generation_config=[1]), "override_generation_config must be dict or None"),
    (lambda: StoreConfig(host_bytes="1G"), "host_bytes must be int"), (lambda: StoreConfig(host_bytes=1.5), "host_bytes"),
    (lambda: StoreConfig(store_dir=123), "store_dir must be str or None"),
    (lambda: CacheConfig(page_size="16"), "page_size must be int"),
    (lambda: CacheConfig(enable_prefix_cache=1), "enable_prefix_cache must be bool"),
    (lambda: SchedulerConfig(max_num_seqs=2.0), "max_num_seqs must be int"),
    (lambda: LLM(cache={}), "cache must be a CacheConfig"),
    (lambda: LLM(bogus=1), "unknown argument 'bogus': see help"),
    (lambda: LLM(kv_cache_dtype="fp8_ds_mla"), "kv_cache_dtype must be one of auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2, "
                                               "got 'fp8_ds_mla'"),
    (lambda: LLM(model="/no/such/model.gguf", load_format="safetensors"), "load_format safetensors does not match"),
    (lambda: LLM(model="/no/such/folder", load_format="gguf"), "load_format gguf does not match"),
    (lambda: LLM(load_format="npcache"), "load_format: 'npcache' is not supported"),
    (lambda: LLM(tensor_parallel_size=2), "must be 1: this engine runs one device"),
    (lambda: LLM(enable_store="yes"), "enable_store must be true or false"),
    # vLLM's arguments that change nothing here, checked as their command-line flags are
    (lambda: LLM(swap_space=-1), "swap_space: a number of GiB >= 0 was expected, got -1"),
    (lambda: LLM(max_seq_len_to_capture=8192.5), "max_seq_len_to_capture: an integer >= 1 was expected"),
    (lambda: LLM(guided_decoding_backend="llguidance"), "guided_decoding_backend: 'llguidance' is not supported"),
    (lambda: LLM(disable_log_stats="no"), "disable_log_stats must be true or false"),
    (lambda: LLM(limit_mm_per_prompt={"image": 2}), "limit_mm_per_prompt: .* images, video and audio in messages"),
    (lambda: LLM(cpu_offload_gb=4), "cpu_offload_gb: weights stay on the device"),
    (lambda: LLM(data_parallel_size=2), "data_parallel_size: this engine runs one device"),
    (lambda: LLM(enable_expert_parallel="yes"), "enable_expert_parallel must be true or false"),
    (lambda: LLM(compilation_config="3"), "compilation_config must be a level or a dict, got str"),
    (lambda: LLM(async_scheduling=1), "async_scheduling must be true or false"),
    (lambda: LLM(kv_transfer_config={"kv_connector": "LMCacheConnectorV1"}), "runs no KV connectors; its store is"),
    (lambda: LLM(kv_offloading_size=1e-12), r"kv_offloading_size \(1e-12 GiB\) is less than a byte"),
    (lambda: LLM(kv_offloading_size=1, enable_store=False), "which enable_store=False switches off"),
    (lambda: LLM(kv_offloading_size=0), "kv_offloading_size: a number of GiB > 0 was expected, got 0"),
    (lambda: LLM(kv_offloading_backend="mooncake"), "kv_offloading_backend: 'mooncake' is not supported"),
    (lambda: LLM(kv_offloading_size=1, host_bytes=5), r"kv_offloading_size \(1 GiB, 1073741824 bytes\) and host_bytes"),
    (lambda: LLM(enable_chunked_prefill=False), "enable_chunked_prefill must be True: this scheduler always chunks"),
])  # fmt: skip
def test_engine_arguments_of_the_wrong_type_are_refused_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_take_numpy_numbers_and_paths_as_python_ones(tmp_path):
    store = StoreConfig(host_bytes=np.int64(5), drop_fraction=np.float32(0.5), store_dir=tmp_path)
    assert (type(store.host_bytes), type(store.drop_fraction), store.store_dir) == (int, float, str(tmp_path))
    assert EngineConfig(seed=np.int64(3), model=tmp_path).model == str(tmp_path)


def test_vllm_engine_arguments_and_store_options_are_honoured(tiny_dirs, tmp_path):
    path = Path(tiny_dirs["llama"][0])  # (a Path, as users pass it)
    llm = LLM(model=path, max_num_seqs=3, max_num_batched_tokens=64, enable_prefix_caching=False, block_size=8,
              gpu_memory_utilization=0.5, tensor_parallel_size=1, trust_remote_code=True, enforce_eager=True,
              swap_space=4, max_seq_len_to_capture=8192, guided_decoding_backend="xgrammar", disable_log_stats=True,
              enable_chunked_prefill=True, compilation_config={"level": 3}, async_scheduling=True,
              enable_expert_parallel=True, disable_hybrid_kv_cache_manager=True, data_parallel_size=1,
              distributed_executor_backend="mp", limit_mm_per_prompt={"image": 0}, language_model_only=True,
              config_format="hf", cpu_offload_gb=0, runner="generate", structured_outputs_config={"backend": "auto"})
    c = llm.config
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens) == (3, 64)
    assert (c.cache.enable_prefix_cache, c.cache.page_size, c.cache.gpu_memory_utilization) == (False, 8, 0.5)
    assert llm.engine.store is None
    stored = LLM(model=path, store_dir=tmp_path / "kv", host_bytes=1 << 20)  # store options turn the store on
    assert stored.engine.store is not None and stored.config.store.store_dir == str(tmp_path / "kv")
    stored.close()
    assert LLM(model=path, host_bytes=1 << 20, enable_store=False).engine.store is None  # unless told otherwise
    vllm_defaults = LLM(model=path, enable_prefix_caching=None, block_size=None, max_num_seqs=None,
                        kv_cache_dtype="auto", tokenizer_mode="auto", scheduling_policy="priority", page_size=8,
                        long_prefill_token_threshold=32, remote_url=None)  # fmt: skip
    c = vllm_defaults.config
    assert (c.cache.enable_prefix_cache, c.cache.page_size, c.scheduler.max_num_seqs) == (True, 8, 16)
    assert (c.scheduler.policy, c.scheduler.long_prefill_token_threshold) == ("priority", 32)
    assert vllm_defaults.engine.store is None  # (a store option left at None turns nothing on)


def test_vllm_s_kv_offloading_size_turns_the_store_s_host_tier_on(tiny_dirs):
    """vLLM's KV offloading (kv_offloading_size GiB, native or lmcache): the store's host tier of
    that size keeps a turn's KV, and the next turn reads it back from there."""
    path = str(tiny_dirs["llama"][0])
    llm = LLM(model=path, kv_offloading_size=0.01, kv_offloading_backend="lmcache", enable_prefix_caching=False)
    assert llm.config.store.enable and llm.config.store.host_bytes == int(0.01 * (1 << 30))
    params = SamplingParams(max_tokens=4, temperature=0)
    conv = list(range(5, 70))
    first = llm.generate([conv], params, session_id="s", use_tqdm=False)[0]
    second = llm.generate([conv + first.token_ids + [1]], params, session_id="s", use_tqdm=False)[0]
    assert second.metrics.cached_tokens["host"] == len(conv) + len(first.token_ids) - 1  # (the last: never fed)
    llm.engine.store.check_integrity()
    assert LLM(model=path, kv_offloading_size=1, host_bytes=1 << 30).config.store.host_bytes == 1 << 30
    assert LLM(model=path, kv_cache_memory_bytes=1 << 24).config.cache.memory_bytes == 1 << 24  # (vLLM's name)


def test_a_page_larger_than_half_the_pool_s_budget_or_a_pool_past_memory_is_refused(tiny_dirs):
    """Found by the input audit: --page-size 100000000 allocated two such pages whatever the budget,
    a RuntimeError (can't allocate memory) and a traceback from the command line."""
    with pytest.raises(ValueError, match=r"a KV page of 1000000000 tokens \(page_size, --page-size or --block-size\)"):
        LLM(model=str(tiny_dirs["llama"][0]), page_size=10**9)
    # and a pool of more pages than the machine can hold: a ValueError saying what to lower, not torch's RuntimeError
    with pytest.raises(ValueError, match=r"the KV pool of 1000000000000 pages .* cannot be allocated on cpu: lower num_pages"):
        LLM(model=str(tiny_dirs["llama"][0]), cache=CacheConfig(num_pages=10**12))


def test_a_pool_smaller_than_the_window_is_refused_unless_the_window_fits(tiny_dirs):
    path = str(tiny_dirs["llama"][0])
    with pytest.raises(ValueError, match=r"the KV pool holds 64 tokens, fewer than the window .* at most 64"):
        LLM(model=path, cache=CacheConfig(num_pages=4, page_size=16))
    small = LLM(model=path, cache=CacheConfig(num_pages=4, page_size=16), max_model_len=64)
    auto = LLM(model=path, cache=CacheConfig(num_pages=4, page_size=16), max_model_len=-1)  # (vLLM's auto)
    assert auto.engine.max_model_len == 64 and LLM(model=path, max_model_len=-1).engine.max_model_len == 512
    with pytest.raises(ValueError, match=r"max_model_len must be positive, or -1 .*got -2"):
        LLM(model=path, max_model_len=-2)
    out = small.generate([1] * 40, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24  # the window's end, not a wait for ever
    with pytest.raises(ValueError, match="window"):
        small.generate([1] * 100, GREEDY)
    _healthy(small)


def test_a_default_pool_smaller_than_the_window_lowers_the_window(tiny_dirs, monkeypatch, caplog):
    import cachedattention.engine.engine as engine_module

    per_token = LLM(model=str(tiny_dirs["llama"][0])).engine.spec.kv_bytes_per_token(4)
    monkeypatch.setattr(engine_module, "default_pool_bytes", lambda device: 96 * per_token)
    llm = LLM(model=str(tiny_dirs["llama"][0]))
    assert llm.engine.max_model_len == 96 and "max_model_len lowered from" in caplog.text
    assert llm.generate([1] * 80, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].finish_reason == "length"
    _healthy(llm)


def test_a_closed_llm_refuses_work_and_leaves_its_store_whole(tiny_dirs, tmp_path):
    llm = LLM(model=str(tiny_dirs["llama"][0]), store_dir=str(tmp_path / "kv"))
    first = llm.generate(IDS, GREEDY, session_id="s")[0]
    llm.close()
    with pytest.raises(ValueError, match="closed"):
        llm.generate(IDS, GREEDY, session_id="t")
    with pytest.raises(ValueError, match="closed"):
        llm.forget_session("s")
    again = LLM(model=str(tiny_dirs["llama"][0]), store_dir=str(tmp_path / "kv"))
    out = again.generate(IDS + first.token_ids + [3], GREEDY, session_id="s")[0]
    assert out.metrics.cached_tokens["disk"] > 0
    again.engine.store.check_integrity()
    again.close()


def test_ctrl_c_lands_between_steps_and_leaves_the_engine_whole(llm, monkeypatch):
    forwards = []
    run = llm.engine.runner.run

    def run_and_interrupt(batch):
        if len(forwards) == 2:  # Ctrl-C in the middle of the third step's forward pass
            os.kill(os.getpid(), signal.SIGINT)
        forwards.append(1)
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", run_and_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (other tests may set theirs)
    try:
        assert threading.current_thread() is threading.main_thread()
        with pytest.raises(KeyboardInterrupt) as e:
            llm.generate([IDS, IDS[::-1]], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        assert type(e.value) is KeyboardInterrupt  # (between steps: not StepInterrupted)
        assert len(forwards) == 3  # the step it came in finished its forward pass (and its bookkeeping)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    _healthy(llm)


def test_chat_takes_openai_content_parts_and_the_developer_role_as_the_server_does(chat_model_dir):
    chat = LLM(model=str(chat_model_dir))
    plain = [{"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": "Hello there"}]
    # (one part a line, as vLLM joins them)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]  # fmt: skip
    want = chat.chat(plain, GREEDY)[0]
    got = chat.chat(parts, GREEDY)[0]
    assert got.prompt_token_ids == want.prompt_token_ids and got.token_ids == want.token_ids
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(InvalidRequest, match=r"conversation 1: messages\[0\].content\[0\]: only text parts are supported .text., got .image_url.") as e:
        chat.chat([plain, image], GREEDY)
    assert e.value.param == "messages[0].content[0]"
    # a text part without a string text named as that (the input audit: it said "only text parts are
    # supported (text), got 'text'")
    for text in (None, 5, ["x"]):
        with pytest.raises(InvalidRequest, match=r"messages\[0\].content\[1\].text must be a string, got ") as e:
            chat.chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": text}]}])
        assert e.value.param == "messages[0].content[1].text"
    assert not chat.engine.has_unfinished()


def test_a_row_of_nan_logits_fails_its_request_alone(llm, monkeypatch, caplog):
    other = [7, 8, 9, 10]
    alone = llm.generate(other, GREEDY)[0].token_ids
    run = llm.engine.runner.run

    steps = []

    def nan_in_first_row(batch):  # (the first step's: both prompts end in it)
        logits = run(batch).clone()
        if not steps:
            logits[0] = float("nan")
        steps.append(logits.shape[0])
        return logits

    monkeypatch.setattr(llm.engine.runner, "run", nan_in_first_row)
    first, second = llm.generate([IDS, other], GREEDY)
    monkeypatch.undo()
    assert first.finish_reason == "error" and "logits are NaN" in caplog.text
    assert steps[0] == 2 and second.finish_reason == "length" and second.token_ids == alone
    _healthy(llm)


def test_ctrl_c_twice_interrupts_at_once_and_a_program_s_own_handler_is_left_alone(llm, monkeypatch):
    forwards = []
    run = llm.engine.runner.run

    def run_and_interrupt(batch):
        if len(forwards) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # (the second inside the step: now)
            forwards.append("after")
        forwards.append(1)
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", run_and_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(StepInterrupted):  # (a KeyboardInterrupt that says the step stopped midway)
            llm.generate(IDS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        assert "after" not in forwards  # raised inside the step, by the second
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        caught = []
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))  # the program's own
        forwards.clear()
        assert llm.generate(IDS, GREEDY)[0].finish_reason == "length"  # its handler took both, the run went on
        assert caught == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    _healthy(llm)


def test_end_of_answer_ids_past_the_vocabulary_are_ignored_with_a_warning(tiny_dirs, tmp_path, caplog):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, 10**6]}))
    llm = LLM(model=str(folder))
    assert llm.engine.eos_token_ids == (2,) and "end-of-answer ids [1000000] are past the vocabulary" in caplog.text


def test_an_engine_failing_after_its_store_opened_frees_the_folder(tiny_dirs, tmp_path, monkeypatch):
    import cachedattention.store.connector as connector

    def broken(*args, **kwargs):
        raise RuntimeError("saver broke")

    monkeypatch.setattr(connector, "Saver", broken)
    with pytest.raises(RuntimeError, match="saver broke"):
        LLM(model=str(tiny_dirs["llama"][0]), store_dir=str(tmp_path / "kv"))
    monkeypatch.undo()
    LLM(model=str(tiny_dirs["llama"][0]), store_dir=str(tmp_path / "kv")).close()  # not held by the failed one


def test_vllm_s_quickstart_reads_outputs_and_n_gives_that_many_completions(llm, chat_model_dir):
    chat = LLM(model=str(chat_model_dir))
    [out] = chat.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert out.prompt == "Hello there" and out.outputs[0].text == out.text and out.outputs[0].index == 0
    assert out.outputs[0].token_ids == out.token_ids and out.outputs[0].cumulative_logprob is None
    sampled = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True, logprobs=0)
    first, again = llm.generate([IDS, IDS], [sampled, sampled])
    assert [c.index for c in first.outputs] == [0, 1, 2] and first.token_ids == first.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # seeds 11, 12, 13: different draws
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]  # and they repeat
    alone = llm.generate(IDS, SamplingParams(max_tokens=6, temperature=1.0, seed=12, ignore_eos=True))[0]
    assert first.outputs[1].token_ids == alone.token_ids  # choice 1 is the request seeded 12
    c = first.outputs[2]
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs)) and len(c.logprobs) == 6
    with pytest.raises(InvalidRequest, match="n > 1 cannot continue a session"):
        llm.generate(IDS, sampled, session_id="s")
    with pytest.raises(InvalidRequest, match="an engine request is one completion"):
        llm.engine.add_request(IDS, sampled)
    with pytest.raises(ValueError, match="n must be an integer in"):
        SamplingParams(n=0)
    rendered = chat.chat([{"role": "user", "content": "Hi"}], GREEDY)[0]
    assert rendered.prompt == chat.tokenizer.decode(rendered.prompt_token_ids, skip_special_tokens=False)
    _healthy(llm)
