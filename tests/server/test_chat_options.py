"""vLLM's chat fields: continue_final_message (the model goes on with the assistant's last
message), add_generation_prompt, and chat_template_kwargs (extra template variables), in LLM.chat,
over HTTP and in /tokenize; bad combinations get a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import pytest

from cachedattention import LLM, SamplingParams
from cachedattention.model.messages import ChatOptions
from tests.server.conftest import with_template

THINKING = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if not (loop.last and continue_final_message) %}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)
OPEN = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "The capital is"}]


def test_continue_final_message_leaves_the_answer_open_over_http_and_in_tokenize(server):
    tok = server.app.state.engine_loop.engine.tokenizer
    body = {"messages": OPEN, "add_generation_prompt": False, "continue_final_message": True}
    ids = httpx.post(f"{server.url}/tokenize", json=body, timeout=60).json()["tokens"]
    text = tok.render_chat(OPEN, options=ChatOptions(False, True))
    assert ids == tok.encode(text) and text.endswith("The capital is")  # no end of turn after it
    closed = tok.encode(tok.render_chat(OPEN, add_generation_prompt=False))
    assert closed[: len(ids)] == ids and len(closed) > len(ids)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"continue_final_message": True}, "continue_final_message"),  # with the generation prompt
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": OPEN[:1]},
         "continue_final_message"),  # the last message is the user's
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"namespace": 1}}, "chat_template_kwargs"),  # the template's own function
        ({"chat_template_kwargs": {"conversations": []}}, "chat_template_kwargs"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
    ],
)
def test_bad_chat_options_get_400_naming_the_field(server, extra, param):
    body = {"messages": OPEN, "max_tokens": 2, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_absurdly_nested_template_variable_is_no_server_fault(server):
    """transformers 5.24 recurses through it converting the variables (a 400 naming the field);
    5.17 leaves it alone (served)."""
    deep = {"chat_template_kwargs": {"deep": json.loads("[" * 700 + "]" * 700)}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": OPEN, "max_tokens": 2, **deep}, timeout=60)
    assert r.status_code == 200 or (r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs")


def test_chat_template_kwargs_reach_the_template(chat_model_dir, tmp_path):
    llm = LLM(str(with_template(chat_model_dir, tmp_path / "thinking", THINKING)))
    user = OPEN[:1]
    params = SamplingParams(max_tokens=1, temperature=0)
    plain = llm.chat(user, params)[0].prompt_token_ids
    quiet = llm.chat(user, params, chat_template_kwargs={"enable_thinking": False})[0].prompt_token_ids
    assert quiet[: len(plain)] == plain and llm.tokenizer.decode(quiet[len(plain) :]).strip() == "<think>\n\n</think>"
    going_on = llm.chat(OPEN, params, add_generation_prompt=False, continue_final_message=True)[0]
    assert llm.tokenizer.decode(going_on.prompt_token_ids).endswith("The capital is")
    with pytest.raises(ValueError, match="must be the assistant's"):
        llm.chat(user, params, add_generation_prompt=False, continue_final_message=True)
    llm.close()


PLAIN = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


NAMED = ("{% for m in messages %}[{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}] {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_a_message_s_name_reaches_the_template_whatever_its_role(chat_model_dir):
    """As vLLM passes it (a speaker's name in a group chat; some templates write it); a name that is
    not a string is refused, naming it."""
    messages = [{"role": "system", "content": "Be brief", "name": "rules"},
                {"role": "user", "content": "Hi", "name": "ana"},
                {"role": "assistant", "content": "Hello", "name": "bot"},
                {"role": "user", "content": "Bye", "name": None}]  # fmt: skip
    text = "[system rules] Be brief\n[user ana] Hi\n[assistant bot] Hello\n[user] Bye\n[assistant]"
    llm = LLM(str(chat_model_dir), chat_template=NAMED)
    try:
        out = llm.chat(messages, SamplingParams(max_tokens=1, temperature=0))[0]
        assert out.metrics.prompt_tokens == len(llm.tokenizer.encode(text))
        with pytest.raises(ValueError, match=r"messages\[1\]\.name must be a string"):
            llm.chat([messages[0], {"role": "user", "content": "Hi", "name": 7}], SamplingParams(max_tokens=1))
    finally:
        llm.close()


def test_a_chat_template_given_to_the_engine_replaces_the_tokenizer_s(chat_model_dir, tmp_path):
    """vLLM's --chat-template: the template itself or a file that holds it; the loaded tokenizer keeps
    its own; a template with a Jinja error, or a name that is neither a template nor a file, is
    refused when the engine starts."""
    from cachedattention.cli import build_parser, engine_config

    messages = [{"role": "user", "content": "Hi there"}]
    inline = LLM(str(chat_model_dir), chat_template=PLAIN)
    assert inline.tokenizer.render_chat(messages) == "[user] Hi there\n[assistant]"
    assert inline.chat(messages, SamplingParams(max_tokens=3, temperature=0))[0].metrics.prompt_tokens == len(
        inline.tokenizer.encode("[user] Hi there\n[assistant]"))  # fmt: skip
    assert inline.engine.loaded.tokenizer.render_chat(messages) != "[user] Hi there\n[assistant]"  # the model's own stays
    inline.close()
    own = LLM(str(chat_model_dir))  # vLLM's per-call chat(..., chat_template=...): that call alone
    once = own.chat(messages, SamplingParams(max_tokens=2, temperature=0), chat_template=PLAIN)[0]
    after = own.chat(messages, SamplingParams(max_tokens=2, temperature=0))[0]
    assert once.metrics.prompt_tokens == len(own.tokenizer.encode("[user] Hi there\n[assistant]"))
    assert after.metrics.prompt_tokens == len(own.tokenizer.encode_chat(messages)) != once.metrics.prompt_tokens
    with pytest.raises(ValueError, match="not valid Jinja"):
        own.chat(messages, chat_template="{% if %}")
    own.close()
    (tmp_path / "plain.jinja").write_text(PLAIN)
    args = build_parser().parse_args(["serve", str(chat_model_dir), "--chat-template", str(tmp_path / "plain.jinja")])
    from_file = LLM(str(chat_model_dir), chat_template=engine_config(args).chat_template)
    assert from_file.tokenizer.render_chat(messages) == "[user] Hi there\n[assistant]"
    from_file.close()
    with pytest.raises(ValueError, match=r"not valid Jinja \(line 1\)"):
        LLM(str(chat_model_dir), chat_template="{% for m in messages %}{{ m.content }}")
    with pytest.raises(ValueError, match="neither a Jinja template nor a readable file"):
        LLM(str(chat_model_dir), chat_template=str(tmp_path / "missing.jinja"))
    braced = tmp_path / "tpl{{v}}"  # a file's name may hold braces: a file first, as vLLM
    braced.mkdir()
    (braced / "t.jinja").write_text(PLAIN)
    marked = "{% generation %}{{ messages[0].content }}{% endgeneration %}"  # transformers' own tag
    for template, want in ((str(braced / "t.jinja"), "[user] Hi there\n[assistant]"), (marked, "Hi there")):
        llm = LLM(str(chat_model_dir), chat_template=template)
        assert llm.tokenizer.render_chat(messages) == want
        llm.close()


def test_a_server_s_chat_template_shapes_its_prompts_and_a_request_s_own_is_refused(chat_model_dir, server):
    from dataclasses import replace

    from tests.server.conftest import engine_config, start_server

    s = start_server(replace(engine_config(chat_model_dir, store=False), chat_template=PLAIN))
    try:
        tok = s.app.state.engine_loop.engine.tokenizer
        ids = httpx.post(f"{s.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=60).json()["tokens"]
        assert tok.decode(ids) == "[user] Hi\n[assistant]"
    finally:
        s.stop()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "chat_template": PLAIN}
    for path in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", (path, r.text)


def test_a_template_that_fails_while_it_runs_is_a_400_that_says_why(chat_model_dir):
    from dataclasses import replace

    from tests.server.conftest import engine_config, start_server

    failing = "{{ messages | length + 'x' }}"  # compiles; adding a number and a string fails at render
    s = start_server(replace(engine_config(chat_model_dir, store=False), chat_template=failing))
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for path in ("/v1/chat/completions", "/tokenize"):
            r = httpx.post(f"{s.url}{path}", json=body, timeout=60)
            assert r.status_code == 400 and "failed to render" in r.json()["error"]["message"], (path, r.text)
    finally:
        s.stop()
