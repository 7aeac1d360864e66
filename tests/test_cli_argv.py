"""vLLM's command-line forms that argparse does not read by itself (cli_argv.py): a flag spelt with
underscores, a JSON flag given key by key, and a flag a script left empty or None."""

from __future__ import annotations

import json

import pytest

from cachedattention.cli import build_parser, engine_config


def parse(*argv: str):
    return build_parser().parse_args(["serve", "m", *argv])


def test_a_flag_spelt_with_underscores_is_the_dashed_one():
    got = parse("--max_model_len", "4096", "--gpu_memory_utilization=0.5", "--no_enable_prefix_caching",
                "--tool_call_parser", "llama3_json")  # fmt: skip
    want = parse("--max-model-len", "4096", "--gpu-memory-utilization=0.5", "--no-enable-prefix-caching",
                 "--tool-call-parser", "llama3_json")  # fmt: skip
    assert got == want and engine_config(got).max_model_len == 4096


def test_a_flag_neither_spelling_names_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--no_such_flag", "1")
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def test_a_json_flag_given_key_by_key_is_the_object_of_its_keys():
    keys = parse("--speculative-config.method", "ngram", "--speculative_config.num_speculative_tokens", "3",
                 "--speculative-config.prompt_lookup_max=2")  # fmt: skip
    whole = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}')
    assert keys.speculative_config == whole.speculative_config
    nested = parse("--hf-overrides.rope_scaling.rope_type", "yarn", "--hf-overrides.rope_scaling.factor=2.0",
                   "--hf-overrides.use_sliding_window", "false", "--hf-overrides.architectures", '["A"]')  # fmt: skip
    assert nested.hf_overrides == {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "use_sliding_window": False,
                                   "architectures": ["A"]}  # fmt: skip
    assert parse("--default-chat-template-kwargs.enable_thinking", "false").default_chat_template_kwargs == {
        "enable_thinking": False}  # fmt: skip
    assert json.loads(parse("-O.level=3").compilation_config) == {"level": 3}
    assert json.loads(parse("-cc.cudagraph_mode=NONE").compilation_config) == {"cudagraph_mode": "NONE"}


@pytest.mark.parametrize("argv, says", [
    (["--hf-overrides", "{}", "--hf-overrides.a", "1"], "give it as one JSON object or key by key"),
    (["--hf-overrides.a"], "--hf-overrides.a: expected a value"),
    (["--hf-overrides.a", "1", "--hf-overrides.a.b", "2"], "a is given a value and keys both"),
    (["--hf-overrides.", "1"], "a key was expected after the dot"),
])  # fmt: skip
def test_a_json_flag_given_key_by_key_badly_is_a_usage_error(argv, says, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert says in capsys.readouterr().err


def test_vllm_s_no_forms_of_switches_are_their_defaults(capsys):
    for flag in ("--no-enforce-eager", "--no-trust-remote-code", "--no-enable-lora", "--no-enable-log-requests",
                 "--no-return-tokens-as-token-ids", "--no-disable-sliding-window", "--no-enable-request-id-headers",
                 "--no-allow-credentials"):  # fmt: skip
        assert vars(parse(flag)) == vars(parse()), flag
    assert not parse("--enable-lora", "--no-enable-lora").enable_lora  # (the last one wins, as argparse's)
    for flag in ("--no-enable-auto-tool-choice", "--no-enable-prompt-tokens-details", "--no-disable-log-requests"):
        with pytest.raises(SystemExit):  # (this engine always does these: their --no- asks for what it does not)
            parse(flag)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_values_are_left_as_argparse_reads_them():
    """From a review: a value that looks like a dotted flag, and a text flag's None, are values."""
    p = build_parser()
    prompt = p.parse_args(["generate", "m", "--prompt", "--hf-overrides.rope_theta is what? Explain", "--max-tokens", "5"])
    assert prompt.prompt == "--hf-overrides.rope_theta is what? Explain" and prompt.max_tokens == 5
    assert p.parse_args(["generate", "m", "--prompt", "None"]).prompt == "None"
    assert p.parse_args(["generate", "m", "--prompt=None"]).prompt == "None"
    assert p.parse_args(["chat", "m", "--system", "None"]).system == "None"
    assert parse("--chat-template", "--seed.x is odd").chat_template == "--seed.x is odd"
    assert parse("-q", "None").quantization == "None"  # (a short flag's value left to its own check: no quantization)


def test_both_names_of_the_pool_s_size_must_agree():
    from cachedattention import LLM

    assert engine_config(parse("--kv-cache-memory-bytes", "2G")).cache.memory_bytes == 2 << 30
    assert engine_config(parse("--kv-cache-memory-bytes", "1T", "--kv-pool-bytes", "1T")).cache.memory_bytes == 1 << 40
    with pytest.raises(ValueError, match=r"--kv-pool-bytes \(1073741824\) and --kv-cache-memory-bytes \(4294967296\)"):
        engine_config(parse("--kv-pool-bytes", "1G", "--kv-cache-memory-bytes", "4G"))
    with pytest.raises(ValueError, match="kv_pool_bytes and kv_cache_memory_bytes both set the cache's memory_bytes"):
        LLM(kv_pool_bytes=1 << 30, kv_cache_memory_bytes=4 << 30)


def test_a_flag_left_empty_or_none_is_a_flag_not_given():
    """As vLLM reads an optional flag's '' or None (a script filling it from an empty variable)."""
    empty = parse("--seed", "None", "--max-model-len", "", "--tool-call-parser", "", "--quantization=None",
                  "--speculative-config", "", "--reasoning-parser=")  # fmt: skip
    assert engine_config(empty) == engine_config(parse()) and vars(empty) == vars(parse())
    assert parse("--enable-lora").enable_lora  # (a switch is no flag with a value)
