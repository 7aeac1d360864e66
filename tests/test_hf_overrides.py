"""vLLM's hf_overrides (`--hf-overrides JSON`): values laid over config.json before the model's
shape is read, the served model then the one transformers builds from the same overridden config."""

from __future__ import annotations

import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.cli import build_parser, engine_config
from cachedattention.llm_args import engine_dtype
from cachedattention.model.hf_overrides import apply_hf_overrides
from tests.util import assert_logits_match


def test_values_replace_the_config_s_and_a_sub_config_takes_them_key_by_key():
    """As vLLM lays them over transformers' config: a dict such as rope_scaling replaced whole, a
    sub-config merged all the way down; the config itself left alone."""
    config = {"a": 1, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "b": {"c": 1},
              "text_config": {"x": 1, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}  # fmt: skip
    got = apply_hf_overrides(config, {"a": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "b": 3,
                                      "new": [1], "text_config": {"rope_scaling": {"factor": 8.0}}})  # fmt: skip
    assert got == {"a": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "b": 3, "new": [1],
                   "text_config": {"x": 1, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}}  # fmt: skip
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0} and config["text_config"]["x"] == 1
    assert apply_hf_overrides(config, None) is config
    # transformers 5 keeps the base in rope_parameters: a rope_theta sets it there too
    nested = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}
    assert apply_hf_overrides(nested, {"rope_theta": 5e5})["rope_parameters"] == {"rope_type": "yarn",
                                                                                  "rope_theta": 5e5, "factor": 2.0}


def test_the_served_model_is_the_one_of_the_overridden_config(tiny_dirs, monkeypatch):
    import transformers

    path, _ = tiny_dirs["llama"]
    overrides = {"rms_norm_eps": 0.5, "max_position_embeddings": 96}
    llm = LLM(model=str(path), hf_overrides=overrides)
    assert llm.engine.max_model_len == 96  # (the window follows the overridden config)
    config = transformers.AutoConfig.from_pretrained(str(path))
    config.rms_norm_eps = 0.5
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert_logits_match(llm, hf, list(range(3, 40)), params, monkeypatch)
    plain = LLM(model=str(path))
    assert plain.engine.spec.fingerprint() != llm.engine.spec.fingerprint()  # (stored KV is kept apart)
    assert plain.engine.max_model_len == 512


def test_vllm_s_auto_dtype_reads_the_overridden_config(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')
    assert engine_dtype("auto", "cuda", str(tmp_path)) == "float16"
    assert engine_dtype("auto", "cuda", str(tmp_path), {"torch_dtype": "bfloat16"}) == "bfloat16"


def test_the_command_line_takes_a_json_object_and_refuses_anything_else(capsys):
    args = build_parser().parse_args(["serve", "m", "--hf-overrides", '{"rope_scaling": {"factor": 2.0}}'])
    assert engine_config(args).hf_overrides == {"rope_scaling": {"factor": 2.0}}
    assert engine_config(build_parser().parse_args(["serve", "m"])).hf_overrides is None
    for bad, says in (("{nope", "not JSON"), ("[1]", "must be a dict of config.json's names, got list")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "m", "--hf-overrides", bad])
        assert says in capsys.readouterr().err


@pytest.mark.parametrize("overrides, says", [
    (lambda config: config, "a function over transformers' config is not taken here"),
    ("max_position_embeddings=8", "must be a dict of config.json's names, got str"),
    ({1: 2}, "keys must be config.json's names"),
])  # fmt: skip
def test_what_is_no_dict_of_names_is_refused_before_loading(overrides, says):
    with pytest.raises(ValueError, match=says):
        LLM(model="/no/such/model", hf_overrides=overrides)


def test_an_override_the_weights_do_not_fit_is_a_clear_error(tiny_dirs):
    """(And a refusal of the settings, not of the overridden config, does not name the overrides.)"""
    path, _ = tiny_dirs["llama"]
    with pytest.raises(ValueError, match="max_position_embeddings") as refused:
        LLM(model=str(path), hf_overrides={"rms_norm_eps": 0.5}, max_model_len=10**6)
    assert "hf_overrides" not in str(refused.value)
    with pytest.raises(ValueError, match=r"the config makes it \[256, 48\].* \(its config with hf_overrides of "
                                         r"hidden_size\)"):
        LLM(model=str(path), hf_overrides={"hidden_size": 48})
