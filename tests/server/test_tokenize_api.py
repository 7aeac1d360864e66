"""vLLM's /tokenize and /detokenize, and /version: the ids are the ones generation uses (the usage's
prompt_tokens agree), text round-trips, and bad input gets a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld 🙂"}]


def _post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_tokenize_gives_the_ids_generation_uses(server):
    tok = server.app.state.engine_loop.engine.tokenizer
    r = _post(server, "/tokenize", prompt="Héllo, wörld 🙂", return_token_strs=True).json()
    assert r["tokens"] == tok.encode("Héllo, wörld 🙂") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.app.state.engine_loop.engine.max_model_len
    assert r["token_strs"] == tok.pieces(r["tokens"]) and any(p.startswith("Ġ") for p in r["token_strs"])  # raw pieces
    done = _post(server, "/v1/completions", prompt="Héllo, wörld 🙂", max_tokens=1).json()
    assert done["usage"]["prompt_tokens"] == r["count"]
    chat = _post(server, "/tokenize", messages=MESSAGES).json()
    used = _post(server, "/v1/chat/completions", messages=MESSAGES, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert chat["count"] == used and chat["token_strs"] is None
    bare = _post(server, "/tokenize", messages=MESSAGES, add_generation_prompt=False).json()["tokens"]
    assert len(bare) < chat["count"] and chat["tokens"][: len(bare)] == bare  # the assistant's header comes last


def test_detokenize_round_trips_and_version_answers(server):
    ids = _post(server, "/tokenize", prompt="Héllo, wörld 🙂").json()["tokens"]
    assert _post(server, "/detokenize", tokens=ids).json() == {"prompt": "Héllo, wörld 🙂"}
    tok = server.app.state.engine_loop.engine.tokenizer
    chat = _post(server, "/tokenize", messages=MESSAGES).json()["tokens"]  # special tokens kept, as vLLM
    assert _post(server, "/detokenize", tokens=chat).json()["prompt"] == tok.render_chat(MESSAGES)
    version = httpx.get(f"{server.url}/version", timeout=60).json()["version"]
    assert isinstance(version, str) and version


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/tokenize", {"prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
        ("/tokenize", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
        ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {"prompt": "x", "model": 5}, "model"),  # (not a 404: no model is named)
        ("/detokenize", {"tokens": [1], "model": ["m"]}, "model"),
    ],
)
def test_bad_tokenizer_requests_get_400_naming_the_field(server, path, body, param):
    r = _post(server, path, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_unknown_model_is_404(server):
    r = _post(server, "/tokenize", prompt="x", model="gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_text_prompt_gets_the_tokenizer_s_bos_as_vllm_encodes_it(tiny_dirs, tmp_path):
    """Llama-style tokenizers put a BOS before a prompt; a chat template writes its own instead."""
    import shutil

    from cachedattention import LLM, SamplingParams
    from tests.util import sentencepiece_like

    path, _ = tiny_dirs["llama"]
    shutil.copytree(path, tmp_path / "m")
    sentencepiece_like(add_bos=True).hf.save_pretrained(tmp_path / "m")
    llm = LLM(str(tmp_path / "m"))
    assert llm.generate(["Hello world"], SamplingParams(max_tokens=1))[0].prompt_token_ids == [1, 2, 3]
    rid = llm.engine.add_request("Hello world", SamplingParams(max_tokens=1), add_special_tokens=False)
    assert llm.engine.requests[rid].prompt_token_ids == [2, 3]
    cut = llm.generate(["Hello world world"], SamplingParams(max_tokens=1, truncate_prompt_tokens=2))[0]
    assert cut.prompt_token_ids == [1, 3]  # the BOS stays, as a tokenizer's own truncation keeps it
    rid = llm.engine.add_request("Hello world", SamplingParams(max_tokens=1), session_id="bos")
    assert llm.engine.requests[rid].head_tokens == 1  # a session's overflow truncation keeps it too
    llm.close()


def test_a_chat_takes_add_special_tokens_as_vllm(server):
    """Accepted, as vLLM's field (this tokenizer adds nothing around a text: the same ids; one that
    adds a BOS: tests/server/test_vllm_compat2.py)."""
    plain = _post(server, "/tokenize", messages=MESSAGES).json()["tokens"]
    assert _post(server, "/tokenize", messages=MESSAGES, add_special_tokens=True).json()["tokens"] == plain
    r = _post(server, "/v1/chat/completions", messages=MESSAGES, add_special_tokens=True, max_tokens=1)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(plain), r.text


def test_a_lone_surrogate_is_named_as_such(server):
    """Found by fuzzing: the tokenizer library's own message ("TextEncodeInput must be Union[...]") reached the client."""
    r = httpx.post(f"{server.url}/tokenize", content=json.dumps({"prompt": "a\ud800b"}), timeout=60,
                   headers={"Content-Type": "application/json"})  # (ASCII JSON: the surrogate as an escape)
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
