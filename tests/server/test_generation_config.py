"""vLLM's --generation-config: the model's generation_config.json gives the sampling defaults where a
request (or an LLM call without SamplingParams) sets none; a request's own values win; "vllm" ignores
the file; values out of range are left out."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from cachedattention import LLM, SamplingParams
from tests.server.conftest import engine_config, start_server

CONFIG = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 5, "repetition_penalty": 1.3, "top_p": 7, "do_sample": True}
EXPLICIT = SamplingParams(max_tokens=3, temperature=0.0, top_k=5, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def configured_dir(chat_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-generation-config")
    shutil.copytree(chat_model_dir, path, dirs_exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(CONFIG))
    return path


def test_an_llm_call_without_params_samples_with_the_model_s_defaults(configured_dir):
    llm = LLM(str(configured_dir))
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k, defaults.repetition_penalty) == (0.0, 3, 5, 1.3)
    assert defaults.top_p == 1.0  # 7 is out of range: left out
    plain = llm.generate("Hello")[0]
    assert len(plain.token_ids) == 3 and plain.text == llm.generate("Hello", EXPLICIT)[0].text
    llm.close()
    ignored = LLM(str(configured_dir), generation_config="vllm")
    assert ignored.get_default_sampling_params() == SamplingParams()
    ignored.close()
    with pytest.raises(ValueError, match="holds no generation_config.json"):
        LLM(str(configured_dir), generation_config=str(configured_dir / "nowhere"))



def test_a_broken_generation_config_is_skipped_beside_the_weights_and_refused_by_name(chat_model_dir, tmp_path):
    from cachedattention.model.generation_defaults import generation_defaults

    (tmp_path / "generation_config.json").write_text("{not json")
    assert generation_defaults("auto", tmp_path) == {}  # served without, as vLLM
    with pytest.raises(ValueError, match="cannot be read as a JSON object"):
        generation_defaults(str(tmp_path), None)


def test_a_request_s_own_values_win_over_the_model_s(configured_dir):
    from cachedattention.cli import build_parser
    from cachedattention.cli import engine_config as cli_engine_config

    s = start_server(engine_config(configured_dir, store=False))
    try:
        body = {"prompt": "Hello", "n": 2}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
        texts = [c["text"] for c in r["choices"]]
        assert r["usage"]["completion_tokens"] == 6 and texts[0] == texts[1]  # 3 tokens each, greedy
        reference = LLM(str(configured_dir), generation_config="vllm")
        assert texts[0] == reference.generate("Hello", EXPLICIT)[0].text
        reference.close()
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 1.0,
                                                        "seed": 1, "n": 4}, timeout=60).json()  # fmt: skip
        # the request's temperature wins; its max_tokens is bounded by the model's max_new_tokens (vLLM's server-wide limit)
        assert r["usage"]["completion_tokens"] == 12 and len({c["text"] for c in r["choices"]}) > 1
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 2  # below the limit: the request's
        # as vLLM, the room is checked for the length asked for, before the model's bound shortens it
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 5000}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "min_tokens": 10}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text  # above the model's 3
        assert "max_tokens=3" in r.json()["error"]["message"]
    finally:
        s.stop()
    args = build_parser().parse_args(["serve", str(configured_dir), "--generation-config", "vllm"])
    assert cli_engine_config(args).generation_config == "vllm"


def test_every_eos_id_the_generation_config_lists_ends_an_answer(tiny_dirs, tmp_path):
    """As vLLM: generation_config.json's eos_token_id list stops answers too (gpt-oss ends a tool call
    with <|call|>, which only that list names); "vllm" ignores it, as it ignores the other defaults."""
    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=12, temperature=0)
    prompt = [(7 * i + 3) % 250 for i in range(20)]
    free = LLM(str(path)).generate([prompt], params)[0].token_ids
    stop = next(t for t in free[2:] if t not in free[:2])  # a token first generated at step 2 or later
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    out = LLM(str(folder)).generate([prompt], params)[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    assert LLM(str(folder), generation_config="vllm").generate([prompt], params)[0].token_ids == free
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    assert LLM(str(folder)).generate([prompt], params)[0].token_ids == free  # not ids: ignored, with a warning
