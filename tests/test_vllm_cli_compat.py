"""vLLM's flags a compatibility sweep found refused with "invalid choice" or "unrecognized arguments":
--dtype auto/half/float, the flags accepted where this engine already behaves so, those refused
saying why, and --config's YAML file of flag values."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cachedattention.cli import build_parser, engine_config
from cachedattention.config import StoreConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("name, ours", [
    ("auto", "float32"), ("half", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float", "float32"),
    ("float32", "float32"),
])  # fmt: skip
def test_vllm_s_dtype_names_reach_the_engine_as_ours_on_a_cpu(name, ours):
    assert engine_config(parse("serve", "--dtype", name)).dtype == ours


def test_the_default_dtype_stays_float32_on_every_device():
    assert engine_config(parse("serve")).dtype == "float32"
    assert engine_config(parse("serve", "--device", "cuda")).dtype == "float32"  # (auto's would be 16-bit)


def test_auto_on_cuda_is_the_checkpoint_s_16_bit_dtype_else_float16(tmp_path):
    from cachedattention.llm_args import auto_dtype, checkpoint_dtype, engine_dtype

    assert [auto_dtype("cuda", d) for d in ("bfloat16", "float16", "float32", None)] == [
        "bfloat16", "float16", "float16", "float16"]  # fmt: skip
    assert auto_dtype("cpu", "bfloat16") == "float32"  # this engine computes in float32 on a CPU
    for config, says in (({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16"}, "float16"),
                         ({"text_config": {"torch_dtype": "bfloat16"}}, "bfloat16"), ({}, None)):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert checkpoint_dtype(str(tmp_path)) == says
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert engine_dtype("auto", "cuda:1", str(tmp_path)) == "bfloat16"
    assert engine_dtype("auto", "cuda", None) == "float16"  # the embedded GGUF: no torch_dtype, as float32
    assert engine_dtype("half", "cuda", str(tmp_path)) == "float16"  # (only auto reads the checkpoint)
    with pytest.raises(ValueError, match="dtype must be one of auto, half"):
        engine_dtype("fp8", "cpu", None)


def test_vllm_s_quickstart_line_runs(chat_model_dir, capsys):
    """`vllm serve MODEL --dtype auto --api-key token-abc123`: --dtype auto was an invalid choice."""
    from cachedattention.cli import main

    args = parse("serve", str(chat_model_dir), "--dtype", "auto", "--api-key", "token-abc123")
    assert engine_config(args).dtype == "float32" and args.api_key == ["token-abc123"]
    assert main(["generate", str(chat_model_dir), "--dtype", "auto", "--prompt", "Hi", "--max-tokens", "2",
                 "--no-store"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("flags", [
    ["--swap-space", "4"], ["--swap-space", "0"], ["--max-seq-len-to-capture", "8192"],
    ["--disable-frontend-multiprocessing"], ["--api-server-count", "1"], ["-asc", "1"],
    ["--guided-decoding-backend", "xgrammar"], ["--guided-decoding-backend", "lm-format-enforcer"],
    ["--chat-template-content-format", "auto"],
    ["-O3"], ["-O", "0"], ["-O.level=3"], ["--compilation-config", '{"level": 3}'], ["--async-scheduling"],
    ["--no-async-scheduling"], ["-cc", '{"cudagraph_mode": "NONE"}'], ["--optimization-level", "2"],
    ["--enable-expert-parallel"], ["--disable-hybrid-kv-cache-manager"], ["--disable-custom-all-reduce"],
    ["-dp", "1"], ["--data-parallel-size", "1"], ["--distributed-executor-backend", "mp"],
    ["--cudagraph-capture-sizes", "1", "2", "4"], ["--cuda-graph-sizes", "8"], ["--max-cudagraph-capture-size", "64"],
    ["--attention-backend", "FLASH_ATTN"], ["--runner", "generate"], ["--convert", "none"], ["--task", "generate"],
    ["--hf-token"], ["--hf-token", "hf_abc"], ["--limit-mm-per-prompt", '{"image": 0, "video": 0}'],
    ["--limit-mm-per-prompt", '{"image": {"count": 0}}'], ["--limit-mm-per-prompt", "image=0,video=0"],
    ["--limit-mm-per-prompt.image", "0"], ["--language-model-only"], ["--config-format", "hf"],
    ["--config-format", "auto"], ["--tokenizer-mode", "hf"], ["--cpu-offload-gb", "0"],
    ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": false}'],
    ["--structured-outputs-config.backend", "guidance"], ["--tool-call-parser", "qwen3_xml"],
    ["--tool-call-parser", "llama4_json"],
])  # fmt: skip
def test_what_this_engine_already_does_is_accepted(flags):
    before = engine_config(parse("serve", "m"))
    assert engine_config(parse("serve", "m", *flags)) == before  # (nothing it asks for differs here)


@pytest.mark.parametrize("flags, says", [
    (["--logits-processor-pattern", "my_mod.*"], "loads no logits processors"),
    (["--default-chat-template-kwargs", "[1]"], "a JSON object of template variables was expected"),
    (["--default-chat-template-kwargs", "{nope"], "not JSON"),
    (["--default-chat-template-kwargs", '{"tools": []}'], "may not set 'tools': it has its own field"),
    (["--api-server-count", "4"], "this server is one process: only 1 is accepted, got 4"),
    (["--chat-template-content-format", "parts"], "vLLM's content formats (supported: auto, string, openai)"),
    (["--guided-decoding-backend", "xgrammar:disable-any-whitespace"], "a backend's options are not taken"),
    (["--guided-decoding-backend", "llguidance"], "supported: auto, xgrammar, guidance, outlines, lm-format-enforcer"),
    (["--swap-space", "-1"], "a number of GiB >= 0"),
    (["--kv-offloading-size", "0"], "a number of GiB > 0 was expected, got 0"),
    (["-O", "fast"], "a level (0-3), a dotted field (.level=3) or a JSON object was expected, got 'fast'"),
    (["-dp", "2"], "this engine runs one device: only 1 is accepted, got 2"),
    (["--distributed-executor-backend", "slurm"], "'slurm' is not supported"),
    (["--task", "embed"], "this engine generates text (supported: auto, generate)"),
    (["--limit-mm-per-prompt", '{"image": 4}'], "images, video and audio in messages are refused; give 0"),
    (["--limit-mm-per-prompt", "[0]"], "a JSON object of limits per modality was expected"),
    (["--config-format", "mistral"], "'mistral' is not read: this engine reads a model's Hugging Face config.json"),
    (["--cpu-offload-gb", "8"], "weights stay on the device here, none are offloaded to the CPU"),
    (["--structured-outputs-config", '{"disable_any_whitespace": true}'], "changes the structured answers"),
    (["--structured-outputs-config", '{"backend": "llguidance"}'], "'llguidance' is not supported"),
    (["--enable-sleep-mode"], "this server has no sleep mode"),
    (["--tool-server", "demo"], "this server calls no tools itself"),
    (["--logits-processors", "my.Proc"], "loads no logits processors"),
    (["--optimization-level", "4"], "a level from 0 to 3"),
    (["--max-num-batched-tokens", "1.5K"], "decimals are not taken with K"),
    (["--kv-offloading-backend", "mooncake"], "either is this engine's store (supported: native, lmcache)"),
    (["--kv-transfer-config", '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'],
     "runs no KV connectors; its store is its KV offloading (--kv-offloading-size GiB or --host-bytes"),
    (["--max-seq-len-to-capture", "0"], "an integer >= 1"),
    (["--dtype", "fp8"], "supported: auto, half, float16, bfloat16, float, float32"),
])  # fmt: skip
def test_what_this_engine_cannot_do_is_a_usage_error_saying_why(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse("serve", "m", *flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_vllm_s_older_rope_flags_and_human_counts_set_ours():
    config = engine_config(parse("serve", "m", "--rope-scaling", '{"rope_type": "yarn", "factor": 4.0}',
                                 "--rope-theta", "1e6", "--hf-overrides", '{"rms_norm_eps": 0.1}'))  # fmt: skip
    assert config.hf_overrides == {"rms_norm_eps": 0.1, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                   "rope_theta": 1e6}  # fmt: skip
    sized = engine_config(parse("serve", "m", "--kv-cache-memory-bytes", "2G", "--max-num-batched-tokens", "8k"))
    assert (sized.cache.memory_bytes, sized.scheduler.max_num_batched_tokens) == (2 << 30, 8000)
    assert engine_config(parse("serve", "m", "--kv-pool-bytes", "80m")).cache.memory_bytes == 80 * 10**6


def test_vllm_s_other_parser_names_and_gpt_oss_s_mxfp4(tmp_path):
    from cachedattention.model.quant_config import check_quantization
    from cachedattention.server.tool_calls import tool_call_parser

    assert tool_call_parser("qwen3_xml") is tool_call_parser("qwen3_coder")
    assert tool_call_parser("llama4_json") is tool_call_parser("llama3_json")
    # ERNIE 4.5 writes Hermes' blocks after its reasoning (vLLM's ernie45 parsers, reasoning then tools)
    from cachedattention.reasoning_parser import reasoning_parser

    answer = 'Weather needed.\n</think>\n\n\n<tool_call>\n{"name": "get", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    reasoning, content, _ = reasoning_parser("ernie45").split(answer, True)
    text, calls = tool_call_parser("ernie45").parse(content)
    assert reasoning == "Weather needed." and text is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get", {"city": "Oslo"})]
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    check_quantization("mxfp4", tmp_path)  # (gpt-oss's own checkpoints)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="quantization mxfp4: the model .* is not quantized"):
        check_quantization("mxfp4", tmp_path)


def test_vllm_s_kv_offloading_size_is_the_store_s_host_tier():
    default = engine_config(parse("serve", "m")).store
    assert default.enable and default.host_bytes == StoreConfig.host_bytes
    for backend in ("native", "lmcache"):
        store = engine_config(parse("serve", "m", "--kv-offloading-size", "1.5", "--kv-offloading-backend", backend)).store
        assert store.enable and store.host_bytes == 3 << 29 and replace(store, host_bytes=default.host_bytes) == default
    both = parse("serve", "m", "--kv-offloading-size", "1", "--host-bytes", str(1 << 30))
    assert engine_config(both).store.host_bytes == 1 << 30
    assert engine_config(parse("serve", "m", "--host-bytes", "4096")).store.host_bytes == 4096
    with pytest.raises(ValueError, match=r"kv_offloading_size \(1 GiB, 1073741824 bytes\) and host_bytes \(4096\)"):
        engine_config(parse("serve", "m", "--kv-offloading-size", "1", "--host-bytes", "4096"))
    with pytest.raises(ValueError, match="which --no-store switches off"):
        engine_config(parse("serve", "m", "--kv-offloading-size", "1", "--no-store"))


@pytest.mark.parametrize("given, window", [
    ("32768", 32768), ("32k", 32000), ("25.6k", 25600), ("32K", 32768), ("1m", 10**6), ("1M", 2**20), ("auto", -1),
    ("-1", -1),
])  # fmt: skip
def test_max_model_len_reads_vllm_s_forms(given, window):
    assert engine_config(parse("serve", "m", "--max-model-len", given)).max_model_len == window


@pytest.mark.parametrize("given, says", [
    ("1.5K", "decimals are not taken with K (powers of 1024): '1.5K'; 1.5k is in thousands"),
    ("0", "an integer >= 1 was expected, got 0"), ("-2", "an integer >= 1"), ("lots", "got 'lots'"),
])  # fmt: skip
def test_a_max_model_len_vllm_would_refuse_is_a_usage_error(given, says, capsys):
    with pytest.raises(SystemExit):
        parse("serve", "m", "--max-model-len", given)
    assert says in capsys.readouterr().err


def test_the_request_id_and_template_variable_flags_parse_as_vllm_s(tmp_path):
    args = parse("serve", "m", "--enable-request-id-headers", "--default-chat-template-kwargs", '{"enable_thinking": false}')
    assert args.enable_request_id_headers and args.default_chat_template_kwargs == {"enable_thinking": False}
    plain = parse("serve", "m")
    assert not plain.enable_request_id_headers and plain.default_chat_template_kwargs is None
    config = write(tmp_path, "enable-request-id-headers: true\ndefault-chat-template-kwargs: {enable_thinking: false}\n")
    args = parse("serve", "m", "--config", config)
    assert args.enable_request_id_headers and args.default_chat_template_kwargs == {"enable_thinking": False}


def write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_vllm_config_file_sets_the_flags_and_the_command_line_wins(tmp_path):
    config = write(tmp_path, """
model: from-file
port: 6379
uvicorn-log-level: "warning"
max_num_seqs: 4
enable-prefix-caching: false
enforce-eager: true
trust-remote-code: false
served-model-name: [a, b]
api-key: [k1, k2]
max-logprobs: -1
override-generation-config: {temperature: 0.5}
dtype: half
""")
    args = parse("serve", "--config", config, "--port", "9000")
    assert (args.model_option, args.port, args.uvicorn_log_level, args.max_num_seqs) == ("from-file", 9000, "warning", 4)
    assert not args.enable_prefix_caching and args.enforce_eager and not args.trust_remote_code
    assert (args.served_model_name, args.api_key, args.max_logprobs) == (["a", "b"], ["k1", "k2"], -1)
    assert engine_config(args).override_generation_config == {"temperature": 0.5}
    assert engine_config(args).dtype == "float16"
    on_line = parse("serve", "cli-model", f"--config={config}", "--enable-prefix-caching")
    assert engine_config(on_line).model == "cli-model" and on_line.enable_prefix_caching  # the command line's


@pytest.mark.parametrize("text, name, says", [
    ("prot: 8000\n", "c.yaml", "--config {path}: 'prot' is not a flag of `cachedattention serve`"),
    ("port: 8000\n", "c.json", "a YAML file (.yaml or .yml) was expected"),
    ("- port\n", "c.yaml", "a mapping of flag names to values was expected, got list"),
    ("port: [\n", "c.yaml", "not valid YAML"),
    ("port:\n", "c.yaml", "port has no value"),
    ("enable-chunked-prefill: false\n", "c.yaml", "always chunks prefill"),  # (its --no- form is refused)
    ("tensor-parallel-size: 2\n", "c.yaml", "this engine runs one device"),
])  # fmt: skip
def test_a_config_file_this_engine_cannot_follow_is_a_usage_error(tmp_path, capsys, text, name, says):
    path = write(tmp_path, text, name)
    with pytest.raises(SystemExit) as e:
        parse("serve", "m", "--config", path)
    assert e.value.code == 2 and says.format(path=path) in capsys.readouterr().err


def test_a_missing_config_file_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("serve", "m", "--config", str(tmp_path / "none.yaml"))
    assert "cannot be read" in capsys.readouterr().err
