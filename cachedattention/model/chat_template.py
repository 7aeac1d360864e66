"""A chat template given in place of the tokenizer's own (vLLM's --chat-template): the template
itself, or a file that holds it; checked for Jinja syntax when the engine starts, not at the first
chat."""

from __future__ import annotations

from pathlib import Path

JINJA_MARKS = ("{{", "{%", "{#", "\n")  # what only a template (not a file name) holds


def resolve_chat_template(value: str) -> str:
    """The template's text: `value` itself when it reads as a template, else the file it names."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a chat template must be a non-empty string: a Jinja template or a file that holds one")
    path = Path(value).expanduser() if "\n" not in value else None
    if path is not None and path.is_file():  # a file first (its name may hold braces), as vLLM
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"chat template file {value!r} cannot be read: {e}") from None
    elif any(mark in value for mark in JINJA_MARKS):
        text = value
    else:
        raise ValueError(f"chat template {value!r} is neither a Jinja template nor a readable file")
    check_template_syntax(text)
    return text


def check_template_syntax(text: str) -> None:
    """Compiled as transformers compiles it (its sandbox and extensions, e.g. {% generation %})."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None
