"""vLLM's serve flags beyond the basics: several --served-model-name, the CORS lists and
credentials, --override-generation-config, and a `vllm serve` command line's engine and server flags
(--gpu-memory-utilization, --seed, --max-logprobs, --enable-log-requests, and those accepted or refused)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest

from cachedattention import LLM, SamplingParams
from cachedattention.cli import build_parser
from cachedattention.cli import engine_config as cli_engine_config
from tests.server.conftest import engine_config, start_server

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def named(chat_model_dir):
    s = start_server(engine_config(chat_model_dir, store=False), served_model_name=["main-name", "alias/other"],
                     allowed_origins=["https://chat.example"], allowed_methods=["POST"],
                     allowed_headers=["Content-Type"], allow_credentials=True)  # fmt: skip
    yield s
    s.stop()


def test_every_served_name_is_answered_and_answers_carry_the_first(named):
    models = httpx.get(f"{named.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["main-name", "alias/other"]
    for name in ("main-name", "alias/other", "default"):
        r = httpx.post(f"{named.url}{CHAT}", json={"model": name, "messages": HELLO, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "main-name"
    for name in ("nope", "other", "alias"):  # names given are answered exactly, as vLLM's
        r = httpx.post(f"{named.url}{CHAT}", json={"model": name, "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 404 and "'main-name' or 'alias/other'" in r.json()["error"]["message"]


def test_the_cors_lists_and_credentials_are_the_server_s(named):
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    r = httpx.options(f"{named.url}{CHAT}", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["access-control-allow-methods"] == "POST"
    for bad in ({"Access-Control-Request-Method": "DELETE"}, {"Access-Control-Request-Headers": "x-secret"}):
        assert httpx.options(f"{named.url}{CHAT}", headers={**preflight, **bad}).status_code == 400
    r = httpx.post(f"{named.url}{CHAT}", json={"messages": HELLO, "max_tokens": 2}, headers={"Origin": "https://chat.example"},
                   timeout=60)  # fmt: skip
    assert r.headers["access-control-allow-origin"] == "https://chat.example"


def test_the_flags_parse_as_vllm_s():
    parse = build_parser().parse_args
    args = parse(["serve", "m", "--served-model-name", "a", "b", "--allowed-methods", '["GET", "POST"]',
                  "--allowed-headers", "Content-Type,Authorization", "--allow-credentials",
                  "--override-generation-config", '{"temperature": 0.5, "max_new_tokens": 9}'])  # fmt: skip
    assert args.served_model_name == ["a", "b"] and args.allowed_methods == ["GET", "POST"]
    assert args.allowed_headers == ["Content-Type", "Authorization"] and args.allow_credentials
    assert cli_engine_config(args).override_generation_config == {"temperature": 0.5, "max_new_tokens": 9}
    defaults = parse(["serve", "m"])
    assert (defaults.allowed_methods, defaults.allowed_headers, defaults.allow_credentials) == (["*"], ["*"], False)
    for bad in (["--override-generation-config", "[1]"], ["--override-generation-config", "{"], ["--allowed-methods", "[1]"]):
        with pytest.raises(SystemExit):
            parse(["serve", "m", *bad])


def test_the_override_is_laid_over_the_model_s_generation_config(chat_model_dir, tmp_path):
    import json
    import shutil

    path = shutil.copytree(chat_model_dir, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 5}))
    llm = LLM(str(path), override_generation_config={"temperature": 0.0, "max_new_tokens": 4})
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.max_tokens) == (0.0, 5, 4)  # over the file's; the rest kept
    assert len(llm.generate("Hello")[0].token_ids) == 4
    llm.close()
    only = LLM(str(path), generation_config="vllm", override_generation_config={"top_p": 0.5})
    assert only.get_default_sampling_params().top_p == 0.5 and only.get_default_sampling_params().top_k == 0
    only.close()
    for bad, why in (({"temperature": 9}, "out of range"), ({"do_sample": True}, "unknown key")):
        with pytest.raises(ValueError, match=why):
            LLM(str(path), override_generation_config=bad)


def test_served_names_must_be_names(chat_model_dir):
    from cachedattention.server.app import create_app

    with pytest.raises(ValueError, match="served model names"):
        create_app(engine_config(chat_model_dir, store=False), served_model_name=["ok", " "])


PLAIN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


def test_a_trusting_server_renders_a_request_s_own_chat_template(chat_model_dir):
    s = start_server(engine_config(chat_model_dir, store=False), trust_request_chat_template=True)
    try:
        tok = s.app.state.engine_loop.engine.tokenizer
        r = httpx.post(f"{s.url}/tokenize", json={"messages": HELLO, "chat_template": PLAIN}).json()
        assert r["tokens"] == tok.encode("[user] Hello\n[assistant]")
        r = httpx.post(f"{s.url}{CHAT}", json={"messages": HELLO, "chat_template": PLAIN, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok.encode("[user] Hello\n[assistant]"))
        for bad in ("{% for %}", "", 7, "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ 'a' * 10**15 }}",
                    "{{ raise_exception('not this conversation') }}"):
            r = httpx.post(f"{s.url}{CHAT}", json={"messages": HELLO, "chat_template": bad, "max_tokens": 2}, timeout=60)
            assert r.status_code == 400, (bad, r.text)
    finally:
        s.stop()
    assert build_parser().parse_args(["serve", "m", "--trust-request-chat-template"]).trust_request_chat_template


def test_credentials_for_any_origin_are_warned_of(chat_model_dir, caplog):
    import logging

    from cachedattention.server.app import create_app

    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        create_app(engine_config(chat_model_dir, store=False), allow_credentials=True)
    assert "--allow-credentials with any origin" in caplog.text


# -- a `vllm serve` command line: the engine and server flags vLLM users pass ---------------------------
VLLM_LINE = ["serve", "--model", "m", "--gpu-memory-utilization", "0.85", "--no-enable-prefix-caching", "--seed", "3",
             "--max-logprobs", "5", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "-tp", "1",
             "--pipeline-parallel-size", "1", "--kv-cache-dtype", "fp8", "--enforce-eager", "--enable-chunked-prefill",
             "--block-size", "32", "--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "warning",
             "--trust-remote-code", "--response-role", "assistant",
             "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}']  # fmt: skip


def test_a_vllm_command_line_parses_and_reaches_the_engine_config():
    config = cli_engine_config(build_parser().parse_args(VLLM_LINE))
    assert (config.model, config.seed, config.max_logprobs) == ("m", 3, 5)
    assert (config.cache.gpu_memory_utilization, config.cache.enable_prefix_cache, config.cache.page_size) == (0.85, False, 32)
    assert config.cache.kv_cache_dtype == "fp8"
    spec = config.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == ("ngram", 5, 4, 4)
    defaults = cli_engine_config(build_parser().parse_args(["serve", "m"]))
    assert (defaults.seed, defaults.max_logprobs, defaults.cache.gpu_memory_utilization) == (None, 20, None)
    assert defaults.cache.enable_prefix_cache and defaults.cache.page_size == 16
    assert defaults.speculative is None and defaults.cache.kv_cache_dtype == "auto"
    # generate's --seed stays a request's seed, not the engine's
    gen = build_parser().parse_args(["generate", "--prompt", "x", "--seed", "4", "--enable-prefix-caching"])
    assert gen.seed == 4 and cli_engine_config(gen).seed is None


@pytest.mark.parametrize("flags, says", [
    (["-tp", "2"], "this engine runs one device"),
    (["--pipeline-parallel-size", "2"], "this engine runs one device"),
    (["--calculate-kv-scales"], "--calculate-kv-scales: refused: FP8 pages (--kv-cache-dtype fp8) have a scale of 1"),
    (["--kv-cache-dtype", "fp8_inc"], "'fp8_inc' is not supported: the pages hold the model's dtype, bfloat16 or FP8 "
                                      "(fp8_inc is Intel Gaudi's"),
    (["--tool-call-parser", "deepseek_v3"], "supported: hermes, llama3_json, mistral, granite, phi4_mini_json, pythonic, qwen3_coder"),
    (["--no-enable-chunked-prefill"], "always chunks prefill"),
    (["--gpu-memory-utilization", "0"], "in (0, 1]"),
    (["--gpu-memory-utilization", "1.2"], "in (0, 1]"),
    (["--max-logprobs", "-2"], "-1 for no limit"),
    (["--enable-log-requests", "--disable-log-requests"], "not allowed with"),
    (["--response-role", "bot"], "supported: assistant"),
    (["--uvicorn-log-level", "loud"], "invalid choice"),
    (["--tokenizer-mode", "mistral"], "supported: auto"),
    (["--load-format", "pt"], "supported: auto, safetensors, gguf"),
    (["--ssl-cert-reqs", "3"], "invalid choice"),
    (["--speculative-config", '{"method": "eagle", "model": "x"}'], "'model' is not supported"),
    (["--speculative-config", '{"method": "eagle3"}'], "need weights this engine does not load"),
    (["--speculative-config", "ngram"], "not JSON"),
])  # fmt: skip
def test_what_this_engine_cannot_do_is_a_usage_error_saying_why(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "m", *flags])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_the_model_given_twice_must_agree(capsys):
    from cachedattention.cli import main

    parse = build_parser().parse_args
    assert cli_engine_config(parse(["serve", "a", "--model", "a"])).model == "a"
    assert cli_engine_config(parse(["chat", "--model", "b"])).model == "b"
    assert main(["serve", "a", "--model", "b"]) == 2  # refused before any model is loaded
    assert "two models given: 'a' and --model 'b'" in capsys.readouterr().err


def test_the_pool_gets_what_the_utilization_leaves():
    from cachedattention.kvcache.kv_pool import ACTIVATION_RESERVE, GIB, activation_bytes, pool_bytes_for_utilization
    from cachedattention.model.spec import ModelSpec

    # 0.9 of 80 GiB, less 20 GiB in use and 2 GiB of activations
    assert pool_bytes_for_utilization(0.9, 80 * GIB, 20 * GIB, 2 * GIB, min_bytes=1) == int(0.9 * 80 * GIB) - 22 * GIB
    with pytest.raises(ValueError, match=r"allows 20.00 GiB of the device's 80.00 GiB, but this engine uses 20.00 GiB") as e:
        pool_bytes_for_utilization(0.25, 80 * GIB, 20 * GIB, 2 * GIB, min_bytes=1)
    assert "--kv-pool-bytes" in str(e.value)
    with pytest.raises(ValueError, match="no room"):  # room, but less than the smallest pool
        pool_bytes_for_utilization(0.5, 100, 40, 9, min_bytes=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pool_bytes_for_utilization(1.5, 100, 0, 0, min_bytes=1)
    spec = ModelSpec("llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=256,
                     tie_word_embeddings=True, qkv_bias=False)  # fmt: skip
    # per token (4*64 + 3*128 + 3*64) * 2 bytes; logits 2 * 10 * 1000 * 4; history 2 * 256 * 16 * 2 per head,
    # the larger of 4 query heads' and 3 sequences x 2 KV heads'
    expect = 10 * 832 * 2 + 80_000 + 3 * 2 * 16_384 + ACTIVATION_RESERVE
    assert activation_bytes(spec, max_num_batched_tokens=10, max_num_seqs=3, max_model_len=256, element_size=2) == expect


def test_gpu_memory_utilization_sizes_a_cuda_pool_and_warns_on_a_cpu(chat_model_dir, monkeypatch, caplog):
    import logging

    import torch

    from cachedattention.config import CacheConfig
    from cachedattention.kvcache.kv_pool import GIB, activation_bytes

    with pytest.raises(ValueError, match="gpu_memory_utilization must be a fraction"):
        CacheConfig(gpu_memory_utilization=0.0)
    plain = LLM(str(chat_model_dir))
    with caplog.at_level(logging.WARNING, logger="cachedattention"):
        llm = LLM(str(chat_model_dir), cache=CacheConfig(gpu_memory_utilization=0.5))
    assert "applies on CUDA only" in caplog.text and "--kv-pool-bytes" in caplog.text
    assert llm.engine.pool.num_pages == plain.engine.pool.num_pages  # the CPU pool's size is the default's
    plain.close()
    # the same engine's arithmetic as on a CUDA device: 0.5 of 16 GiB, less this engine's 3 GiB (its weights)
    # and the activations; another process's 2 GiB is not this engine's
    engine = llm.engine
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (11 * GIB, 16 * GIB))
    s = engine.config.scheduler
    headroom = activation_bytes(engine.spec, s.max_num_batched_tokens, s.max_num_seqs, engine.max_model_len, 4)
    assert engine._pool_budget(4) == 8 * GIB - 3 * GIB - headroom
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 9 * GIB)  # weights past half the device
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (7 * GIB, 16 * GIB))
    with pytest.raises(ValueError, match="no room for the KV cache"):
        engine._pool_budget(4)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1 * GIB)  # others hold 13 GiB: 0.5 is not free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * GIB, 16 * GIB))
    with pytest.raises(ValueError, match="other processes use the rest"):
        engine._pool_budget(4)
    engine.config = replace(engine.config, cache=replace(engine.config.cache, memory_bytes=1 << 20))
    assert engine._pool_budget(4) == 1 << 20  # --kv-pool-bytes wins
    llm.close()


def _sampled_text(chat_model_dir, seed: int | None) -> str:
    """A temperature-1 chat answer, without a request seed, from a fresh server started with `seed`."""
    s = start_server(replace(engine_config(chat_model_dir, store=False), seed=seed))
    try:
        r = httpx.post(f"{s.url}{CHAT}", json={"messages": HELLO, "max_tokens": 12, "temperature": 1.0}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    finally:
        s.stop()


def test_the_server_seed_makes_unseeded_sampling_repeat_across_restarts(chat_model_dir):
    first, again, other = (_sampled_text(chat_model_dir, seed) for seed in (7, 7, 8))
    assert first == again and first != other


def test_max_logprobs_bounds_what_a_request_may_ask_for(chat_model_dir):
    s = start_server(replace(engine_config(chat_model_dir, store=False), max_logprobs=25))  # above vLLM's 20
    try:
        def ask(path: str, **fields) -> httpx.Response:
            body = {"messages": HELLO} if path == CHAT else {"prompt": "Hello"}
            return httpx.post(f"{s.url}{path}", json={**body, "max_tokens": 2, **fields}, timeout=60)

        r = ask(CHAT, logprobs=True, top_logprobs=25)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 25
        assert ask("/v1/completions", logprobs=25, prompt_logprobs=25).status_code == 200
        for path, field, fields in ((CHAT, "top_logprobs", {"logprobs": True, "top_logprobs": 26}),
                                    ("/v1/completions", "logprobs", {"logprobs": 26}),
                                    (CHAT, "prompt_logprobs", {"prompt_logprobs": 26})):  # fmt: skip
            r = ask(path, **fields)
            assert r.status_code == 400 and r.json()["error"]["param"] == field
            assert "[0, 25]" in r.json()["error"]["message"]
    finally:
        s.stop()
    llm = LLM(str(chat_model_dir), max_logprobs=2)  # the offline engine holds to it too
    with pytest.raises(ValueError, match="more than this engine's max_logprobs of 2"):
        llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=3))
    assert len(llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=2))[0].logprobs[0].top) == 2
    llm.close()


def test_requests_are_logged_only_when_asked(chat_model_dir, named, caplog):
    import logging

    s = start_server(engine_config(chat_model_dir, store=False), log_requests=True)
    try:
        with caplog.at_level(logging.INFO, logger="cachedattention.server.engine_loop"):
            r = httpx.post(f"{s.url}{CHAT}", json={"messages": HELLO, "max_tokens": 3, "session_id": "s-1"}, timeout=60)
            r2 = httpx.post(f"{s.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}, timeout=60)
    finally:
        s.stop()
    assert r.status_code == 200 and r2.status_code == 200
    assert f"received request {r.json()['id']}: session s-1, 1 message(s), max_tokens 3, not streamed" in caplog.text
    assert "session -, a prompt of 3 tokens, max_tokens 2, streamed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cachedattention.server.engine_loop"):
        httpx.post(f"{named.url}{CHAT}", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert "received request" not in caplog.text


def test_finished_requests_are_logged_with_their_text_only_when_asked(chat_model_dir, caplog):
    import logging

    s = start_server(engine_config(chat_model_dir, store=False), log_outputs=True, max_log_len=4)
    try:
        with caplog.at_level(logging.INFO, logger="cachedattention.server.engine_loop"):
            body = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{s.url}{CHAT}", json=body, timeout=60).json()
    finally:
        s.stop()
    text = r["choices"][0]["message"]["content"]
    assert f"finished request {r['id']}: 6 tokens, finish reason length, output {text[:4]!r}" in caplog.text
    assert "received request" not in caplog.text  # (each flag logs its own)


def test_a_beam_search_logs_its_choices_not_its_steps(chat_model_dir, caplog):
    """From a review: each step of a search is an engine request of one token; only the choices it
    builds are logged."""
    import logging

    s = start_server(engine_config(chat_model_dir, store=False), log_outputs=True)
    try:
        with caplog.at_level(logging.INFO, logger="cachedattention.server.engine_loop"):
            body = {"prompt": "Hello", "max_tokens": 3, "use_beam_search": True, "n": 2, "temperature": 0}
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
    finally:
        s.stop()
    lines = [m for m in caplog.messages if m.startswith("finished request")]
    assert len(lines) == 2 and not any("-step" in m or "-first" in m for m in lines), lines
    assert sorted(m.split("output ", 1)[1] for m in lines) == sorted(repr(c["text"]) for c in r["choices"])


def test_serve_passes_the_log_flags_on(chat_model_dir, monkeypatch, tmp_path):
    from cachedattention.server import app as app_module

    seen = {}

    class FakeServer:  # records what serve() would run, without binding a port
        def __init__(self, config, loop, *_grace) -> None:
            chat = next(r for r in config.app.routes if getattr(r, "path", "") == "/v1/chat/completions")
            seen.update(log_level=config.log_level, log_requests=loop.log_requests, seed=loop.engine.config.seed,
                        tool_parser=chat.endpoint.__self__.tool_parser.name,
                        reasoning=chat.endpoint.__self__.reasoning_parser.name, uds=config.uds,
                        exclude_tools=chat.endpoint.__self__.exclude_tools_when_none,
                        log_outputs=(loop.log_outputs, loop.max_log_len))
            self.started = True

        def run(self) -> None:
            pass

    monkeypatch.setattr(app_module, "_DrainingServer", FakeServer)
    args = build_parser().parse_args(["serve", str(chat_model_dir), "--kv-pool-bytes", str(4 << 20), "--port", "0",
                                      "--seed", "5",
                                      "--uvicorn-log-level", "warning", "--enable-log-requests",
                                      "--tool-call-parser", "llama3_json", "--reasoning-parser", "deepseek_r1",
                                      "--uds", str(tmp_path / "x.sock"), "--exclude-tools-when-tool-choice-none",
                                      "--enable-log-outputs", "--max-log-len", "80"])  # fmt: skip
    assert app_module.serve(args) == 0
    assert seen == {"log_level": "warning", "log_requests": True, "seed": 5, "tool_parser": "llama3_json",
                    "reasoning": "deepseek_r1", "uds": str(tmp_path / "x.sock"), "exclude_tools": True,
                    "log_outputs": (True, 80)}
    with pytest.raises(ValueError, match="--uds '/no/such/dir/x.sock': its folder does not exist"):
        app_module.serve(build_parser().parse_args(["serve", "m", "--uds", "/no/such/dir/x.sock"]))
    from cachedattention.cli_vllm import TOOL_CALL_PARSERS
    from cachedattention.server.tool_calls import TOOL_CALL_PARSERS as IMPLEMENTED

    assert TOOL_CALL_PARSERS == tuple(IMPLEMENTED)  # the flag offers exactly the parsers there are
    from cachedattention.cli_vllm import REASONING_PARSERS
    from cachedattention.server.reasoning import REASONING_PARSERS as REASONERS

    assert REASONING_PARSERS == tuple(REASONERS)


def test_vllm_s_request_id_continuous_usage_and_token_ids(named, chat_model_dir):
    import json

    url = named.url
    r = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "max_tokens": 3, "request_id": "my-req-1"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-my-req-1"
    c = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "request_id": "x2"}, timeout=60)
    assert c.json()["id"] == "cmpl-x2"
    bad = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "request_id": 5}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"
    words = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "max_tokens": 3, "bad_words": ["the", "a b"]}, timeout=60)
    assert words.status_code == 200, words.text
    for wrong in ("the", [""], [3]):
        r = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "bad_words": wrong}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words"
    for wrong in (1, "high"):  # a priority without the priority policy, as vLLM; or not an integer
        r = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "priority": wrong}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "max_tokens": 2, "priority": 0}, timeout=60).is_success
    args = build_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert cli_engine_config(args).scheduler.policy == "priority"
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}{CHAT}", json=body, timeout=60) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    tokens = [e["usage"]["completion_tokens"] for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert tokens and tokens == sorted(tokens) and tokens[-1] <= 5  # usage on every chunk, growing
    assert all(e["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"] for e in events if e["usage"])
    lp = {"messages": HELLO, "max_tokens": 2, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    shown = httpx.post(f"{url}{CHAT}", json={**lp, "return_tokens_as_token_ids": True}, timeout=60).json()
    entry = shown["choices"][0]["logprobs"]["content"][0]
    assert entry["token"].startswith("token_id:") and entry["top_logprobs"][0]["token"].startswith("token_id:")
    assert bytes(entry["bytes"]).decode() == entry["token"]
    srv = start_server(engine_config(chat_model_dir, store=False), return_tokens_as_token_ids=True)
    try:  # the server's flag: every request's logprobs so
        flagged = httpx.post(f"{srv.url}{CHAT}", json=lp, timeout=60).json()
        assert flagged["choices"][0]["logprobs"]["content"][0]["token"].startswith("token_id:")
    finally:
        srv.stop()
    assert build_parser().parse_args(["serve", "--return-tokens-as-token-ids"]).return_tokens_as_token_ids
    # a request whose own rules leave no token ends there; a request beside it is not disturbed
    the = named.app.state.engine_loop.engine.tokenizer.encode("the")[:1]  # the only token allowed: a bad word
    boxed = {"messages": HELLO, "max_tokens": 5, "temperature": 1, "allowed_token_ids": the, "bad_words": ["the"]}
    r = httpx.post(f"{url}{CHAT}", json=boxed, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text


def test_a_client_s_id_given_twice_at_once_runs_both_and_each_answer_keeps_it(named):
    """vLLM's: a client's request_id (or X-Request-Id) is the answer's, not the engine's key; two
    requests in flight with it both run. The engine's own ids stay unique."""
    from cachedattention.server.engine_loop import Job

    body = {"prompt": "Hi", "max_tokens": 2, "request_id": "taken"}

    async def both():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{named.url}/v1/completions", json=body) for _ in range(2)))

    loop = named.app.state.engine_loop
    with loop._cond:
        loop._active.add("cmpl-taken")  # as if a request with the bare id were streaming
    try:
        answers = asyncio.run(both())
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        assert [r.json()["id"] for r in answers] == ["cmpl-taken", "cmpl-taken"]
        with pytest.raises(ValueError, match="already in use"):  # the engine's key itself is never shared
            asyncio.run(_submit_now(loop, Job("cmpl-taken", SamplingParams(max_tokens=1), prompt=[1, 2])))
    finally:
        with loop._cond:
            loop._active.discard("cmpl-taken")


async def _submit_now(loop, job):
    return loop.submit(job, asyncio.get_running_loop())
