"""vLLM's /tokenize and /detokenize: the token ids this server computes for a prompt or a chat (as
the generation endpoints would feed them to the model), and the text of token ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cachedattention.model.tokenizer import Tokenizer
from cachedattention.server.api_error import bad
from cachedattention.server.protocol import flag, parse_chat, whole_numbers


def tokenize(tok: Tokenizer, body: dict[str, Any], max_model_len: int, trust_template: bool = False,
             template_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """{"prompt": text} or {"messages": [...]} with chat's tools, add_generation_prompt,
    continue_final_message, chat_template_kwargs (over the server's `template_defaults`), documents and
    add_special_tokens; with "return_token_strs": true, each token's text too."""
    if "messages" in body:
        ids = _chat_ids(tok, body, max_model_len, trust_template, template_defaults)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("give a prompt (a string) or messages to tokenize", "prompt")
        try:  # as a completion encodes it: with the tokenizer's own (Llama's BOS) unless told not to
            ids = tok.encode(prompt, add_special_tokens=flag(body, "add_special_tokens", True))
        except ValueError as e:
            raise bad(str(e), "prompt") from None
    out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}
    if flag(body, "return_token_strs"):  # the vocabulary's own pieces, as vLLM lists them
        out["token_strs"] = tok.pieces(ids)
    return out


def _chat_ids(tok: Tokenizer, body: dict[str, Any], max_model_len: int, trust_template: bool,
              template_defaults: Mapping[str, Any] | None) -> list[int]:  # fmt: skip
    import jinja2

    fields = ("messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
              "add_special_tokens", "chat_template", "reasoning_effort", "documents")  # as in chat
    parsed = parse_chat({k: body[k] for k in fields if k in body}, None, max_model_len, trust_template=trust_template,
                        template_defaults=template_defaults)  # fmt: skip
    try:
        return tok.encode_chat(parsed.messages, tools=parsed.tools, options=parsed.chat_options)
    except jinja2.TemplateError as e:
        raise bad(f"the chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:  # no chat template, text that cannot be tokenized, template variables
        raise bad(str(e), getattr(e, "param", None) or "messages") from None


def detokenize(tok: Tokenizer, body: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """{"tokens": [ids]} -> {"prompt": their text}, special tokens kept (as vLLM: /tokenize's ids of a
    chat come back as the rendered chat)."""
    ids = whole_numbers(body.get("tokens"))  # (3.0 is 3, as vLLM's list[int])
    if ids is None:
        raise bad("tokens must be a list of token ids (integers)", "tokens")
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise bad(f"token ids out of the vocabulary (0..{vocab_size - 1}): {outside[:5]}", "tokens")
    return {"prompt": tok.decode(ids, skip_special_tokens=False)}

