"""vLLM's chat template content format: a message's content reaches the template as one string or as
OpenAI's list of text parts, "auto" reading which the template takes."""

import httpx
import pytest

from cachedattention import LLM, EngineConfig, SamplingParams
from cachedattention.model.content_format import detect_content_format
from cachedattention.model.messages import validate_messages
from cachedattention.model.tokenizer import Tokenizer

# a template that only reads parts, and one that reads either (Gemma 3's way: parts joined as they come)
PARTS_ONLY = "{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}"
EITHER = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
          "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}{% endfor %}")  # fmt: skip
STRING_ONLY = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TWO_PARTS = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


@pytest.mark.parametrize("template, expected", [
    (STRING_ONLY, "string"), (PARTS_ONLY, "openai"), (EITHER, "openai"),
    ("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for k in m['tool_calls'] %}{{ k }}{% endfor %}{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %", "string"),  # not Jinja: rendering says why
])  # fmt: skip
def test_auto_reads_whether_the_template_loops_over_a_message_s_content(template, expected):
    assert detect_content_format(template) == expected


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(str(chat_model_dir))


def _render(tokenizer: Tokenizer, template: str, fmt: str, messages) -> str:
    return tokenizer.with_chat_template(template).with_content_format(fmt).render_chat(validate_messages(messages),
                                                                                       add_generation_prompt=False)


def test_each_format_gives_the_template_the_content_it_reads(tokenizer):
    one = [{"role": "user", "content": "hi"}]
    assert _render(tokenizer, PARTS_ONLY, "auto", TWO_PARTS) == "<user>[a][b]"  # the parts as given
    assert _render(tokenizer, PARTS_ONLY, "openai", one) == "<user>[hi]"  # a string as one part
    assert _render(tokenizer, EITHER, "auto", TWO_PARTS) == "<user>ab"  # as vLLM renders it: the template joins
    assert _render(tokenizer, EITHER, "string", TWO_PARTS) == "<user>a\nb"  # joined a line each first
    assert _render(tokenizer, STRING_ONLY, "auto", TWO_PARTS) == "<user>a\nb"
    assert _render(tokenizer, STRING_ONLY, "auto", one) == _render(tokenizer, STRING_ONLY, "string", one) == "<user>hi"
    with pytest.raises(ValueError, match="chat_template_content_format must be one of auto, string, openai"):
        tokenizer.with_content_format("parts")


def test_llm_chat_and_the_engine_config_take_the_format(chat_model_dir):
    llm = LLM(model=str(chat_model_dir), enable_store=False)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    out = llm.chat(TWO_PARTS, greedy, chat_template=PARTS_ONLY)[0]
    assert out.prompt == "<user>[a][b]"
    assert llm.chat(TWO_PARTS, greedy, chat_template=EITHER, chat_template_content_format="string")[0].prompt == "<user>a\nb"
    with pytest.raises(ValueError, match="chat_template_content_format must be one of"):
        EngineConfig(chat_template_content_format="parts")
    from cachedattention.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "m", "--chat-template-content-format", "openai"])
    assert engine_config(args).chat_template_content_format == "openai"


def test_a_server_renders_with_its_content_format(chat_model_dir):
    from tests.server.conftest import start_server

    server = start_server(EngineConfig(model=str(chat_model_dir), chat_template=EITHER,
                                       chat_template_content_format="string"))  # fmt: skip
    try:
        tokens = httpx.post(f"{server.url}/tokenize", json={"messages": TWO_PARTS, "add_generation_prompt": False},
                            timeout=30).json()["tokens"]  # fmt: skip
        tok = server.app.state.engine_loop.engine.tokenizer
        assert tokens == tok.encode("<user>a\nb")  # string: joined before the template (auto would give "ab")
    finally:
        server.stop()
