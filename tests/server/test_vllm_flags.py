"""vLLM's serve flags beyond the basics: several --served-model-name, the CORS lists and
credentials, --override-generation-config."""

from __future__ import annotations

import httpx
import pytest

from cachedattention import LLM
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
