"""vLLM's flags a compatibility sweep found refused with "invalid choice" or "unrecognized arguments":
--dtype auto/half/float."""

from __future__ import annotations

import json

import pytest

from cachedattention.cli import build_parser, engine_config


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
